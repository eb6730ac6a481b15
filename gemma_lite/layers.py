"""The building blocks of Gemma 3, each a small module with its tensor shapes.

Shape letters: B batch, T new tokens in this call, S keys attended to,
C model width (640), H query heads (4), K key/value heads (1), D head dim (256),
F feed-forward width (2048).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import GemmaConfig
from .kernels import KernelChoice


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + w)``, computed in fp32.

    The weight is stored as an offset from 1 (zeros mean "no scaling"), and the
    whole computation runs in fp32 before casting back, as the reference does.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class Linear(KernelChoice, nn.Linear):
    """``nn.Linear`` without bias whose one-row inputs take the measured-fastest kernel.

    x (..., I) -> (..., O). Same parameters and results as ``nn.Linear``; see
    ``kernels.py`` for the kernels and ``fast.py`` for how one is chosen.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x)


class ScaledEmbedding(KernelChoice, nn.Embedding):
    """Token embedding multiplied by sqrt(C), the scale rounded to the weight dtype.

    In bf16 sqrt(640) = 25.298 becomes 25.25; the reference rounds it the same way.
    The rounded values are computed once per float dtype, when ``scale`` is set.
    The same matrix is the output head: ``logits(x)`` = x @ E^T.
    """

    ROUNDED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

    def __init__(self, vocab_size: int, dim: int):
        super().__init__(vocab_size, dim)
        self.scale = math.sqrt(dim)

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale = value
        self._rounded = {
            dtype: torch.tensor(value, dtype=dtype, device="cpu").item() for dtype in self.ROUNDED_DTYPES
        }

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        dtype = self.weight.dtype
        if dtype not in self._rounded:
            raise TypeError(f"ScaledEmbedding needs float weights ({self.ROUNDED_DTYPES}), got {dtype}")
        return super().forward(ids) * self._rounded[dtype]

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, V)
        """The tied output head: x @ E^T."""
        return self.product(x)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings with a given base.

    Local layers use base 10,000 and global layers 1,000,000: a larger base turns
    slower, so far-apart positions stay distinguishable in long contexts.

    ``build_tables(max_len)`` computes cos and sin of positions 0..max_len-1 once
    (fp32, (max_len, D/2) each: 1 MB per 1,024 positions at D = 256); calls with
    ``max_len`` then read rows of them instead of computing. Same values either way.
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None  # fp32 cos, sin (N, D/2)

    def inv_freq(self, device=None) -> torch.Tensor:
        """Angular speed of each of the D/2 rotating pairs: base ** (-2i / D). (D/2,)"""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        return 1.0 / (self.base ** (exponents / self.head_dim))

    def half_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of each position's D/2 angles, fp32: (..., D/2) each."""
        angles = positions.float()[..., None] * self.inv_freq(positions.device)
        return angles.cos(), angles.sin()

    def build_tables(self, max_len: int, device: torch.device | str = "cpu") -> None:
        """Compute and keep the tables of positions 0..max_len-1 (kept if already large enough)."""
        if not self.has_tables(max_len, device):
            self._tables = self.half_tables(torch.arange(max_len, device=device))

    def has_tables(self, max_len: int, device: torch.device | str = "cpu") -> bool:
        cos = None if self._tables is None else self._tables[0]
        return cos is not None and cos.shape[0] >= max_len and cos.device == torch.device(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, max_len: int | None = None):
        """positions (T,) or per row (B, T) -> cos, sin, each (T, D) or (B, 1, T, D).

        With ``max_len`` (every position is below it), the values are read from
        the tables, built on first use (inside a compiled graph: computed instead).
        """
        if max_len is not None and not torch.compiler.is_compiling():
            self.build_tables(max_len, positions.device)
        if max_len is not None and self.has_tables(max_len, positions.device):
            cos, sin = self._tables[0][positions], self._tables[1][positions]  # (..., T, D/2)
        else:
            cos, sin = self.half_tables(positions)
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)  # (..., T, D)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): the same rotation for every head
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (i, i + D/2) of x by its position's angle. x (B, heads, T, D)."""
    return x * cos + rotate_half(x) * sin


@dataclass
class TokenTree:
    """T new tokens that form a tree instead of a sequence (speculative decoding).

    Token i hangs below its parent; ``depth[i]`` is its distance from the root
    (token 0, depth 0), so its position in the text is ``start + depth[i]``
    where ``start`` is the first new slot. ``ancestors[i, j]`` is True when
    token j is token i itself or lies on its path to the root: token i attends
    to the cached context and to those tokens only. A chain (0 -> 1 -> 2 ...)
    is the ordinary causal case.
    """

    depth: torch.Tensor  # (T,) int64
    ancestors: torch.Tensor  # (T, T) bool

    @property
    def size(self) -> int:
        return self.depth.shape[0]


