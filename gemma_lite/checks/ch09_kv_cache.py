"""Checks of the chapter 09 exercises (the KV cache): ring contents, cached greedy decoding, tokens run."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import GemmaConfig
from ..kv_cache import RingCache
from ..model import Gemma
from .core import Mismatch, check, expect_equal


def _ring_after(n_written: int, size: int) -> list[int]:
    """slot_pos of the package's RingCache after positions 0..n-1 were written, 7 at a time."""
    ring = RingCache(1, 1, size, 1, torch.float32, "cpu")
    for start in range(0, n_written, 7):
        pos = torch.arange(start, min(start + 7, n_written))
        kv = torch.zeros(1, 1, len(pos), 1)
        ring.update(kv, kv, pos)
    return ring.slot_pos.tolist()


@check("ring_contents")
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
        expect_equal(got, expected, f"ring_contents({n}, {size})", causes)
    return "slot p % size holds position p until p + size overwrites it"


def _tiny_model() -> Gemma:
    model = Gemma(GemmaConfig.tiny()).eval()
    for p in model.parameters():
        p.normal_(0.0, 0.3)
    return model


@check("greedy_with_cache")
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
    expect_equal(got, expected, "the generated tokens")
    return "one prefill, then one token per step, and the same tokens as recomputing everything"


@check("tokens_processed")
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
        expect_equal(
            fn(prompt, new, False), uncached, f"tokens_processed({prompt}, {new}, cached=False)", causes
        )
        causes = [
            (
                "with a cache, the prompt runs once and each decode step runs one token",
                lambda p=prompt, n=new: p + n,
            ),
            ("with a cache, the prompt runs once and each decode step runs one token", lambda n=new: n),
        ]
        expect_equal(fn(prompt, new, True), cached, f"tokens_processed({prompt}, {new}, cached=True)", causes)
    return "quadratic in the length without a cache, linear with one"
