"""Kernel and layout choices for one-token decode steps, picked by measuring.

A decode step multiplies one activation row by every weight matrix once, so it
is bound by how fast the weights stream from memory: the kernel that reads a
matrix fastest wins. Which one that is depends on the machine, the format
(dense fp32/bf16, int8, int4, int3, spqr: ``kernels.py``), the matrix shape, and whether
the step runs eagerly or compiled. So ``optimize_for_decode(model)``:

1. times every kernel of every distinct (format, shape) of the model's weight
   matrices, eagerly and inside ``torch.compile`` (``measure_kernels``), and
   gives each layer the fastest of each;
2. times the dense output head (63 % of the weights) stored row-major and
   column-major too, and keeps the layout whose best kernel is fastest.

Numerics stay the same (fp32 accumulation everywhere; ``packed_mm`` on fp32
models rounds the activations to bf16, see ``kernels.int8_packed_mm``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .kernels import KERNELS, KernelChoice, usable
from .measure import Stopwatch
from .model import Gemma


def kernel_layers(model: nn.Module) -> list[KernelChoice]:
    """Every layer of ``model`` that holds a weight matrix and a kernel choice."""
    return [m for m in model.modules() if isinstance(m, KernelChoice)]


def layer_shape(layer: KernelChoice) -> tuple[str, int, int]:
    """(format, O, I) of a layer's matrix: what its kernels' speed depends on."""
    out_features, in_features = layer.stored()[0].shape[:2]
    return layer.weight_format, out_features, getattr(layer, "in_features", in_features)


def time_calls(candidates: dict[str, Callable[[], object]], rounds: int, device) -> dict[str, float]:
    """Median seconds per call of each candidate; they take turns, ``rounds`` times.

    Memory bandwidth drifts over seconds, and taking turns exposes every
    candidate to it alike. Each timing repeats a call until it has run ~5 ms.
    """
    for fn in candidates.values():
        fn()  # warm-up (and compile)
    repeats = {}
    for name, fn in candidates.items():
        with Stopwatch(device) as watch:
            fn()
        repeats[name] = max(1, min(200, int(0.005 / max(watch.seconds, 1e-7))))
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            with Stopwatch(device) as watch:
                for _ in range(repeats[name]):
                    fn()
            times[name].append(watch.seconds / repeats[name])
    return {name: statistics.median(t) for name, t in times.items()}


def set_embedding_layout(model: Gemma, column_major: bool) -> None:
    """Store the (V, C) embedding row-major or column-major, keeping its values."""
    weight = model.tok_embed.weight
    if (weight.stride(0) == 1) == column_major:
        return
    data = weight.detach().t().contiguous().t() if column_major else weight.detach().contiguous()
    model.tok_embed.weight = nn.Parameter(data, requires_grad=weight.requires_grad)


@dataclass
class ShapeTiming:
    """How fast each kernel streams one (format, shape) of matrix, eager or compiled."""

    fmt: str
    out_features: int
    in_features: int
    compiled: bool
    layers: int  # how many of the model's matrices have this shape
    layout: str  # "row_major", "column_major" (of a dense matrix) or "packed"
    nbytes: int  # stored bytes of one such matrix
    gb_s: dict[str, float] = field(default_factory=dict)  # kernel -> GB/s of stored bytes

    @property
    def best(self) -> str:
        return max(self.gb_s, key=self.gb_s.get)

    def seconds(self, kernel: str | None = None) -> float:
        """Time of one call of ``kernel`` (default: the fastest) on one such matrix."""
        return self.nbytes / self.gb_s[kernel or self.best] / 1e9


def layout_of(layer: KernelChoice) -> str:
    weight = layer.stored()[0]
    if layer.weight_format != "dense":
        return "packed"
    return "column_major" if weight.stride(0) == 1 and weight.shape[1] > 1 else "row_major"


def measure_kernels(
    model: Gemma, compiled: bool, rounds: int = 5, layers: list[KernelChoice] | None = None
) -> list[ShapeTiming]:
    """GB/s of every usable kernel on every distinct (format, shape) of the model's matrices.

    The matrices are the model's own (the head at full size), or only those of
    ``layers``; the input is one random row in the model's dtype. ``compiled=True``
    times each kernel compiled for that shape alone (about a second of compiling
    per kernel and shape on a 2-core CPU).
    """
    by_shape: dict[tuple[str, int, int], list[KernelChoice]] = {}
    for layer in kernel_layers(model) if layers is None else layers:
        by_shape.setdefault(layer_shape(layer), []).append(layer)
    timings = []
    # one compiled graph per kernel and shape: more than Dynamo's default limit per function
    with torch._dynamo.config.patch(recompile_limit=64), torch.inference_mode():
        for (fmt, out_features, in_features), group in by_shape.items():
            stored = group[0].stored()
            x = torch.randn(1, in_features, dtype=model.dtype, device=model.device)
            names = [n for n in KERNELS[fmt] if usable(fmt, n, model.dtype, model.device, compiled)]
            kernels = {n: KERNELS[fmt][n] for n in names}
            if compiled:
                kernels = {n: torch.compile(k, dynamic=False) for n, k in kernels.items()}
            candidates = {n: (lambda k=k, x=x, stored=stored: k(x, *stored)) for n, k in kernels.items()}
            seconds = time_calls(candidates, rounds, model.device)
            nbytes = sum(t.numel() * t.element_size() for t in stored)
            gb_s = {n: nbytes / s / 1e9 for n, s in seconds.items()}
            layout = layout_of(group[0])
            shape = (fmt, out_features, in_features)
            timings.append(ShapeTiming(*shape, compiled, len(group), layout, nbytes, gb_s))
    return timings


def apply_kernels(model: Gemma, timings: list[ShapeTiming]) -> None:
    """Give every layer the fastest kernel measured for its shape and layout (eager and compiled)."""
    best = {((t.fmt, t.out_features, t.in_features), t.layout, t.compiled): t.best for t in timings}
    for layer in kernel_layers(model):
        shape = layer_shape(layer), layout_of(layer)
        layer.eager_kernel = best.get((*shape, False), layer.eager_kernel)
        layer.compiled_kernel = best.get((*shape, True), layer.compiled_kernel)


def set_kernels(model: Gemma, eager: str | None = None, compiled: str | None = None) -> None:
    """Give every layer the named kernel (where its format has one): to compare by hand."""
    for layer in kernel_layers(model):
        if eager in KERNELS[layer.weight_format]:
            layer.eager_kernel = eager
        if compiled in KERNELS[layer.weight_format]:
            layer.compiled_kernel = compiled


@dataclass
class DecodePlan:
    """What ``optimize_for_decode`` measured and chose."""

    head_layout: str  # "row_major" or "column_major" (dense head), "packed" (quantized)
    head_rows: int  # the head's output size (the vocabulary)
    timings: list[ShapeTiming]

    def chosen(self, compiled: bool) -> list[ShapeTiming]:
        """The timings of the layouts the model now has (eager or compiled)."""
        return [
            t
            for t in self.timings
            if t.compiled == compiled and (t.layout == self.head_layout or t.out_features != self.head_rows)
        ]

    def matmul_seconds(self, compiled: bool) -> float:
        """The time the chosen kernels take for one token, each timed on its own."""
        return sum(t.layers * t.seconds() for t in self.chosen(compiled))

    def table(self) -> str:
        """One line per measured (shape, layout, eager/compiled): each kernel's GB/s, the fastest marked *."""
        lines = [f"{'format':<7}{'shape':>14}{'count':>6}  {'layout':<13}{'run':<9}GB/s of each kernel"]
        for t in self.timings:
            speeds = "  ".join(f"{n}{'*' if n == t.best else ''} {v:.1f}" for n, v in t.gb_s.items())
            how = "compiled" if t.compiled else "eager"
            shape = f"{t.out_features} x {t.in_features}"
            lines.append(f"{t.fmt:<7}{shape:>14}{t.layers:>6}  {t.layout:<13}{how:<9}{speeds}")
        lines.append(f"head stored {self.head_layout.replace('_', '-')}")
        return "\n".join(lines)


