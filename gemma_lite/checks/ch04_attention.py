"""Checks of chapter 04 (attention): causal and sliding-window masks, the attention module; for the
exercises, masks over cache slots, grouped attention and the bytes of the KV cache.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GemmaConfig
from ..layers import Attention, RotaryEmbedding, apply_rope, attention_mask, causal_mask, window_mask
from .core import build_like, check, compare_modules, expect_close, expect_equal, expect_mask, randomize_norms


@check("causal_mask")
def check_causal_mask(fn: Callable[[int], torch.Tensor]) -> str:
    """fn(T) -> (T, T) bool, True where query q may attend to key k (k <= q)."""
    for T in (1, 6):
        expected = causal_mask(T)
        causes = [
            ("rows are queries and columns keys: you built the transpose", lambda e=expected: e.T),
            ("a token also attends to itself: key <= query", lambda e=expected: e.tril(-1)),
        ]
        expect_mask(fn(T), expected, f"causal_mask({T})", causes)
    return "each query sees itself and every earlier key"


@check("sliding_window_mask")
def check_sliding_window_mask(fn: Callable[[int, int], torch.Tensor]) -> str:
    """fn(T, window) -> (T, T) bool: causal, and query - key < window."""
    for T, window in ((10, 4), (6, 1), (5, 8)):
        pos = torch.arange(T)
        causes = [
            (
                f"off by one: a window of {window} is the current token and the {window - 1} before it "
                f"(query - key < window); yours lets each query see {window + 1} keys",
                functools.partial(_window_variant, pos, pos, window, shift=1),
            ),
            (
                f"off by one: a window of {window} lets a query see {window} keys, itself included",
                functools.partial(_window_variant, pos, pos, window, shift=-1),
            ),
            (
                "not causal: the window must not reach future keys",
                functools.partial(lambda p, w: (p[:, None] - p[None, :]).abs() < w, pos, window),
            ),
            (
                "rows are queries and columns keys: you built the transpose",
                functools.partial(lambda p, w: _window_variant(p, p, w).T, pos, window),
            ),
        ]
        expected = window_mask(pos, pos, window)
        expect_mask(fn(T, window), expected, f"sliding_window_mask({T}, {window})", causes)
    return "causal, and each query sees exactly `window` keys (itself included)"


def _window_variant(query_pos, key_pos, window, *, skip_empty=True, shift=0) -> torch.Tensor:
    """attention_mask with switches for the usual mistakes. (T, S) bool."""
    q, k = query_pos[:, None], key_pos[None, :]
    allowed = k <= q
    if skip_empty:
        allowed = allowed & (k >= 0)
    if window is not None:
        allowed = allowed & (q - k < window + shift)
    return allowed


def _naive_attention(
    ref: Attention,
    x,
    rope,
    positions,
    *,
    window="same",
    scale=None,
    qk_norm=True,
    kv_heads="interleave",
    rope_first=False,
) -> torch.Tensor:
    """Attention written out plainly, with switches for the usual mistakes. x (B, T, C) -> (B, T, C)."""
    B, T, _ = x.shape
    H, K, D = ref.n_heads, ref.n_kv_heads, ref.head_dim
    window = ref.window if window == "same" else window
    q = ref.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    k = ref.k_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
    v = ref.v_proj(x).view(B, T, K, D).transpose(1, 2)
    norm_q, norm_k = (ref.q_norm, ref.k_norm) if qk_norm else (nn.Identity(), nn.Identity())
    if rope_first:
        q, k = norm_q(apply_rope(q, *rope)), norm_k(apply_rope(k, *rope))
    else:
        q, k = apply_rope(norm_q(q), *rope), apply_rope(norm_k(k), *rope)
    expand = torch.repeat_interleave if kv_heads == "interleave" else (lambda t, n, dim: t.repeat(1, n, 1, 1))
    k, v = expand(k, H // K, dim=1), expand(v, H // K, dim=1)  # (B, H, T, D)
    scores = q @ k.transpose(-1, -2) * (ref.scale if scale is None else scale)  # (B, H, T, T)
    allowed = attention_mask(positions, positions, window)
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v  # (B, H, T, D)
    return ref.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


@check("Attention")
def check_attention(cls) -> str:
    """cls(cfg, is_global), forward(x (B, T, C), rope=(cos, sin), input_pos (T,)) -> (B, T, C)."""
    cfg = GemmaConfig.tiny()  # 4 query heads share 2 KV heads; window 8
    T = 20
    x, positions = torch.randn(2, T, cfg.d_model), torch.arange(T)
    for is_global in (False, True):
        kind = "global" if is_global else "local"
        ref = randomize_norms(Attention(cfg, is_global))
        mine = build_like(ref, cls, cfg, is_global)
        base = cfg.rope_global_base if is_global else cfg.rope_local_base
        rope = RotaryEmbedding(cfg.head_dim, base)(positions, x.dtype)

        def variant(ref=ref, rope=rope, **change):
            return lambda: _naive_attention(ref, x, rope, positions, **change)

        causes = [
            ("the local layer ignores the sliding window", variant(window=None)),
            ("a global layer must not use the sliding window", variant(window=cfg.sliding_window)),
            ("QK-norm is missing: apply q_norm and k_norm to each head before RoPE", variant(qk_norm=False)),
            ("QK-norm goes before RoPE, not after", variant(rope_first=True)),
            (
                f"scale: Gemma scales scores by query_pre_attn_scalar ** -0.5 "
                f"({cfg.query_pre_attn_scalar:g} ** -0.5), not head_dim ** -0.5",
                variant(scale=cfg.head_dim**-0.5),
            ),
            (
                "query heads 0..G-1 share KV head 0: expand KV heads with repeat_interleave, not repeat",
                variant(kv_heads="tile"),
            ),
        ]
        compare_modules(mine, ref, (x, rope, positions), f"{kind} attention output", causes)
    return "local (sliding window) and global layers match gemma_lite.layers.Attention (GQA, QK-norm)"


@check("window_mask")
def check_window_mask(fn) -> str:
    """fn(query_pos (T,), key_pos (S,), window or None) -> (T, S) bool; key_pos -1 marks an empty slot."""
    cases = (
        (torch.tensor([10, 11, 12]), torch.tensor([8, 9, 10, 11, 12, 5, 6, 7]), 4),  # a ring of 8 slots
        (torch.tensor([2]), torch.tensor([0, 1, 2, -1, -1, -1]), 4),  # a cache still filling up
        (torch.tensor([3, 4]), torch.tensor([0, 1, 2, 3, 4, -1]), None),  # a global layer
    )
    for query_pos, key_pos, window in cases:
        slots = torch.arange(len(key_pos))
        causes = [
            (
                "empty slots (position -1) must never be attended",
                lambda q=query_pos, k=key_pos, w=window: _window_variant(q, k, w, skip_empty=False),
            ),
            (
                "compare positions, not slot indices: slot i holds position key_pos[i]",
                lambda q=query_pos, w=window, s=slots: _window_variant(q, s, w),
            ),
            (
                "off by one: a query sees keys with query - key < window",
                lambda q=query_pos, k=key_pos, w=window: _window_variant(q, k, w, shift=1),
            ),
        ]
        what = f"window_mask({query_pos.tolist()}, {key_pos.tolist()}, {window})"
        expect_mask(fn(query_pos, key_pos, window), window_mask(query_pos, key_pos, window), what, causes)
    return "works on any positions: ring slots, empty slots and global layers"


def _grouped_sdpa(q, k, v, mask, scale):
    """The package's way: G query heads stacked as G*T rows against their KV head."""
    B, H, T, D = q.shape
    K = k.shape[1]
    out = F.scaled_dot_product_attention(
        q.reshape(B, K, H // K * T, D), k, v, attn_mask=mask.repeat(H // K, 1), scale=scale
    )
    return out.view(B, H, T, D)


@check("grouped_attention")
def check_grouped_attention(fn) -> str:
    """fn(q (B, H, T, D), k, v (B, K, S, D), mask (T, S) bool, scale) -> (B, H, T, D)."""
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = window_mask(torch.arange(2, 7), torch.arange(7), 3)
    scale = 0.3

    def plain(kv_map, use_mask=True, s=scale):
        kk, vv = kv_map(k), kv_map(v)
        scores = q @ kk.transpose(-1, -2) * s
        if use_mask:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1) @ vv

    causes = [
        (
            "consecutive query heads form a group: heads 0 and 1 share KV head 0, not heads 0 and 2 "
            "(view q as (B, K, G, T, D), or use repeat_interleave, not repeat)",
            lambda: plain(lambda t: t.repeat(1, 2, 1, 1)),
        ),
        ("the mask is not applied", lambda: plain(lambda t: t.repeat_interleave(2, 1), use_mask=False)),
        ("the scores must be multiplied by scale", lambda: plain(lambda t: t.repeat_interleave(2, 1), s=1.0)),
    ]
    expect_close(
        fn(q, k, v, mask, scale),
        _grouped_sdpa(q, k, v, mask, scale),
        "grouped_attention output",
        causes=causes,
    )
    return "each group of query heads attends with its own KV head, like the package"


