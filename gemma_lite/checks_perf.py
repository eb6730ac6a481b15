"""Checks for the exercises of chapters 8-10: memory, the KV cache, torch.compile.

They follow the conventions of ``gemma_lite.checks`` (and use its machinery):
one printed line, a ``CheckResult`` that is true when the check passed, a likely
cause for known mistakes, and "not done yet" while a TODO still raises
``NotImplementedError``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from .checks import Mismatch, _check, _expect_close, _expect_equal
from .config import GemmaConfig
from .kv_cache import RingCache
from .memory import FP32, dtype_bytes, kv_cache_bytes
from .model import Gemma

# ================================================================ exercises 08: memory


@_check("training_state_bytes")
def check_training_state_bytes(fn: Callable[[int, torch.dtype], int]) -> str:
    """fn(n_params, dtype) -> bytes of weights, gradients and Adam's state for training in ``dtype``."""
    for n, dtype in ((268_098_176, torch.float32), (268_098_176, torch.bfloat16), (1000, torch.float16)):
        b = dtype_bytes(dtype)
        master = FP32 if b != FP32 else 0
        causes = [
            (
                "the gradients count too: one per parameter, in the weights' dtype",
                lambda n=n, b=b, m=master: n * (b + 2 * FP32 + m),
            ),
            (
                "Adam keeps two moments per parameter (m and v)",
                lambda n=n, b=b, m=master: n * (2 * b + FP32 + m),
            ),
            (
                "Adam's moments stay in fp32 whatever the weights' dtype",
                lambda n=n, b=b, m=master: n * (4 * b + m),
            ),
        ]
        if master:  # first: it is the likeliest reason for 12 bytes per parameter in bf16
            causes.insert(
                0,
                (
                    "with bf16 or fp16 weights, Adam updates an fp32 master copy of them",
                    lambda n=n, b=b: n * (2 * b + 2 * FP32),
                ),
            )
        expected = n * (2 * b + 2 * FP32 + master)
        _expect_equal(fn(n, dtype), expected, f"training_state_bytes({n:_}, {dtype})", causes)
    return "16 bytes per parameter, in fp32 and in mixed precision alike"


def _longest_fitting(
    budget: int, cfg: GemmaConfig, dtype: torch.dtype, ring: bool = True, cap: bool = True
) -> int:
    """The largest context whose cache fits in ``budget`` (0 if none), by bisection."""
    lo, hi = 0, cfg.max_seq_len if cap else 1 << 40
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kv_cache_bytes(cfg, mid, dtype, ring=ring) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


@_check("max_context")
def check_max_context(fn: Callable[[int, GemmaConfig, torch.dtype], int]) -> str:
    """fn(budget_bytes, cfg, dtype) -> the longest context whose KV cache (batch 1) fits in the budget."""
    real, tiny = GemmaConfig.gemma3_270m(), GemmaConfig.tiny()
    for budget, cfg, dtype in (
        (50_000_000, real, torch.bfloat16),
        (100_000_000, real, torch.float32),
        (5_000_000, real, torch.bfloat16),
        (2_000_000_000, real, torch.bfloat16),
        (10_000, tiny, torch.float32),
        (1_000, real, torch.float32),
    ):
        causes = [
            (
                "local layers stop growing at the window (ring buffer): only global layers grow",
                lambda b=budget, c=cfg, d=dtype: _longest_fitting(b, c, d, ring=False),
            ),
            (
                "off by one: one token more no longer fits",
                lambda b=budget, c=cfg, d=dtype: _longest_fitting(b, c, d) + 1,
            ),
            (
                "the model stops at cfg.max_seq_len, however much memory there is",
                lambda b=budget, c=cfg, d=dtype: _longest_fitting(b, c, d, cap=False),
            ),
        ]
        name = "270m" if cfg == real else "tiny"
        expected = _longest_fitting(budget, cfg, dtype)
        _expect_equal(fn(budget, cfg, dtype), expected, f"max_context({budget:_}, {name}, {dtype})", causes)
    return "inverts kv_cache_bytes: global layers grow with the context, local ones stop at the window"


# ================================================================ exercises 09: the KV cache