def attention_mask(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    window: int | None = None,
    valid_from: torch.Tensor | None = None,
    tree: TokenTree | None = None,
) -> torch.Tensor:
    """Which keys each query may attend to: True = attend.

    query_pos (T,), key_pos (S,) absolute positions; a key position below 0
    marks an empty cache slot. ``window``: sliding window (a query sees keys
    less than ``window`` positions back). ``valid_from`` (B,): the first real
    (non-padding) position of each row in a left-padded batch. ``tree``: the
    new tokens, stored at slots ``query_pos``, form a tree (``tree_mask``).
    Returns (1 or B, 1, T, S).
    """
    if tree is not None:
        return tree_mask(query_pos, key_pos, tree, window)
    q = query_pos[:, None]  # (T, 1)
    k = key_pos[None, :]  # (1, S)
    allowed = (k <= q) & (k >= 0)  # causal, and only filled slots
    if window is not None:
        allowed = allowed & (q - k < window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if valid_from is not None:
        real_key = k[None, None] >= valid_from[:, None, None, None]  # (B, 1, 1, S)
        # a padding query keeps its own key so that its (ignored) row stays finite
        allowed = allowed & (real_key | (k == q)[None, None])
    return allowed


def causal_mask(T: int) -> torch.Tensor:
    """(T, T) bool for tokens 0..T-1: query q (row) may attend to key k (column) when k <= q."""
    return window_mask(torch.arange(T), torch.arange(T), None)


def sliding_window_mask(T: int, window: int) -> torch.Tensor:
    """(T, T) bool: causal, and query q sees only the ``window`` keys q - window + 1 .. q."""
    return window_mask(torch.arange(T), torch.arange(T), window)


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """(T, S) bool for queries at query_pos (T,) and keys at key_pos (S,); a key at -1 is an empty slot."""
    return attention_mask(query_pos, key_pos, window)[0, 0]


def tree_mask(
    slots: torch.Tensor, key_pos: torch.Tensor, tree: TokenTree, window: int | None = None
) -> torch.Tensor:
    """The mask of a token tree stored at cache slots ``slots`` = start, start + 1, ... (T,).

    A key at a position below ``start`` is context: every token sees it (within
    the window, counted from the token's own position start + depth). A key in
    the new slots is token ``key_pos - start`` of the tree: seen by its
    descendants only. Later slots hold stale keys: hidden. Returns (1, 1, T, S).
    """
    start, T = slots[0], slots.shape[0]
    q = (start + tree.depth)[:, None]  # (T, 1) positions in the text
    k = key_pos[None, :]  # (1, S)
    context = (k >= 0) & (k < start)
    if window is not None:
        context = context & (q - k < window)
    offset = k - start  # (1, S): which tree token a key in the new slots is
    in_tree = (offset >= 0) & (offset < T)
    seen = torch.gather(tree.ancestors, 1, offset.clamp(0, T - 1).expand(T, -1))  # (T, S)
    return (context | (in_tree & seen))[None, None]


def one_query_attention(
    q: torch.Tensor,  # (B, K, G, D): the G query heads of each key/value head, one token
    keys: torch.Tensor,  # (B, K, S, D)
    values: torch.Tensor,  # (B, K, S, D)
    mask: torch.Tensor,  # (B|1, 1, G, S) True = attend
    scale: float,
) -> torch.Tensor:  # (B, K, G, D)
    """softmax(q k^T * scale, masked) v written out, for a single query token.

    The same result as ``F.scaled_dot_product_attention``; for one query row
    per head its blocked CPU kernel spends more time setting up than computing,
    while these three small operations fuse into short loops under torch.compile.
    The softmax runs in fp32, as the reference's eager attention does.
    """
    scores = (q @ keys.transpose(-1, -2)).float() * scale  # (B, K, G, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).to(values.dtype) @ values


class Attention(nn.Module):
    """Grouped-query attention with QK-norm, RoPE, and an optional sliding window."""

    def __init__(self, cfg: GemmaConfig, is_global: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = None if is_global else cfg.sliding_window
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.q_proj = Linear(cfg.d_model, cfg.n_heads * cfg.head_dim)
        self.k_proj = Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim)
        self.v_proj = Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.d_model)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: (T, D)
        input_pos: torch.Tensor,  # (T,)
        cache=None,  # a kv_cache layer cache, or None to attend within x only
        valid_from: torch.Tensor | None = None,  # (B,)
        masks: dict[str, torch.Tensor] | None = None,  # shared by the layers of one pass: see below
        tree: TokenTree | None = None,  # the new tokens form a tree (rope already at their depths)
    ) -> torch.Tensor:  # (B, T, C)
        return cached_attention(self, x, rope, input_pos, cache, valid_from, masks, tree)

    def weights(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], input_pos: torch.Tensor):
        """The attention weights of x over itself, no cache: (B, H, T, T), each row sums to 1 (chapter 4)."""
        q, k, _ = attention_heads(self, x, rope)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, T, D)
        scores = q @ k.transpose(-2, -1) * self.scale  # (B, H, T, T)
        allowed = attention_mask(input_pos, input_pos, self.window)  # (1, 1, T, T)
        return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