def _kv_bytes(cfg: GemmaConfig, context: int, dtype: torch.dtype, all_global=False, heads=None, tensors=2):
    size = torch.empty((), dtype=dtype).element_size()
    per_pos = tensors * (heads or cfg.n_kv_heads) * cfg.head_dim * size
    kept = [
        context if (all_global or cfg.is_global(i)) else min(context, cfg.sliding_window)
        for i in range(cfg.n_layers)
    ]
    return per_pos * sum(kept)


@check("kv_cache_bytes")
def check_kv_cache_bytes(fn) -> str:
    """fn(cfg, context, dtype) -> bytes of keys and values all layers keep for ``context`` tokens."""
    real, tiny = GemmaConfig.gemma3_270m(), GemmaConfig.tiny()
    for cfg, context, dtype in (
        (real, 100, torch.bfloat16),
        (real, 32_768, torch.bfloat16),
        (real, 512, torch.float32),
        (tiny, 20, torch.float32),
    ):
        causes = [
            (
                "local layers keep only the last sliding_window positions: min(context, window)",
                lambda c=cfg, t=context, d=dtype: _kv_bytes(c, t, d, all_global=True),
            ),
            (
                "keys and values: two tensors per layer",
                lambda c=cfg, t=context, d=dtype: _kv_bytes(c, t, d, tensors=1),
            ),
            (
                "the cache stores n_kv_heads heads (GQA), not n_heads",
                lambda c=cfg, t=context, d=dtype: _kv_bytes(c, t, d, heads=c.n_heads),
            ),
        ]
        name = "270m" if cfg == real else "tiny"
        expect_equal(
            fn(cfg, context, dtype),
            _kv_bytes(cfg, context, dtype),
            f"kv_cache_bytes({name}, {context}, {dtype})",
            causes,
        )
    return "2 × K × D × bytes per position, full context for global layers, the window for local ones"