def _ring_after(n_written: int, size: int) -> list[int]:
    """slot_pos of the package's RingCache after positions 0..n-1 were written, 7 at a time."""
    ring = RingCache(1, 1, size, 1, torch.float32, "cpu")
    for start in range(0, n_written, 7):
        pos = torch.arange(start, min(start + 7, n_written))
        kv = torch.zeros(1, 1, len(pos), 1)
        ring.update(kv, kv, pos)
    return ring.slot_pos.tolist()


@_check("ring_contents")
def check_ring_contents(fn: Callable[[int, int], list[int]]) -> str:
    """fn(n_written, size) -> the position held in each slot of a ring of ``size``; -1 for an empty slot."""
    for n, size in ((0, 4), (3, 4), (4, 4), (5, 4), (11, 4), (1000, 512), (513, 512)):
        expected = _ring_after(n, size)
        newest = list(range(max(0, n - size), n))
        causes = [
            (
                "position p lives in slot p % size: the ring is not kept in order, oldest first",
                lambda n=newest, s=size: n + [-1] * (s - len(n)),
            ),
            (
                "an empty slot holds -1 (a position no query can see), not 0",
                lambda e=expected: [max(p, 0) for p in e],
            ),
            (
                "off by one: after writing n positions the newest is n - 1",
                lambda n=n, s=size: _ring_after(n + 1, s),
            ),
        ]
        got = fn(n, size)
        got = got.tolist() if isinstance(got, torch.Tensor) else list(got)
        _expect_equal(got, expected, f"ring_contents({n}, {size})", causes)
    return "slot p % size holds position p until p + size overwrites it"


def _tiny_model() -> Gemma:
    model = Gemma(GemmaConfig.tiny()).eval()
    for p in model.parameters():
        p.normal_(0.0, 0.3)
    return model


@_check("greedy_with_cache")
def check_greedy_with_cache(fn: Callable[[Gemma, torch.Tensor, int], list[int]]) -> str:
    """fn(model, ids (1, T), n) -> n greedy tokens: one prefill, then one token per call, with a cache."""
    model = _tiny_model()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 5))
    n = 20  # the tiny model's window is 8: the ring wraps
    seq = ids
    for _ in range(n):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    expected = seq[0, ids.shape[1] :].tolist()

    calls: list[tuple[int, object, list[int] | None]] = []  # (tokens, cache, positions)

    def record(_module, args, kwargs):
        tokens = args[0].shape[1]
        pos = args[1] if len(args) > 1 else kwargs.get("input_pos")
        cache = args[2] if len(args) > 2 else kwargs.get("cache")
        calls.append((tokens, cache, None if pos is None else pos.tolist()))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        got = fn(model, ids.clone(), n)
    finally:
        handle.remove()
    got = got.tolist() if isinstance(got, torch.Tensor) else list(got)
    if not calls:
        raise Mismatch("the model was never called")
    if any(cache is None for _, cache, _ in calls):
        raise Mismatch("every call needs the cache: model(ids, input_pos, cache)")
    if calls[0][0] != ids.shape[1]:
        raise Mismatch(
            f"the first call should prefill the whole prompt ({ids.shape[1]} tokens), not {calls[0][0]}"
        )
    if any(tokens != 1 for tokens, _, _ in calls[1:]):
        raise Mismatch(
            "after the prefill, feed only the newest token (shape (1, 1)): the cache holds the rest"
        )
    if len(calls) != n:
        raise Mismatch(
            f"{n} tokens need {n} calls (the prefill gives the first token), you made {len(calls)}"
        )
    for k, (_, _, pos) in enumerate(calls[1:], start=1):
        if pos != [ids.shape[1] + k - 1]:
            raise Mismatch(
                f"decode call {k} used input_pos {pos}; the token it feeds sits at "
                f"position {ids.shape[1] + k - 1}"
            )
    _expect_equal(got, expected, "the generated tokens")
    return "one prefill, then one token per step, and the same tokens as recomputing everything"


