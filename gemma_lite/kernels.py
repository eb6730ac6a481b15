"""Matrix-vector kernels for decode steps (see ``fast.py`` for when they are used)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("gemma_lite::gemv", mutates_args=())
def gemv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight (O, I) @ x (I,) -> (O,), with ATen's matrix-vector kernel.

    A custom op so that torch.compile calls this kernel as it is instead of
    lowering it to its own (slower, for bf16 on CPU) code.
    """
    return torch.mv(weight, x)


@gemv.register_fake
def _(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return weight.new_empty(weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, use_gemv: bool) -> torch.Tensor:
    """x (..., I) @ weight (O, I)^T -> (..., O); one row goes through ``gemv`` if asked."""
    if use_gemv and x.numel() == x.shape[-1]:
        return gemv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)
