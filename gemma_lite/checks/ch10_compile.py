"""Checks of the chapter 10 exercises (torch.compile): capped attention without a graph break, a cache
write that compiles once. ``capped_attention`` is the version with the break that the chapter shows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._dynamo.backends.debugging import ExplainWithBackend
from torch._dynamo.testing import CompileCounter

from .core import Mismatch, check, expect_close, fresh_function


def capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cap: float = 5.0) -> torch.Tensor:
    """Attention whose scores are soft-capped at ``cap`` when any exceeds it. q, k, v (B, T, D)."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (B, T, T)
    if scores.abs().max() > cap:
        scores = cap * torch.tanh(scores / cap)
    return scores.softmax(-1) @ v


def _graph_breaks(fn: Callable, *args) -> tuple[int, str]:
    """How many times torch.compile breaks ``fn``'s graph on ``args``, and why (first line of each reason)."""
    explain = ExplainWithBackend("eager")  # what torch._dynamo.explain does, without its reset()
    torch.compile(fresh_function(fn), backend=explain)(*args)
    explained = explain.output()
    reasons = "; ".join(r.reason.splitlines()[0] for r in explained.break_reasons)
    return explained.graph_break_count, reasons


@check("capped_attention without a graph break")
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
        expect_close(fn(q, k, v, 5.0), expected, f"your output on {name}", causes=causes)
    breaks, reasons = _graph_breaks(fn, *large, 5.0)
    if breaks:
        raise Mismatch(
            f"torch.compile still breaks the graph {breaks} time(s): {reasons}. "
            "Choose between the two results with torch.where instead of a Python if"
        )
    return "same values, and torch._dynamo.explain finds no graph break"


@check("write_kv")
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
        expect_close(buffer, expected, f"the buffer after writing position {p}")

    counter = CompileCounter()
    compiled = torch.compile(fresh_function(fn), backend=counter, dynamic=False)
    buffer = torch.zeros(1, 2, 8, 4)
    for p in range(6):
        compiled(buffer, torch.randn(1, 2, 1, 4), torch.tensor([p]))
    if counter.frame_count != 1:
        raise Mismatch(
            f"compiled, it was traced {counter.frame_count} times for 6 positions: keep the "
            "position a tensor (no int(pos), no .item(), no Python slicing by it)"
        )
    return "writes in place at a tensor position: compiled once, reused for every step"