def optimize_for_decode(
    model: Gemma, compiled: bool = True, rounds: int = 5, row_major_head: bool = False
) -> DecodePlan:
    """Measure, then give the model the fastest layout and kernels; returns what was measured.

    ``compiled=False`` skips the compiled measurements (they compile each kernel
    for each shape). ``row_major_head=True`` keeps the head row-major, the layout
    that passes over several tokens need (speculative decoding's verification).
    On GPUs the library kernels are already right and nothing changes.
    """
    if model.device.type != "cpu":
        return DecodePlan(layout_of(model.tok_embed), model.cfg.vocab_size, [])
    runs = (False, True) if compiled else (False,)
    head = getattr(model.tok_embed, "matrix", model.tok_embed)  # a quantized embedding wraps its matrix
    others = [layer for layer in kernel_layers(model) if layer is not head]
    timings = [t for run in runs for t in measure_kernels(model, run, rounds, others)]
    layouts = ("row_major", "column_major") if isinstance(head, nn.Embedding) else ("packed",)
    if row_major_head and layouts[0] == "row_major":
        layouts = ("row_major",)
    best_speed = {}
    for layout in layouts:
        if layout != "packed":
            set_embedding_layout(model, column_major=layout == "column_major")
        head_timings = [t for run in runs for t in measure_kernels(model, run, rounds, [head])]
        timings += head_timings
        best_speed[layout] = max(head_timings[-1].gb_s.values())  # compiled if measured, else eager
    head_layout = max(best_speed, key=best_speed.get)
    if head_layout != "packed":
        set_embedding_layout(model, column_major=head_layout == "column_major")
    apply_kernels(model, timings)
    return DecodePlan(head_layout, model.cfg.vocab_size, timings)
