"""GPTQ: quantize a weight matrix column by column, feeding each column's error forward.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", ICLR 2023, https://arxiv.org/abs/2210.17323

A layer computes y = x W^T. Rounding W to W + dW changes its outputs on the
calibration inputs X (n, I) by X dW^T, whose squared size is
sum over rows of dW H dW^T with H = X^T X / n (I, I). GPTQ rounds one column
at a time and, through the inverse of H, moves the columns not yet rounded to
make up for the error just made. Its practical parts, all here:

* the columns are processed in an order (``act_order``: largest diagonal of H
  first); groups are runs of ``group_size`` columns in that order, and the
  layer stores the order (``perm``) to permute its inputs the same way;
* ``damp`` adds a fraction of H's mean diagonal to it, so that it inverts;
* the updates are made lazily: within a block of ``block_size`` columns at
  once, and to the columns after the block in one matrix product.

What rounds a column is left to a ``GroupFit`` made for each group when its
first column comes up, from the group's current (already updated) weights:
GPTQ's fits a min..max grid (``MinMaxFit``); SpQR's also picks outliers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantize import encode, minmax_grid


class Hessian:
    """Accumulates H = X^T X / n (I, I) in fp32 from a layer's inputs X (..., I)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.matrix = torch.zeros(in_features, in_features, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        self.matrix.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def value(self) -> torch.Tensor:
        return self.matrix / max(self.count, 1)


class GroupFit:
    """How one group of columns is rounded; made from its current weights w (O, G) and
    the inverse-Hessian diagonal d (G,) of its columns."""

    scale: torch.Tensor  # (O,) the group's decoding: code * scale + offset
    offset: torch.Tensor  # (O,)
    outliers: torch.Tensor | None = None  # (O, G) bool: kept exact, not rounded

    def round(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One column w (O,) -> its codes and the values they decode to, (O,) each."""
        codes = encode(w, self.scale, self.offset, self.bits)
        return codes, codes * self.scale + self.offset


class MinMaxFit(GroupFit):
    """GPTQ's grid: each row's min..max of the group in 2^bits - 1 steps (fp16 scale and offset)."""

    def __init__(self, w: torch.Tensor, d: torch.Tensor, bits: int):
        self.bits = bits
        self.scale, self.offset = minmax_grid(w, bits)


@dataclass
class Rounded:
    """A matrix rounded by ``gptq``, in its stored column order."""

    codes: torch.Tensor  # (O, I) uint8
    scale: torch.Tensor  # (O, I/G) fp32
    offset: torch.Tensor  # (O, I/G) fp32
    perm: torch.Tensor  # (I,) the input column of each stored column
    fits: list[GroupFit]  # one per group, in order
    outliers: torch.Tensor  # (O, I) bool
    exact: torch.Tensor  # (O, I) the weights kept exact where ``outliers`` (else 0)
    values: torch.Tensor  # (O, I) what the stored matrix decodes to, fp32


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor U of (H + damp * mean(diag H) * 1)^-1: U^T U = H^-1. (I, I)

    GPTQ's sweep needs, at column i, row i of the inverse Hessian of the columns
    from i on; those are the rows of U divided by their diagonal.
    """
    h = hessian.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    lower = torch.linalg.cholesky(h)
    inverse = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(inverse, upper=True)


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fit,
    group_size: int,
    *,
    act_order: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
) -> Rounded:
    """Round ``weight`` (O, I) with GPTQ; ``fit(w (O, G), d (G,)) -> GroupFit`` rounds each group.

    hessian: (I, I) from the layer's calibration inputs (``Hessian``).
    Returns the codes, the groups' decoding and outliers, all in the processing
    order ``perm`` (identity without ``act_order``).
    """
    out_features, in_features = weight.shape
    if in_features % group_size:
        fits = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
        raise ValueError(
            f"group_size {group_size} must divide the input width {in_features}; try one of {fits}"
        )
    block_size = max(block_size // group_size, 1) * group_size  # whole groups per block
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    dead = h.diagonal() == 0  # inputs that were always zero: any value does
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(in_features)
    w, h = w[:, perm], h[perm][:, perm]
    u = inverse_hessian_factor(h, damp)

    codes = torch.zeros_like(w, dtype=torch.uint8)
    values = torch.zeros_like(w)
    outliers = torch.zeros_like(w, dtype=torch.bool)
    fits: list[GroupFit] = []
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = w[:, start:end].clone()  # (O, B): updated as its columns are rounded
        errors = torch.zeros_like(block)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            if i % group_size == 0:
                group = slice(i, i + group_size)
                fits.append(fit(block[:, group], u_block.diagonal()[group] ** 2))
            g = fits[-1]
            column = block[:, i]
            code, value = g.round(column)
            if g.outliers is not None:
                kept = g.outliers[:, i % group_size]
                value = torch.where(kept, column.half().float(), value)
                outliers[:, start + i] = kept
            codes[:, start + i], values[:, start + i] = code.to(torch.uint8), value
            error = (column - value) / u_block[i, i]  # (O,)
            block[:, i:] -= error[:, None] * u_block[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ u[start:end, end:]  # the block's effect on the columns after it

    scale = torch.stack([g.scale for g in fits], dim=1)  # (O, I/G)
    offset = torch.stack([g.offset for g in fits], dim=1)
    exact = torch.where(outliers, values, torch.zeros_like(values))
    return Rounded(codes, scale, offset, perm, fits, outliers, exact, values)


def relative_output_error(weight: torch.Tensor, values: torch.Tensor, hessian: torch.Tensor) -> float:
    """||X (W - W_q)^T||^2 / ||X W^T||^2 on the calibration inputs, from H alone. Both (O, I), same order."""
    diff = weight.float() - values.float()
    return float((diff @ hessian * diff).sum() / (weight.float() @ hessian * weight.float()).sum())
