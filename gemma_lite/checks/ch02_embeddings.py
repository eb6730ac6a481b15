"""Checks of chapter 02 (embeddings and RMSNorm): both modules; for the exercises, one-hot lookup
and cosine neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..layers import RMSNorm, ScaledEmbedding
from .core import (
    Cause,
    Mismatch,
    build_like,
    check,
    expect_close,
    expect_equal,
    likely_cause,
    randomize_norms,
)


@check("ScaledEmbedding")
def check_embedding(cls) -> str:
    """cls(vocab_size, dim): lookup times sqrt(dim), the scale rounded to the weight dtype."""
    V, C = 512, 640  # a real width: sqrt(640) is not a round number in bf16
    ref = ScaledEmbedding(V, C)
    mine = build_like(ref, cls, V, C)
    ids = torch.randint(0, V, (2, 7))
    for dtype, atol in ((torch.float32, 1e-5), (torch.bfloat16, 0.0)):
        ref, mine = ref.to(dtype), mine.to(dtype)
        rows = ref.weight[ids]
        causes = [
            ("the sqrt(d_model) scale is missing", lambda rows=rows: rows),
            ("scaled by d_model instead of sqrt(d_model)", lambda rows=rows: rows * C),
            (
                "the scale is not rounded to the weight dtype: in bf16 sqrt(640) = 25.298 becomes "
                "25.25 (use torch.tensor(scale, dtype=weight.dtype))",
                lambda rows=rows, dtype=dtype: (rows.float() * math.sqrt(C)).to(dtype),
            ),
        ]
        name = "fp32" if dtype == torch.float32 else "bf16"
        expect_close(mine(ids), ref(ids), f"{name} output", atol=atol, rtol=atol, causes=causes)
    return "lookup times sqrt(640), rounded to the weight dtype (fp32 and bf16)"


def _rms_variants(x: torch.Tensor, w: torch.Tensor, eps: float) -> list[Cause]:
    x32, w32 = x.float(), w.float()
    ms = x32.pow(2).mean(-1, keepdim=True)
    normed = x32 * torch.rsqrt(ms + eps)

    def out(t):
        return t.to(x.dtype)

    return [
        (
            "you scaled by w; Gemma scales by (1 + w) (its norm weights are offsets from 1)",
            lambda: out(normed * w32),
        ),
        (
            "eps belongs inside the square root: x / sqrt(mean(x²) + eps)",
            lambda: out(x32 / (ms.sqrt() + eps) * (1 + w32)),
        ),
        ("eps is missing: x / sqrt(mean(x²) + eps)", lambda: out(x32 * torch.rsqrt(ms) * (1 + w32))),
        (
            "you subtracted the mean (that is LayerNorm); RMSNorm only divides by the root mean square",
            lambda: out(F.layer_norm(x32, x32.shape[-1:], eps=eps) * (1 + w32)),
        ),
        (
            "computed in bf16: convert x to fp32 first (x.float()) and cast the result back at the end",
            lambda: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w),
        ),
        (
            "(1 + w) computed in bf16 loses precision: use 1.0 + self.weight.float()",
            lambda: out(normed * (1 + w).float()),
        ),
    ]


@check("RMSNorm")
def check_rmsnorm(cls) -> str:
    """cls(dim) with a ``weight`` of zeros: x / rms(x) * (1 + w), computed in fp32."""
    C, eps = 64, 1e-6
    ref = randomize_norms(RMSNorm(C, eps))
    mine = build_like(ref, cls, C)
    inputs = {
        "fp32 input": torch.randn(2, 5, C) * 3,
        "fp32 input with tiny values": torch.randn(2, 5, C) * 1e-3,
    }
    for what, x in inputs.items():
        causes = _rms_variants(x, ref.weight, eps)
        expect_close(mine(x), ref(x), f"output for {what}", atol=1e-6, rtol=1e-5, causes=causes)

    ref, mine = ref.to(torch.bfloat16), mine.to(torch.bfloat16)
    x = inputs["fp32 input"].to(torch.bfloat16)
    got, expected = mine(x), ref(x)
    causes = _rms_variants(x, ref.weight, eps)
    expect_close(got, expected, "output for a bf16 input", atol=0.0, rtol=2**-7, causes=causes)
    exact = (got == expected).float().mean().item()
    if exact < 0.99:  # within one bf16 step, but rounded differently too often
        cause = likely_cause(got, causes, atol=0.0, rtol=0.0) or "; compute in fp32 and cast back once"
        raise Mismatch(f"bf16 output: only {exact:.0%} of the values equal the reference's" + cause)
    return "matches gemma_lite.layers.RMSNorm on fp32 and bf16 inputs"


@check("embed_by_onehot")
def check_embed_by_onehot(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> str:
    """fn(ids (B, T), weight (V, C)) -> (B, T, C) as one_hot(ids) @ weight."""
    weight = torch.randn(50, 8)
    ids = torch.randint(0, 50, (2, 5))
    expect_close(fn(ids, weight), weight[ids], "embed_by_onehot(ids, weight)", atol=1e-6)
    return "one_hot(ids) @ weight picks the same rows as weight[ids]"


def _neighbours(weight: torch.Tensor, token_id: int, k: int, cosine: bool = True, keep_self: bool = False):
    w = F.normalize(weight, dim=-1) if cosine else weight
    sims = w @ w[token_id]
    if not keep_self:
        sims[token_id] = float("-inf")
    return sims.topk(k).indices.tolist()


@check("cosine_neighbours")
def check_cosine_neighbours(fn) -> str:
    """fn(weight (V, C), token_id, k) -> the k most cosine-similar other tokens, most similar first."""
    weight = torch.randn(200, 16) * torch.rand(200, 1) * 3  # rows of very different lengths
    for token_id in (3, 77):
        got = fn(weight, token_id, 5)
        got = got.tolist() if isinstance(got, torch.Tensor) else list(got)
        causes = [
            (
                "the token itself is always its own nearest neighbour: leave it out",
                lambda t=token_id: _neighbours(weight, t, 5, keep_self=True),
            ),
            (
                "that is the dot product: normalize the rows first for cosine similarity",
                lambda t=token_id: _neighbours(weight, t, 5, cosine=False),
            ),
        ]
        expect_equal(
            got, _neighbours(weight, token_id, 5), f"cosine_neighbours(weight, {token_id}, 5)", causes
        )
    return "ranks tokens by cosine similarity, leaving the token itself out"
