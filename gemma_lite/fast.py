"""Kernel and layout choices for one-token decode steps, picked by measuring.

A decode step multiplies one activation row by every weight matrix once, so it
is bound by memory bandwidth: the kernel that streams the weights fastest wins.
Which one that is depends on the machine and the dtype. On the 2-core AVX-512
CPU this course was built on, for the 262144 x 640 output head:

* fp32: ``x @ E^T`` with E stored column-major beats ``F.linear`` on the usual
  row-major E (about 33 vs 27 GB/s);
* bf16: ``torch.mv`` beats ``F.linear`` (about 28 vs 17 GB/s).

``optimize_for_decode(model)`` times the candidates on a slice of the head and
applies the winner to the whole model: the embedding's memory layout, and a
matrix-vector ("gemv") path in every linear layer. Numerics stay the same
(fp32 accumulation either way); only speed changes.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import gemv, linear
from .measure import Stopwatch
from .model import Gemma


class GemvLinear(nn.Linear):
    """``nn.Linear`` (no bias) that sends single-token inputs through ``gemv``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, use_gemv=True)


def measure_head_kernels(model: Gemma, rows: int = 131_072, rounds: int = 7) -> dict[str, float]:
    """GB/s of each way to compute the output head, timed on its first ``rows`` rows.

    The candidates take turns, ``rounds`` times, and each keeps its median: memory
    bandwidth drifts over seconds, and taking turns exposes all of them to it.
    """
    weight = model.tok_embed.weight.detach()[:rows].contiguous()
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    column_major = weight.t().contiguous().t()
    candidates = {
        "linear": lambda: F.linear(x, weight),
        "linear_column_major": lambda: F.linear(x, column_major),
        "gemv": lambda: gemv(weight, x[0]),
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for fn in candidates.values():
            fn()  # warm-up
        for _ in range(rounds):
            for name, fn in candidates.items():
                with Stopwatch(weight.device) as watch:
                    fn()
                times[name].append(watch.seconds)
    nbytes = weight.numel() * weight.element_size()
    return {name: nbytes / statistics.median(t) / 1e9 for name, t in times.items()}


def set_embedding_layout(model: Gemma, column_major: bool) -> None:
    """Store the (V, C) embedding row-major or column-major, keeping its values."""
    weight = model.tok_embed.weight
    if (weight.stride(0) == 1) == column_major:
        return
    data = weight.detach().t().contiguous().t() if column_major else weight.detach().contiguous()
    model.tok_embed.weight = nn.Parameter(data, requires_grad=weight.requires_grad)


def use_gemv(model: Gemma, enabled: bool = True) -> None:
    """Swap every linear layer for ``GemvLinear`` (or back), and the head too."""
    for module in model.modules():
        if type(module) in (nn.Linear, GemvLinear):
            module.__class__ = GemvLinear if enabled else nn.Linear
    model.head_gemv = enabled


def optimize_for_decode(model: Gemma, choice: str | None = None) -> str:
    """Measure the head kernels (unless ``choice`` is given) and apply the fastest.

    Returns the choice: "linear", "linear_column_major" or "gemv". On GPUs the
    library kernels are already right and nothing changes.
    """
    if model.device.type != "cpu":
        return "linear"
    if choice is None:
        speeds = measure_head_kernels(model)
        choice = max(speeds, key=speeds.get)
    set_embedding_layout(model, column_major=choice == "linear_column_major")
    use_gemv(model, enabled=choice == "gemv")
    return choice
