"""Decode kernels and layouts are chosen by measuring, and change speed only: logits stay the same."""

from __future__ import annotations

import pytest
import torch
from helpers import max_abs_diff, random_model, tiny_bench_model

from gemma_lite.fast import (
    DecodePlan,
    ShapeTiming,
    apply_kernels,
    kernel_layers,
    layer_shape,
    measure_kernels,
    optimize_for_decode,
    set_embedding_layout,
    set_kernels,
)
from gemma_lite.kernels import KERNELS


@pytest.fixture()
def tiny():
    return random_model()  # fresh for each test: the tests change its kernels


@torch.no_grad()
@pytest.mark.parametrize("kernel", ["linear", "gemv"])
@pytest.mark.parametrize("column_major", [False, True])
def test_every_eager_kernel_and_layout_keeps_the_logits(tiny, kernel, column_major):
    ids = torch.randint(0, tiny.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    cache_before, cache_after = tiny.new_cache(1, 16), tiny.new_cache(1, 16)
    before = [tiny(ids[:, t : t + 1], torch.tensor([t]), cache_before) for t in range(12)]
    full_before = tiny(ids)
    set_kernels(tiny, eager=kernel)
    set_embedding_layout(tiny, column_major)
    assert {layer.eager_kernel for layer in kernel_layers(tiny)} == {kernel}
    after = [tiny(ids[:, t : t + 1], torch.tensor([t]), cache_after) for t in range(12)]
    assert max_abs_diff(torch.cat(before, 1), torch.cat(after, 1)) <= 1e-5
    assert max_abs_diff(full_before, tiny(ids)) <= 1e-5


def test_embedding_layout_keeps_values(tiny):
    weight = tiny.tok_embed.weight.detach().clone()
    set_embedding_layout(tiny, column_major=True)
    assert tiny.tok_embed.weight.stride(0) == 1 and torch.equal(tiny.tok_embed.weight, weight)
    set_embedding_layout(tiny, column_major=False)
    assert tiny.tok_embed.weight.is_contiguous() and torch.equal(tiny.tok_embed.weight, weight)


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
def test_every_shape_and_usable_kernel_is_measured(quant):
    model, _ = tiny_bench_model(torch.float32, quant)
    timings = measure_kernels(model, compiled=False, rounds=1)
    shapes = {layer_shape(layer) for layer in kernel_layers(model)}
    assert {(t.fmt, t.out_features, t.in_features) for t in timings} == shapes
    assert sum(t.layers for t in timings) == len(kernel_layers(model))
    for t in timings:
        assert set(t.gb_s) == {n for n in KERNELS[t.fmt] if n != "reduce"} and min(t.gb_s.values()) > 0
        assert t.seconds() == pytest.approx(t.nbytes / t.gb_s[t.best] / 1e9)


def test_each_layer_gets_the_fastest_kernel_of_its_shape(tiny):
    by_shape = {}
    for layer in kernel_layers(tiny):
        by_shape.setdefault(layer_shape(layer), []).append(layer)
    timings = []
    for k, ((fmt, out_features, in_features), layers) in enumerate(by_shape.items()):
        fastest = ("linear", "gemv")[k % 2]
        speeds = {"linear": 1.0, "gemv": 1.0, fastest: 2.0}
        timings.append(
            ShapeTiming(fmt, out_features, in_features, False, len(layers), "row_major", 1, speeds)
        )
        timings.append(ShapeTiming(fmt, out_features, in_features, True, len(layers), "row_major", 1, speeds))
    apply_kernels(tiny, timings)
    for t in timings:
        for layer in by_shape[(t.fmt, t.out_features, t.in_features)]:
            assert layer.eager_kernel == layer.compiled_kernel == t.best


def test_optimize_for_decode_keeps_the_head_layout_whose_best_kernel_is_fastest(tiny, monkeypatch):
    def fake_measure(model, compiled, rounds=5, layers=None):
        column_major = model.tok_embed.weight.stride(0) == 1
        speed = 2.0 if column_major else 1.0  # column-major wins in this pretend machine
        return [
            ShapeTiming(
                *layer_shape(layer),
                compiled,
                1,
                "column_major" if column_major else "row_major",
                8,
                {"linear": speed},
            )
            for layer in (layers or kernel_layers(model))
        ]

    monkeypatch.setattr("gemma_lite.fast.measure_kernels", fake_measure)
    plan = optimize_for_decode(tiny, compiled=False)
    assert isinstance(plan, DecodePlan) and plan.head_layout == "column_major"
    assert tiny.tok_embed.weight.stride(0) == 1
    assert "head stored column-major" in plan.table()


@pytest.mark.compile
def test_optimize_for_decode_measures_compiled_kernels_too(tiny):
    plan = optimize_for_decode(tiny, rounds=1)
    compiled = [t for t in plan.timings if t.compiled]
    assert compiled and all("reduce" in t.gb_s for t in compiled)
    assert plan.matmul_seconds(compiled=True) > 0
    lines = plan.table().splitlines()
    assert len(lines) == len(plan.timings) + 2 and all("*" in line for line in lines[1:-1])