def attention_heads(attn: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
    """Queries (B, H, T, D), keys and values (B, K, T, D) of x (B, T, C): QK-norm, then RoPE.

    ``attn`` is any module with Attention's parameters and sizes (yours from exercise 4 too).
    """
    B, T, _ = x.shape
    H, K, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_norm(attn.q_proj(x).view(B, T, H, D)).transpose(1, 2)  # (B, H, T, D)
    k = attn.k_norm(attn.k_proj(x).view(B, T, K, D)).transpose(1, 2)  # (B, K, T, D)
    v = attn.v_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
    return apply_rope(q, *rope), apply_rope(k, *rope), v


def cached_attention(
    attn: nn.Module,  # an Attention, or any module with its parameters, window and scale
    x: torch.Tensor,  # (B, T, C)
    rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: (T, D)
    input_pos: torch.Tensor,  # (T,)
    cache=None,  # a layer cache (update(k, v, input_pos) -> keys, values, key_pos), or None
    valid_from: torch.Tensor | None = None,  # (B,)
    masks: dict[str, torch.Tensor] | None = None,  # shared by the layers of one pass: see below
    tree: TokenTree | None = None,  # the new tokens form a tree (rope already at their depths)
) -> torch.Tensor:  # (B, T, C)
    """Attention of the new tokens x over the cache's keys and their own (exercise 9's piece)."""
    B, T, _ = x.shape
    H, K, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = attention_heads(attn, x, rope)
    if cache is None:
        keys, values, key_pos = k, v, input_pos
    else:
        keys, values, key_pos = cache.update(k, v, input_pos)  # (B, K, S, D), ..., (S,)

    # The G = H / K query heads that share one key/value head are stacked as
    # G*T rows against that head: no copy of the keys, one matmul per group.
    G = H // K
    q = q.reshape(B, K, G * T, D)
    kind = "local" if attn.window is not None else "global"
    mask = None if masks is None else masks.get(kind)
    if mask is None:  # built once per kind: every layer of a kind attends to the same key positions
        mask = attention_mask(input_pos, key_pos, attn.window, valid_from, tree)  # (B|1, 1, T, S)
        mask = mask.repeat(1, 1, G, 1)  # rows ordered (group head, token) like q
        if masks is not None:
            masks[kind] = mask
    if T == 1:  # a decode step: one query row per head
        out = one_query_attention(q, keys, values, mask, attn.scale)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scale)
    out = out.view(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)
    return attn.o_proj(out)


class GeGLU(nn.Module):
    """Gated feed-forward: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = Linear(d_model, d_ff)
        self.up_proj = Linear(d_model, d_ff)
        self.down_proj = Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    """One transformer layer with Gemma's four "sandwich" norms.

    x = x + post_attn_norm(attn(attn_norm(x)))
    x = x + post_ffn_norm(ffn(ffn_norm(x)))
    """

    def __init__(self, cfg: GemmaConfig, layer: int):
        super().__init__()
        self.kind = "global" if cfg.is_global(layer) else "local"
        eps = cfg.rms_norm_eps
        self.attn_norm = RMSNorm(cfg.d_model, eps)
        self.attn = Attention(cfg, is_global=self.kind == "global")
        self.post_attn_norm = RMSNorm(cfg.d_model, eps)
        self.ffn_norm = RMSNorm(cfg.d_model, eps)
        self.ffn = GeGLU(cfg.d_model, cfg.d_ff)
        self.post_ffn_norm = RMSNorm(cfg.d_model, eps)

    def forward(self, x, rope, input_pos, cache=None, valid_from=None, masks=None, tree=None):  # (B, T, C)
        # one expression: the attention output is freed before the feed-forward's peak
        x = x + self.post_attn_norm(
            self.attn(self.attn_norm(x), rope, input_pos, cache, valid_from, masks, tree)
        )
        return x + self.post_ffn_norm(self.ffn(self.ffn_norm(x)))
