"""Checks of chapter 05 (feed-forward and block): GeGLU and the block; for the exercises, the block's
parameters, the tanh GELU and the block's multiply-adds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..config import GemmaConfig
from ..layers import Block, GeGLU, RotaryEmbedding
from .core import build_like, check, compare_modules, expect_close, expect_equal, randomize_norms


@check("GeGLU")
def check_geglu(cls) -> str:
    """cls(d_model, d_ff): down(gelu_tanh(gate(x)) * up(x))."""
    C, Fw = 64, 128
    ref = GeGLU(C, Fw)
    mine = build_like(ref, cls, C, Fw)
    x = torch.randn(2, 5, C) * 2
    gate, up = ref.gate_proj(x), ref.up_proj(x)
    causes = [
        (
            "GELU approximation: Gemma uses the tanh one, F.gelu(x, approximate='tanh')",
            lambda: ref.down_proj(F.gelu(gate) * up),
        ),
        (
            "gate and up are swapped: GELU goes on gate_proj(x)",
            lambda: ref.down_proj(F.gelu(up, approximate="tanh") * gate),
        ),
        ("SiLU is SwiGLU (Llama); Gemma's GeGLU uses GELU", lambda: ref.down_proj(F.silu(gate) * up)),
        (
            "the gate is missing: multiply by up_proj(x)",
            lambda: ref.down_proj(F.gelu(gate, approximate="tanh")),
        ),
    ]
    expect_close(mine(x), ref(x), "GeGLU output", causes=causes)
    return "down(gelu_tanh(gate(x)) * up(x)) matches gemma_lite.layers.GeGLU"


def _block_variant(ref: Block, x, rope, positions, mode: str) -> torch.Tensor:
    """How Block.forward comes out with a common mistake ("no_post", "norm_after_add", "parallel")."""

    def attn(h):
        return ref.attn(ref.attn_norm(h), rope, positions)

    if mode == "no_post":
        h = x + attn(x)
        return h + ref.ffn(ref.ffn_norm(h))
    if mode == "norm_after_add":
        h = ref.post_attn_norm(x + attn(x))
        return ref.post_ffn_norm(h + ref.ffn(ref.ffn_norm(h)))
    # parallel: both branches read the block input
    return x + ref.post_attn_norm(attn(x)) + ref.post_ffn_norm(ref.ffn(ref.ffn_norm(x)))


@check("Block")
def check_block(cls) -> str:
    """cls(cfg, layer), forward(x (B, T, C), rope, input_pos) -> (B, T, C), sandwich norms."""
    cfg = GemmaConfig.tiny()  # global_every=3: layer 2 is global
    T = 20
    x, positions = torch.randn(2, T, cfg.d_model), torch.arange(T)
    for layer in (0, 2):
        ref = randomize_norms(Block(cfg, layer))
        mine = build_like(ref, cls, cfg, layer)
        base = cfg.rope_global_base if ref.kind == "global" else cfg.rope_local_base
        rope = RotaryEmbedding(cfg.head_dim, base)(positions, x.dtype)
        other = Block(cfg, 1 if ref.kind == "global" else 2)
        other.load_state_dict(ref.state_dict())

        def variant(mode, ref=ref, rope=rope):
            return lambda: _block_variant(ref, x, rope, positions, mode)

        causes = [
            (
                "the post-norms are missing: normalize each branch's output (post_attn_norm, post_ffn_norm) "
                "before adding it to x",
                variant("no_post"),
            ),
            (
                "a norm was applied after the residual add: normalize the branch output, then add",
                variant("norm_after_add"),
            ),
            (
                "the feed-forward must read x after the attention residual, not the block input",
                variant("parallel"),
            ),
            (
                f"layer {layer} is {ref.kind}: use cfg.is_global(layer) to pick the attention kind",
                lambda other=other, rope=rope: other(x, rope, positions),
            ),
        ]
        compare_modules(mine, ref, (x, rope, positions), f"layer {layer} ({ref.kind}) output", causes)
    return "local and global blocks match gemma_lite.layers.Block (four sandwich norms)"


@check("block_parameters")
def check_block_parameters(fn: Callable[[GemmaConfig], int]) -> str:
    """fn(cfg) -> the number of parameters of one Block, counted by hand."""
    for name, cfg in (("tiny", GemmaConfig.tiny()), ("270m", GemmaConfig.gemma3_270m())):
        C, D = cfg.d_model, cfg.head_dim
        expected = sum(p.numel() for p in Block(cfg, 0).parameters())
        causes = [
            (
                "the norms count too: four of width d_model and the two QK-norms of width head_dim",
                lambda e=expected, C=C, D=D: e - 4 * C - 2 * D,
            ),
            ("the QK-norms (q_norm, k_norm: head_dim each) are missing", lambda e=expected, D=D: e - 2 * D),
            (
                "K and V have n_kv_heads × head_dim outputs each, not n_heads × head_dim",
                lambda e=expected, c=cfg: e + 2 * c.d_model * (c.n_heads - c.n_kv_heads) * c.head_dim,
            ),
            ("GeGLU has three matrices: gate, up and down", lambda e=expected, c=cfg: e - c.d_model * c.d_ff),
        ]
        expect_equal(fn(cfg), expected, f"block_parameters({name})", causes)
    return "matches the parameter count of gemma_lite.layers.Block"


@check("gelu_tanh")
def check_gelu_tanh(fn: Callable[[torch.Tensor], torch.Tensor]) -> str:
    """fn(x) -> 0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))."""
    x = torch.linspace(-6, 6, 101)
    causes = [("that is the exact (erf) GELU; write the tanh formula", lambda: F.gelu(x))]
    expect_close(fn(x), F.gelu(x, approximate="tanh"), "gelu_tanh(x)", atol=1e-6, causes=causes)
    return "matches F.gelu(x, approximate='tanh')"


def _block_macs(cfg: GemmaConfig, layer: int, T: int, *, window=True, kv_heads=None, ffn_mats=3, attn=2):
    """Multiply-adds of one block for the last of T tokens, with switches for the usual mistakes."""
    C, H, D = cfg.d_model, cfg.n_heads, cfg.head_dim
    K = kv_heads or cfg.n_kv_heads
    keys = T if (cfg.is_global(layer) or not window) else min(T, cfg.sliding_window)
    projections = C * H * D + 2 * C * K * D + H * D * C  # q, k and v, o
    return projections + attn * H * D * keys + ffn_mats * C * cfg.d_ff


@check("block_macs")
def check_block_macs(fn: Callable[[GemmaConfig, int, int], int]) -> str:
    """fn(cfg, layer, T) -> multiply-adds one block spends on the last of T tokens (norms aside)."""
    real, tiny = GemmaConfig.gemma3_270m(), GemmaConfig.tiny()
    for name, cfg, layer, T in (
        ("270m", real, 0, 100),
        ("270m", real, 0, 4096),
        ("270m", real, 5, 4096),
        ("tiny", tiny, 1, 20),
        ("tiny", tiny, 2, 20),
    ):
        args = (cfg, layer, T)
        causes = [
            (
                "a local layer attends to at most sliding_window keys: min(T, window)",
                lambda a=args: _block_macs(*a, window=False),
            ),
            (
                "the key and value projections have n_kv_heads × head_dim outputs, not n_heads × head_dim",
                lambda a=args: _block_macs(*a, kv_heads=a[0].n_heads),
            ),
            (
                "GeGLU has three matrices (gate, up, down), each d_model × d_ff",
                lambda a=args: _block_macs(*a, ffn_mats=2),
            ),
            (
                "attention over S keys costs H × D × S twice: the scores, then the weighted sum of values",
                lambda a=args: _block_macs(*a, attn=1),
            ),
        ]
        expect_equal(fn(*args), _block_macs(*args), f"block_macs({name}, layer {layer}, T={T})", causes)
    return "projections, attention over the keys in view, and the three GeGLU matrices"
