"""Checks of the chapter 09 exercises (the KV cache): the two caches, attention over a cache, the capstone on
the real weights; ring contents, cached greedy decoding, tokens run."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..calibration import HELDOUT_TEXT
from ..config import GemmaConfig
from ..generate import decode_step
from ..kv_cache import GlobalCache, RingCache
from ..layers import Attention, RotaryEmbedding, attention_mask, cached_attention
from ..model import Gemma
from .core import Mismatch, check, expect_close, expect_equal, expect_tensor, randomize_norms


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


def _attend(q: torch.Tensor, keys, values, key_pos, query_pos, window) -> torch.Tensor:
    """softmax(q k^T, masked by positions) v: what an attention layer computes from a cache's answer."""
    mask = attention_mask(query_pos, key_pos, window)  # (1, 1, T, S)
    scores = (q @ keys.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ values  # (B, K, T, D)


def _replay(cache, steps, window):
    """Feed ``steps`` (k, v, positions) to a cache; each step's attention output from its answer."""
    outputs = []
    for k, v, pos in steps:
        q = torch.randn(k.shape)
        answer = cache.update(k, v, pos)
        if not isinstance(answer, tuple) or len(answer) != 3:
            raise Mismatch("update(k, v, input_pos) should return (keys, values, key_pos)")
        keys, values, key_pos = answer
        key_pos = expect_tensor(key_pos, "key_pos")
        if keys.shape[2] != key_pos.shape[0] or values.shape != keys.shape:
            raise Mismatch(
                f"update returned keys {tuple(keys.shape)}, values {tuple(values.shape)} and "
                f"{key_pos.shape[0]} positions: one position per key slot, keys and values alike"
            )
        outputs.append((q, _attend(q, keys, values, key_pos, pos, window)))
    return outputs


def _cache_steps(prefill: int, decode: int) -> list:
    steps, position = [], 0
    for T in (prefill, *[1] * decode):
        pos = torch.arange(position, position + T)
        steps.append((torch.randn(1, 2, T, 4), torch.randn(1, 2, T, 4), pos))
        position += T
    return steps


def _expected(steps, outputs, window) -> list[torch.Tensor]:
    """Each step's attention over every key so far (within the window): no cache needed."""
    ks = torch.cat([k for k, _, _ in steps], dim=2)
    vs = torch.cat([v for _, v, _ in steps], dim=2)
    ps = torch.cat([p for _, _, p in steps])
    return [_attend(q, ks, vs, ps, pos, window) for (q, _), (_, _, pos) in zip(outputs, steps, strict=True)]


def _compare_cache(cls, size_arg: int, window, steps, name: str) -> None:
    torch.manual_seed(1)
    cache = cls(1, 2, size_arg, 4, torch.float32, "cpu")
    outputs = _replay(cache, steps, window)
    for i, ((_, got), expected) in enumerate(zip(outputs, _expected(steps, outputs, window), strict=True)):
        pos = steps[i][2]
        what = (
            f"{name}: attention at positions {pos.tolist()[:1]}{'...' if len(pos) > 1 else ''} over its keys"
        )
        expect_close(got, expected, what, atol=1e-5)


@check("StaticCache")
def check_static_cache(cls) -> str:
    """cls(batch, n_kv_heads, max_len, head_dim, dtype, device); update(k, v, pos) -> keys, values, pos."""
    steps = _cache_steps(5, 4)
    try:
        _compare_cache(cls, 12, None, steps, "StaticCache")
    except Mismatch as e:
        raise Mismatch(
            f"{e}; likely cause: write the new keys at slots input_pos (index_copy_) and return the "
            "whole buffer with the position of each slot, torch.arange(max_len)"
        ) from None
    return "every step attends to every earlier key: prefill, then one token at a time"


@check("RingCache")
def check_ring_cache(cls) -> str:
    """cls(batch, n_kv_heads, size, head_dim, dtype, device): the last ``size`` positions, slot p % size."""
    window = 4
    cache = cls(1, 2, window, 4, torch.float32, "cpu")
    for name, tensor in list(cache.named_buffers()) + [
        (n, t) for n, t in vars(cache).items() if isinstance(t, torch.Tensor)
    ]:
        if tensor.dim() == 4 and tensor.shape[2] != window:
            raise Mismatch(f"'{name}' has {tensor.shape[2]} slots: a ring keeps exactly `size` = {window}")
    for prefill in (3, 7):  # shorter and longer than the ring
        try:
            _compare_cache(cls, window, window, _cache_steps(prefill, 6), f"RingCache (prefill of {prefill})")
        except Mismatch as e:
            hint = (
                "; likely cause: a prefill longer than the ring overwrites keys its first tokens still need: "
                "return the old ring and the new keys together (torch.cat), then write the newest `size`"
                if prefill > window
                else "; likely cause: position p goes to slot p % size, and empty slots have position -1"
            )
            raise Mismatch(str(e) + hint) from None
    return f"keeps {window} slots and gives every step the keys of its window, even after a long prefill"


@check("cached_attention")
def check_cached_attention(fn) -> str:
    """fn(attn, x (B, T, C), rope, input_pos (T,), cache) -> (B, T, C), like layers.cached_attention."""
    cfg = GemmaConfig.tiny()  # window 8
    for is_global in (False, True):
        kind = "global" if is_global else "local"
        attn = randomize_norms(Attention(cfg, is_global))
        base = cfg.rope_global_base if is_global else cfg.rope_local_base
        rotary = RotaryEmbedding(cfg.head_dim, base)

        def new_cache(is_global=is_global):
            size = 32 if is_global else cfg.sliding_window
            return (GlobalCache if is_global else RingCache)(
                2, cfg.n_kv_heads, size, cfg.head_dim, torch.float32, "cpu"
            )

        mine, ref = new_cache(), new_cache()
        position = 0
        for T in (12, 1, 1, 1):
            x = torch.randn(2, T, cfg.d_model)
            pos = torch.arange(position, position + T)
            rope = rotary(pos, x.dtype)
            expected = cached_attention(attn, x, rope, pos, ref)
            causes = [
                (
                    "the cache's keys are ignored: attend over what cache.update returns",
                    lambda a=attn, x=x, rope=rope, pos=pos: cached_attention(a, x, rope, pos, None),
                )
            ]
            expect_close(
                fn(attn, x, rope, pos, mine),
                expected,
                f"{kind} attention at positions from {position}",
                atol=1e-5,
                causes=causes,
            )
            position += T
    return "local and global layers attend over their cache like gemma_lite.layers.cached_attention"


@check("your cached Gemma")
def check_my_cache(model, static_cls, ring_cls, attend, tokenizer, new_tokens: int = 12) -> str:
    """The capstone: ``model`` with your caches and cached attention chooses the tokens it does without.

    The prompt is longer than the 512-token window, so the ring buffers wrap around.
    """
    cfg = model.cfg
    text = HELDOUT_TEXT.read_text()[:4000]
    ids = torch.tensor([tokenizer.encode(text)[: cfg.sliding_window + 40]])  # (1, 552)
    T = ids.shape[1]
    size = T + new_tokens
    caches = [
        (
            static_cls(1, cfg.n_kv_heads, size, cfg.head_dim, torch.float32, "cpu")
            if cfg.is_global(i)
            else ring_cls(1, cfg.n_kv_heads, cfg.sliding_window, cfg.head_dim, torch.float32, "cpu")
        )
        for i in range(cfg.n_layers)
    ]
    logits = decode_step(model, ids, torch.arange(T), caches, attend)  # (1, V)
    cached = [int(logits[0].argmax())]
    for position in range(T, T + new_tokens - 1):
        step = decode_step(model, torch.tensor([[cached[-1]]]), torch.tensor([position]), caches, attend)
        cached.append(int(step[0].argmax()))
    # Without a cache: one pass over the prompt and the cached tokens; greedy decoding without a
    # cache chooses the same tokens exactly when each position's argmax is the next cached token.
    plain = model(torch.cat([ids, torch.tensor([cached[:-1]])], dim=1))[0, T - 1 :].argmax(-1).tolist()
    first = next((i for i, (a, b) in enumerate(zip(cached, plain, strict=True)) if a != b), None)
    if first is not None:
        raise Mismatch(
            f"new token {first} (position {T + first}) is {tokenizer.decode([cached[first]])!r} with your "
            f"cache but {tokenizer.decode([plain[first]])!r} without it"
            + ("; the prompt's pass differs: look at the ring's prefill" if first == 0 else "")
        )
    return (
        f"after a {T}-token prompt (past the {cfg.sliding_window}-token window) your model with your caches "
        f"chooses the same {new_tokens} tokens as without a cache: {tokenizer.decode(cached)!r}"
    )
