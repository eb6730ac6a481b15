"""Decode kernels and layouts change speed only: logits stay the same."""

from __future__ import annotations

import pytest
import torch
from helpers import max_abs_diff, random_model

from gemma_lite.fast import (
    GemvLinear,
    measure_head_kernels,
    optimize_for_decode,
    set_embedding_layout,
    use_gemv,
)


@pytest.fixture()
def tiny():
    return random_model()  # fresh for each test: the tests change its kernels


@torch.no_grad()
@pytest.mark.parametrize("choice", ["linear", "linear_column_major", "gemv"])
def test_every_kernel_choice_keeps_the_logits(tiny, choice):
    ids = torch.randint(0, tiny.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    cache_before, cache_after = tiny.new_cache(1, 16), tiny.new_cache(1, 16)
    before = [tiny(ids[:, :1], torch.tensor([0]), cache_before)]
    before += [tiny(ids[:, t : t + 1], torch.tensor([t]), cache_before) for t in range(1, 12)]
    full_before = tiny(ids)
    assert optimize_for_decode(tiny, choice) == choice
    after = [tiny(ids[:, t : t + 1], torch.tensor([t]), cache_after) for t in range(12)]
    assert max_abs_diff(torch.cat(before, 1), torch.cat(after, 1)) <= 1e-5
    assert max_abs_diff(full_before, tiny(ids)) <= 1e-5


def test_linear_layers_are_swapped_as_modules(tiny):
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in tiny.modules())
    use_gemv(tiny)
    assert sum(type(m) is GemvLinear for m in tiny.modules()) == n_linear and tiny.head_gemv
    use_gemv(tiny, enabled=False)
    assert not any(type(m) is GemvLinear for m in tiny.modules()) and not tiny.head_gemv


def test_embedding_layout_keeps_values(tiny):
    weight = tiny.tok_embed.weight.detach().clone()
    set_embedding_layout(tiny, column_major=True)
    assert tiny.tok_embed.weight.stride(0) == 1 and torch.equal(tiny.tok_embed.weight, weight)
    set_embedding_layout(tiny, column_major=False)
    assert tiny.tok_embed.weight.is_contiguous() and torch.equal(tiny.tok_embed.weight, weight)


def test_head_kernels_are_measured(tiny):
    speeds = measure_head_kernels(tiny, rows=256, rounds=2)
    assert set(speeds) == {"linear", "linear_column_major", "gemv"}
    assert all(v > 0 for v in speeds.values())


@pytest.mark.parametrize("fastest", ["linear", "linear_column_major", "gemv"])
def test_the_fastest_measured_kernel_is_applied(tiny, fastest, monkeypatch):
    speeds = {"linear": 1.0, "linear_column_major": 1.0, "gemv": 1.0, fastest: 2.0}
    monkeypatch.setattr("gemma_lite.fast.measure_head_kernels", lambda model: speeds)
    assert optimize_for_decode(tiny) == fastest
    assert tiny.head_gemv == (fastest == "gemv")
    assert (tiny.tok_embed.weight.stride(0) == 1) == (fastest == "linear_column_major")
