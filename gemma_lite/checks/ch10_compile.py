"""Checks of the chapter 10 exercises (torch.compile): capped attention without a graph break, a cache
write that compiles once, the learner's decode step (one graph, compiled once) and the capstone: their
compiled Gemma against the package's. ``capped_attention`` is the version with the break that the
chapter shows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._dynamo.backends.debugging import ExplainWithBackend
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from ..config import GemmaConfig
from ..generate import Generator, decode_step
from ..model import Gemma
from .core import Mismatch, check, expect_close, fresh_function, randomize_norms


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


@check("decode_step")
def check_decode_step(fn: Callable) -> str:
    """fn(model, ids (B, T), input_pos (T,), caches) -> logits of the last position (B, V), like
    ``gemma_lite.generate.decode_step``; one token at a time it compiles into one graph, once."""
    model = randomize_norms(Gemma(GemmaConfig.tiny()))  # window 8: a 12-token prompt wraps the rings

    def new_caches() -> list:
        return list(model.new_cache(1, 32).layers)

    mine, ref = new_caches(), new_caches()
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 12))
    steps = [(prompt, torch.arange(12))]
    steps += [(torch.tensor([[7 * p % 100]]), torch.tensor([p])) for p in (12, 13, 14)]
    for ids, pos in steps:
        what = "the prefill" if ids.shape[1] > 1 else f"the step at position {int(pos)}"
        expected = decode_step(model, ids, pos, ref)
        got = fn(model, ids, pos, mine)
        if isinstance(got, torch.Tensor) and got.shape != expected.shape:
            raise Mismatch(
                f"{what} returned shape {tuple(got.shape)}, expected {tuple(expected.shape)}: the logits of "
                "the last position only, (B, V); take x[:, -1] before the final norm and the head"
            )
        try:
            expect_close(got, expected, f"the logits of {what}", atol=1e-4)
        except Mismatch as e:
            raise Mismatch(
                f"{e}; likely cause: each block adds post_attn_norm(attention), then post_ffn_norm(ffn), "
                "to x; the head is the final norm, then the embedding matrix (tied)"
            ) from None

    counter = CompileCounter()
    compiled = torch.compile(fresh_function(fn), backend=counter, fullgraph=True, dynamic=False)
    caches = new_caches()
    token = fn(model, prompt, torch.arange(12), caches).argmax(-1, keepdim=True)  # the prefill, eager
    try:
        for p in range(12, 18):
            token = compiled(model, token, torch.tensor([p]), caches).argmax(-1, keepdim=True)
    except torch._dynamo.exc.Unsupported as e:
        raise Mismatch(
            f"torch.compile(fullgraph=True) cannot make one graph of it: {str(e).splitlines()[0]}. "
            "No Python decisions on tensor values (if, .item(), int(), print) inside the step"
        ) from None
    if counter.frame_count != 1:
        raise Mismatch(
            f"compiled, it was traced {counter.frame_count} times for 6 positions: keep the position a "
            "tensor (no int(pos), no .item(), no Python slicing by it)"
        )
    return "same logits as gemma_lite.generate.decode_step; one graph, compiled once for every position"


@check("your compiled Gemma")
def check_my_compiled_gemma(yours: Generator, package: Generator, prompt: str, new_tokens: int = 32) -> str:
    """The capstone: ``yours`` (a StepGenerator around your decode step and your model) compiles once
    and chooses the tokens the package's compiled generator does."""
    runs = {}
    for name, gen in (("yours", yours), ("the package's", package)):
        gen(prompt, new_tokens, stop_at_eos=False)  # the first generation compiles
        graphs = counters["stats"]["unique_graphs"]
        runs[name] = gen(prompt, new_tokens, stop_at_eos=False)
        if name == "yours" and counters["stats"]["unique_graphs"] != graphs:
            raise Mismatch("your decode step compiled again on the second generation: its guards changed")
    mine, ref = runs["yours"].new_ids[0], runs["the package's"].new_ids[0]
    first = next((i for i, (a, b) in enumerate(zip(mine, ref, strict=True)) if a != b), None)
    if first is not None:
        decode = package.tokenizer.decode
        raise Mismatch(
            f"new token {first} is {decode([mine[first]])!r} with your decode step but "
            f"{decode([ref[first]])!r} with the package's"
        )
    speed, reference = runs["yours"].decode_tok_s, runs["the package's"].decode_tok_s
    return (
        f"your compiled decode step chooses the package's {new_tokens} tokens, {runs['yours'].text[0]!r}, "
        f"at {speed:.1f} tokens/s (the package's: {reference:.1f} tokens/s)"
    )