@_check("tokens_processed")
def check_tokens_processed(fn: Callable[[int, int, bool], int]) -> str:
    """fn(prompt, new, cached) -> token positions the model runs to generate ``new`` tokens."""
    for prompt, new in ((6, 1), (6, 128), (100, 10), (1, 1000)):
        uncached = sum(prompt + i for i in range(new))
        cached = prompt + new - 1
        causes = [
            (
                "the last generated token is never fed back: it is an output, not an input",
                lambda p=prompt, n=new: sum(p + i for i in range(n + 1)),
            ),
            (
                "the prefill produces the first new token: n tokens need n - 1 decode steps",
                lambda p=prompt, n=new: p + n,
            ),
        ]
        _expect_equal(
            fn(prompt, new, False), uncached, f"tokens_processed({prompt}, {new}, cached=False)", causes
        )
        causes = [
            (
                "with a cache, the prompt runs once and each decode step runs one token",
                lambda p=prompt, n=new: p + n,
            ),
            ("with a cache, the prompt runs once and each decode step runs one token", lambda n=new: n),
        ]
        _expect_equal(
            fn(prompt, new, True), cached, f"tokens_processed({prompt}, {new}, cached=True)", causes
        )
    return "quadratic in the length without a cache, linear with one"


# ================================================================ exercises 10: torch.compile


def capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cap: float = 5.0) -> torch.Tensor:
    """Attention whose scores are soft-capped at ``cap`` when any exceeds it. q, k, v (B, T, D)."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (B, T, T)
    if scores.abs().max() > cap:
        scores = cap * torch.tanh(scores / cap)
    return scores.softmax(-1) @ v


def _graph_breaks(fn: Callable, *args) -> tuple[int, str]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    reasons = "; ".join(r.reason.splitlines()[0] for r in explained.break_reasons)
    return explained.graph_break_count, reasons


@_check("capped_attention without a graph break")
def check_capped_attention(fn: Callable[..., torch.Tensor]) -> str:
    """fn(q, k, v, cap) -> the same values as ``capped_attention``, in one graph."""
    q, k, v = (torch.randn(2, 6, 8) for _ in range(3))
    top = (q @ k.transpose(-2, -1) / 8**0.5).abs().max()
    small = (q * 4.0 / top, k, v)  # the largest score is 4: below the cap, but where tanh would bend it
    large = (q * 8.0 / top, k, v)  # some scores exceed the cap
    for name, (q, k, v) in (("small scores", small), ("large scores", large)):
        expected = capped_attention(q, k, v, 5.0)
        causes = [
            (
                "the cap applies only when a score exceeds it: otherwise the scores stay as they are",
                lambda q=q, k=k, v=v: (
                    (5.0 * torch.tanh(q @ k.transpose(-2, -1) / 8**0.5 / 5.0)).softmax(-1) @ v
                ),
            ),
        ]
        _expect_close(fn(q, k, v, 5.0), expected, f"your output on {name}", causes=causes)
    breaks, reasons = _graph_breaks(fn, *large, 5.0)
    if breaks:
        raise Mismatch(
            f"torch.compile still breaks the graph {breaks} time(s): {reasons}. "
            "Choose between the two results with torch.where instead of a Python if"
        )
    return "same values, and torch._dynamo.explain finds no graph break"


@_check("write_kv")
def check_write_kv(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> str:
    """fn(buffer (B, K, S, D), k (B, K, 1, D), pos (1,)) -> buffer, with k written at slot pos in place."""
    buffer = torch.zeros(1, 2, 8, 4)
    expected = buffer.clone()
    for p in (0, 3, 7):
        k = torch.randn(1, 2, 1, 4)
        expected[:, :, p] = k[:, :, 0]
        out = fn(buffer, k, torch.tensor([p]))
        if not isinstance(out, torch.Tensor) or out.shape != buffer.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise Mismatch(
                f"return the buffer itself (shape {tuple(buffer.shape)}), got {shape}: "
                "a cache that grows (torch.cat) changes shape at every step"
            )
        if out.data_ptr() != buffer.data_ptr() or not torch.equal(buffer, expected):
            if torch.equal(out, expected):
                raise Mismatch(
                    "the values are right but the buffer is unchanged: write in place "
                    "(index_copy_), so the cache stays one fixed allocation"
                )
        _expect_close(buffer, expected, f"the buffer after writing position {p}")

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(fn, backend=counter, dynamic=False)
    buffer = torch.zeros(1, 2, 8, 4)
    for p in range(6):
        compiled(buffer, torch.randn(1, 2, 1, 4), torch.tensor([p]))
    torch._dynamo.reset()
    if counter.frame_count != 1:
        raise Mismatch(
            f"compiled, it was traced {counter.frame_count} times for 6 positions: keep the "
            "position a tensor (no int(pos), no .item(), no Python slicing by it)"
        )
    return "writes in place at a tensor position: compiled once, reused for every step"
