"""Weight-only quantization as module swaps: ``quantize(model, "int8")`` or ``"int4"``.

Only the weight matrices change; activations, norms and the KV cache keep the
model's dtype. Every ``Linear`` becomes an ``Int8Linear`` or ``Int4Linear`` and
the tied embedding/head becomes a ``QuantizedEmbedding`` around one of them,
with real packed storage, so the model's memory shrinks with its bytes per weight:

* int8, per output channel: ``w = q * scale``, q in -127..127, one scale per row
  (the largest |w| of the row maps to 127).
* int4, per group of ``group_size`` weights in a row: ``w = q * scale + offset``,
  q in 0..15 spanning the group's min..max, two q per byte.

int8 scales are kept in the model's dtype; int4 scales and offsets in fp16
(a quarter of a bit per weight at group 64, where fp32 would add a half). ``kernels.py`` holds the
ways to multiply by these formats; ``fast.optimize_for_decode`` picks among them.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import KernelChoice, dequantize_int4, pack_int4
from .layers import Linear, ScaledEmbedding
from .model import Gemma

SCHEMES = ("int8", "int4")


class QuantizedLinear(KernelChoice, nn.Module):
    """A (O, I) matrix stored in a quantized format; ``forward`` is x @ W^T, (..., I) -> (..., O)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weights (O, I), or only the given rows (..., I), in fp32."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Linear(QuantizedLinear):
    """int8 weights with one scale per output channel: w (O, I) = q (O, I) * scale (O, 1)."""

    weight_format = "int8"

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype | None = None):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features)
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (O,)
        self.register_buffer("q", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype or weight.dtype))

    def stored(self):
        return self.q, self.scale

    def dequantize(self, rows=None):
        q, scale = (self.q, self.scale) if rows is None else (self.q[rows], self.scale[rows])
        return q.float() * scale.float()[..., None]


class Int4Linear(QuantizedLinear):
    """4-bit weights in groups: w = q * scale + offset, q in 0..15, two per byte.

    packed (O, I/2) uint8; scale, offset (O, I/G) for G = ``group_size``, which
    must divide I/2 (each half of a row, packed low and high nibble, holds whole groups).
    """

    weight_format = "int4"

    def __init__(self, weight: torch.Tensor, group_size: int = 64, dtype: torch.dtype = torch.float16):
        out_features, in_features = weight.shape
        if group_size < 1 or (in_features // 2) % group_size or in_features % 2:
            raise ValueError(
                f"int4 group_size {group_size} must divide half the input width ({in_features} / 2); "
                f"try one of {[g for g in (16, 32, 64, 128, 256) if (in_features // 2) % g == 0]}"
            )
        super().__init__(in_features, out_features)
        self.group_size = group_size
        w = weight.detach().float().view(out_features, -1, group_size)  # (O, I/G, G)
        low, high = w.amin(-1), w.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-12)  # (O, I/G)
        q = ((w - low[..., None]) / scale[..., None]).round().clamp(0, 15).view(out_features, in_features)
        self.register_buffer("packed", pack_int4(q))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("offset", low.to(dtype))

    def stored(self):
        return self.packed, self.scale, self.offset

    def dequantize(self, rows=None):
        if rows is None:
            return dequantize_int4(self.packed, self.scale, self.offset)
        flat = rows.reshape(-1)
        weight = dequantize_int4(self.packed[flat], self.scale[flat], self.offset[flat])
        return weight.view(*rows.shape, self.in_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


class QuantizedEmbedding(nn.Module):
    """The tied embedding/head with its (V, C) matrix quantized.

    ``forward(ids)`` dequantizes the rows of the ids and scales them by sqrt(C)
    rounded to the model dtype, like ``ScaledEmbedding``; ``logits(x)`` is the
    head, x @ E^T, through the quantized matrix's kernels.
    """

    def __init__(self, matrix: QuantizedLinear, scale: float, dtype: torch.dtype):
        super().__init__()
        self.matrix, self.dtype = matrix, dtype
        self.scale = torch.tensor(scale, dtype=dtype).item()  # rounded as ScaledEmbedding rounds it

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return self.matrix.dequantize(ids).to(self.dtype) * self.scale

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, V)
        return self.matrix(x)


def quant_scheme(model: nn.Module) -> str:
    """How a model's weights are stored: "none" (in its dtype), "int8" or "int4"."""
    embed = getattr(model, "tok_embed", None)
    if isinstance(embed, QuantizedEmbedding):
        return embed.matrix.weight_format
    return "none"


def quantized(weight: torch.Tensor, scheme: str, group_size: int, dtype: torch.dtype) -> QuantizedLinear:
    """One weight matrix (O, I) in ``scheme``."""
    if scheme == "int8":
        return Int8Linear(weight, dtype)
    return Int4Linear(weight, group_size)


@torch.no_grad()
def quantize(model: Gemma, scheme: str, group_size: int = 64) -> Gemma:
    """Swap every weight matrix of ``model`` for its ``scheme`` version, in place; returns the model.

    ``scheme``: "int8" (per output channel) or "int4" (``group_size`` weights per
    scale and offset). The embedding, also the output head, is quantized too.
    Each dense weight is freed as soon as its quantized copy exists.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if not isinstance(model.tok_embed, ScaledEmbedding):
        raise ValueError("this model is already quantized; load it again to quantize it another way")
    dtype = model.dtype
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Linear):
                setattr(module, name, quantized(child.weight, scheme, group_size, dtype))
    embed = model.tok_embed
    model.tok_embed = QuantizedEmbedding(
        quantized(embed.weight, scheme, group_size, dtype), embed.scale, dtype
    )
    return model
