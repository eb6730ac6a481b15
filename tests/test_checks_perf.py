"""The checks of chapters 8-10 both ways: the right answer passes, known mistakes fail and are named."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import fails, passes
from torch._dynamo.testing import CompileCounter

from gemma_lite import checks
from gemma_lite.memory import dtype_bytes, kv_cache_bytes

# ---------------------------------------------------------------- 08 memory


def training_state_bytes(n, dtype, master=True, grads=True):
    b = dtype_bytes(dtype)
    return n * (b + (b if grads else 0) + 8 + (4 if master and b != 4 else 0))


def test_training_state_bytes(capsys):
    passes(checks.check_training_state_bytes(training_state_bytes), capsys)
    fails(
        checks.check_training_state_bytes(lambda n, d: training_state_bytes(n, d, master=False)),
        capsys,
        "master copy",
    )
    fails(
        checks.check_training_state_bytes(lambda n, d: training_state_bytes(n, d, grads=False)),
        capsys,
        "gradients count",
    )


def max_context(budget, cfg, dtype, ring=True, cap=True):
    context = 0
    while (context < cfg.max_seq_len or not cap) and kv_cache_bytes(
        cfg, context + 1, dtype, ring=ring
    ) <= budget:
        context += 1 if context < 1024 else 256  # coarse steps above 1k, then back up
    while kv_cache_bytes(cfg, context, dtype, ring=ring) > budget:
        context -= 1
    return min(context, cfg.max_seq_len) if cap else context


def bisect_max_context(budget, cfg, dtype, ring=True, cap=True):
    lo, hi = 0, cfg.max_seq_len if cap else 1 << 40
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if kv_cache_bytes(cfg, mid, dtype, ring=ring) <= budget else (lo, mid - 1)
    return lo


def test_max_context(capsys):
    passes(checks.check_max_context(bisect_max_context), capsys)
    fails(checks.check_max_context(lambda *a: bisect_max_context(*a, ring=False)), capsys, "ring buffer")
    fails(checks.check_max_context(lambda *a: bisect_max_context(*a) + 1), capsys, "off by one")
    fails(checks.check_max_context(lambda *a: bisect_max_context(*a, cap=False)), capsys, "max_seq_len")


# ---------------------------------------------------------------- 09 the KV cache


def ring_contents(n, size):
    slots = [-1] * size
    for p in range(n):
        slots[p % size] = p
    return slots


def test_ring_contents(capsys):
    passes(checks.check_ring_contents(ring_contents), capsys)
    passes(checks.check_ring_contents(lambda n, s: torch.tensor(ring_contents(n, s))), capsys)
    in_order = lambda n, s: list(range(max(0, n - s), n)) + [-1] * (s - min(n, s))  # noqa: E731
    fails(checks.check_ring_contents(in_order), capsys, "p % size")
    fails(checks.check_ring_contents(lambda n, s: [max(p, 0) for p in ring_contents(n, s)]), capsys, "-1")


def greedy_with_cache(model, ids, n, one_token=True, shift=0):
    T = ids.shape[1]
    cache = model.new_cache(1, T + n)
    logits = model(ids, torch.arange(T), cache)[:, -1]
    out = [int(logits.argmax(-1))]
    seq = ids
    for k in range(n - 1):
        seq = torch.cat([seq, torch.tensor([[out[-1]]])], dim=1)
        if one_token:
            logits = model(seq[:, -1:], torch.tensor([T + k + shift]), cache)[:, -1]
        else:
            logits = model(seq, torch.arange(seq.shape[1]), cache)[:, -1]
        out.append(int(logits.argmax(-1)))
    return out


def test_greedy_with_cache(capsys):
    passes(checks.check_greedy_with_cache(greedy_with_cache), capsys)
    fails(
        checks.check_greedy_with_cache(lambda m, i, n: greedy_with_cache(m, i, n, one_token=False)),
        capsys,
        "only the newest token",
    )
    fails(
        checks.check_greedy_with_cache(lambda m, i, n: greedy_with_cache(m, i, n, shift=1)),
        capsys,
        "input_pos",
    )

    def no_cache(model, ids, n):
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
        return ids[0, -n:].tolist()

    fails(checks.check_greedy_with_cache(no_cache), capsys, "needs the cache")


def test_tokens_processed(capsys):
    def tokens_processed(prompt, new, cached):
        return prompt + new - 1 if cached else sum(prompt + i for i in range(new))

    passes(checks.check_tokens_processed(tokens_processed), capsys)
    fails(
        checks.check_tokens_processed(lambda p, n, c: p + n if c else sum(p + i for i in range(n))),
        capsys,
        "one token",
    )
    fails(
        checks.check_tokens_processed(lambda p, n, c: p + n - 1 if c else sum(p + i for i in range(n + 1))),
        capsys,
        "never fed back",
    )


# ---------------------------------------------------------------- 10 torch.compile


@pytest.mark.compile
def test_capped_attention(capsys):
    def fixed(q, k, v, cap=5.0):
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        capped = torch.where(scores.abs().max() > cap, cap * torch.tanh(scores / cap), scores)
        return capped.softmax(-1) @ v

    def always(q, k, v, cap=5.0):
        scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
        return (cap * torch.tanh(scores / cap)).softmax(-1) @ v

    passes(checks.check_capped_attention(fixed), capsys)
    fails(checks.check_capped_attention(checks.capped_attention), capsys, "graph", "torch.where")
    fails(checks.check_capped_attention(always), capsys, "only when a score exceeds")


def index_copy(buffer, k, pos):
    return buffer.index_copy_(2, pos, k)


def by_int(buffer, k, pos):
    p = int(pos)
    buffer[:, :, p : p + 1] = k
    return buffer


@pytest.mark.compile
def test_write_kv(capsys):
    passes(checks.check_write_kv(index_copy), capsys)
    fails(checks.check_write_kv(lambda b, k, pos: b.index_copy(2, pos, k)), capsys, "in place")
    fails(checks.check_write_kv(lambda b, k, pos: torch.cat([b, k], dim=2)), capsys, "torch.cat")
    fails(checks.check_write_kv(by_int), capsys, "traced 6 times", "tensor")
    fails(checks.check_write_kv(by_int), capsys, "traced 6 times")  # a second run starts afresh
    compiled = torch.compile(by_int, backend="eager", dynamic=False)
    fails(checks.check_write_kv(compiled), capsys, "traced 6 times")  # checked as the function it compiles
    fails(checks.check_write_kv(functools.partial(by_int)), capsys, "traced 6 times")  # any callable


def test_checks_keep_what_the_learner_compiled(capsys):
    counter = CompileCounter()
    mine = torch.compile(by_int, backend=counter, dynamic=False)
    args = torch.zeros(1, 2, 8, 4), torch.randn(1, 2, 1, 4), torch.tensor([3])
    mine(*args)
    assert counter.frame_count == 1
    fails(checks.check_write_kv(by_int), capsys, "traced 6 times")
    fails(checks.check_capped_attention(checks.capped_attention), capsys, "graph")
    mine(*args)
    assert counter.frame_count == 1, "a check threw away the learner's compiled code"
