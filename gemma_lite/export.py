"""Leaving PyTorch: the decode step as a pure function, exported (chapter 13).

    step = ExplicitCacheStep(model, model.new_cache(1, 64))
    program = export_step(step)                         # torch.export: one graph, no Python
    onnx_path = to_onnx(step, "gemma-step.onnx")        # ONNX, run by onnxruntime
    run = greedy_run(OnnxStep(onnx_path), prompt_ids, 16, step.initial_state(), step.max_len)

An exported program is a graph of tensor operations with fixed inputs and
outputs. It keeps no Python state between calls, so the KV cache, which the
package's generator writes in place, becomes explicit: each call receives the
cache as tensors and returns the updated ones. ``ExplicitCacheStep`` is that
function around the package's own ``decode_step`` and caches; every runner
here (eager, exported, onnxruntime, an AOTInductor package, a TorchScript trace) takes
``(token (B, 1), input_pos (1,), *state)`` and returns ``(logits (B, V),
*state)``, so one greedy loop drives them all.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .generate import decode_step
from .kv_cache import KVCache
from .model import Gemma

Step = Callable[..., Sequence[torch.Tensor]]  # (token, input_pos, *state) -> (logits, *state)

#: pip packages of each optional way out of PyTorch
OPTIONAL = {"onnx": ["onnx", "onnxscript", "onnxruntime"], "coreml": ["coremltools"]}


def missing(what: str) -> list[str]:
    """The packages of ``OPTIONAL[what]`` that are not installed (an empty list: all are)."""
    return [name for name in OPTIONAL[what] if importlib.util.find_spec(name) is None]


def require(what: str) -> None:
    """Raise a clear error naming the pip command when ``OPTIONAL[what]``'s packages are missing."""
    if absent := missing(what):
        raise ModuleNotFoundError(
            f"{what} needs the package(s) {', '.join(absent)}: pip install {' '.join(absent)}"
        )


class ExplicitCacheStep(nn.Module):
    """One decode step whose KV cache goes in and comes out as tensors.

    ``forward(token (B, 1), input_pos (1,), *state) -> (logits (B, V), *state)``
    where ``state`` is, for each of the model's layers, its cache's keys and
    values (B, K, S, D) and the position each slot holds (S,): 3 tensors per
    layer, in layer order (``initial_state`` gives an empty one). The inputs
    are not changed: the step writes the new token's key and value into
    copies, through the cache code of chapter 9, and returns the copies.

    What exporting demands, and where this step meets it: fixed shapes (one
    token, a cache of ``max_len`` slots); no Python-side state (the cache is an
    input); no control flow on tensor values (the position is a tensor; the
    masks are computed from it, not branched on).
    """

    def __init__(self, model: Gemma, cache: KVCache):
        super().__init__()
        self.model = model
        self.max_len = cache.max_len
        self.batch = cache.layers[0].k.shape[0]
        self.templates = tuple(cache.layers)  # a tuple: not submodules, their buffers are not weights

    def initial_state(self) -> tuple[torch.Tensor, ...]:
        """An empty cache as explicit state: zero keys and values, ring slots marked empty."""
        empty = KVCache(self.model.cfg, self.batch, self.max_len, self.model.dtype, self.model.device)
        return tuple(t for layer in empty.layers for t in layer.state())

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """The inputs of one call: a token at position 0 and an empty cache."""
        device = self.model.device
        token = torch.zeros(self.batch, 1, dtype=torch.long, device=device)
        return (token, torch.zeros(1, dtype=torch.long, device=device), *self.initial_state())

    def names(self) -> tuple[list[str], list[str]]:
        """Input and output names of the exported graph: token, input_pos, k0, v0, slot_pos0, ..."""
        state = [f"{t}{i}" for i in range(len(self.templates)) for t in ("k", "v", "slot_pos")]
        return ["token", "input_pos", *state], ["logits", *(f"new_{name}" for name in state)]

    def forward(self, token: torch.Tensor, input_pos: torch.Tensor, *state: torch.Tensor):
        caches = [
            layer.over(*(t.clone() for t in state[3 * i : 3 * i + 3]))
            for i, layer in enumerate(self.templates)
        ]
        logits = decode_step(self.model, token, input_pos, caches)  # (B, V); writes the copies
        return (logits, *(t for cache in caches for t in cache.state()))


class FullForward(nn.Module):
    """The whole-sequence forward pass for export: ``input_ids (B, T) -> logits (B, T, V)``.

    The model's input checks read token values (``min``/``max``), which an
    exported graph cannot branch on; here the caller checks its inputs.
    """

    def __init__(self, model: Gemma):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, check_inputs=False)


def export_step(step: ExplicitCacheStep) -> torch.export.ExportedProgram:
    """``torch.export`` of the decode step: one graph for fixed shapes, no Python model code."""
    with torch.no_grad():
        return torch.export.export(step, step.example_inputs())


def export_forward(model: Gemma, max_len: int = 512, example_len: int = 8) -> torch.export.ExportedProgram:
    """``torch.export`` of the full forward for any sequence length from 2 to ``max_len``.

    The length is a symbolic dimension: one graph serves every prompt length
    in the range (length 1 is the decode step's business, exported apart).
    """
    ids = torch.zeros(1, example_len, dtype=torch.long, device=model.device)
    length = torch.export.Dim.DYNAMIC(min=2, max=max_len)
    with torch.no_grad():
        return torch.export.export(FullForward(model), (ids,), dynamic_shapes={"input_ids": {1: length}})


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Silence Python warnings and the named loggers' notes below ERROR while exporting."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    try:
        for name in loggers:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def to_onnx(step: ExplicitCacheStep, path: str | Path) -> Path:
    """Export the decode step to an ONNX file (weights in a ``.data`` file beside it).

    ``torch.onnx.export(..., dynamo=True)`` goes through ``torch.export`` and
    translates the graph's ATen operations to ONNX ones (onnxscript).
    """
    require("onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs, outputs = step.names()
    with torch.no_grad(), quiet("torch.onnx", "onnx_ir", "onnxscript"):  # notes on the exporter's internals
        torch.onnx.export(
            step,
            step.example_inputs(),
            str(path),
            dynamo=True,
            input_names=inputs,
            output_names=outputs,
            external_data=True,
            optimize=True,
            verbose=False,
        )
    return path


class OnnxStep:
    """An ONNX decode step run by onnxruntime, called like ``ExplicitCacheStep`` (CPU tensors)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        require("onnx")
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {path}: export one with gemma_lite.export.to_onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        if len(args) != len(self.inputs):
            raise ValueError(f"this ONNX step takes {len(self.inputs)} inputs, got {len(args)}")
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.inputs, args, strict=True)}
        return [torch.from_numpy(a) for a in self.session.run(None, feeds)]


def aoti_package(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    """Compile an exported program ahead of time into a ``.pt2`` package (AOTInductor).

    The package holds generated C++ (or CUDA) code and the weights; loading it
    needs torch but none of this course's Python code.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet("torch._inductor"):
        return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path)))


def load_aoti(path: str | Path) -> Step:
    """Load an AOTInductor package: a callable with the exported step's inputs and outputs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no AOTInductor package at {path}: make one with gemma_lite.export.aoti_package"
        )
    return torch._inductor.aoti_load_package(str(path))


@dataclass
class StepRun:
    """What ``greedy_run`` produced: the new tokens and how long the steps took."""

    tokens: list[int]
    logits: list[torch.Tensor]  # (V,) of each new token's step
    prefill_s: float
    decode_s: float

    @property
    def decode_tok_s(self) -> float:
        """Decode steps per second (the first new token came from the prompt's last step)."""
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 else float("nan")


def greedy_run(
    step: Step, prompt_ids: Sequence[int], max_new_tokens: int, state: Sequence[torch.Tensor], max_len: int
) -> StepRun:
    """Greedy generation, one token per call of ``step``, the prompt included.

    The prompt goes through the same one-token step, so one exported graph is
    all a deployment needs. ``state`` is the empty cache (``initial_state()``);
    it holds ``max_len`` positions.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token id")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(prompt_ids) + max_new_tokens - 1 > max_len:
        raise ValueError(
            f"{len(prompt_ids)} prompt tokens and {max_new_tokens} new ones need "
            f"{len(prompt_ids) + max_new_tokens - 1} cache positions; this step's cache has {max_len}"
        )
    device = state[0].device

    def call(token: int, position: int):
        out = step(torch.tensor([[token]], device=device), torch.tensor([position], device=device), *state)
        return out[0][0], tuple(out[1:])

    start = time.perf_counter()
    for position, token in enumerate(prompt_ids):
        logits, state = call(token, position)
    prefill_s = time.perf_counter() - start
    tokens, kept = [int(logits.argmax())], [logits]
    start = time.perf_counter()
    for position in range(len(prompt_ids), len(prompt_ids) + max_new_tokens - 1):
        logits, state = call(tokens[-1], position)
        tokens.append(int(logits.argmax()))
        kept.append(logits)
    return StepRun(tokens, kept, prefill_s, time.perf_counter() - start)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|: the largest error in units of the largest logit."""
    reference = reference.float()
    return float((ours.float() - reference).abs().max() / reference.abs().max())


def to_torchscript(step: ExplicitCacheStep) -> tuple[Step | None, str]:
    """Trace the step with TorchScript where this torch still has it, and say its standing.

    Returns the traced step (None where TorchScript is gone) and a sentence:
    torch's own deprecation warning when tracing raises one. A trace records
    the operations of one call, for these shapes.
    """
    if not hasattr(torch.jit, "trace"):
        return None, f"torch {torch.__version__} no longer has TorchScript: use torch.export"
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(step, step.example_inputs(), check_trace=False)
    notes = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    return traced, notes[0] if notes else "torch.jit.trace raised no deprecation warning"


def coreml_status() -> str:
    """Whether a CoreML conversion can run here, and whether its prediction can."""
    if absent := missing("coreml"):
        return f"{', '.join(absent)} is not installed (pip install {' '.join(absent)}): CoreML skipped"
    if platform.system() != "Darwin":
        return "coremltools is installed; running a CoreML model needs macOS: prediction skipped"
    return "coremltools is installed on a Mac: conversion and prediction can run"


def to_coreml(program: torch.export.ExportedProgram, path: str | Path):
    """Convert an exported step to a CoreML ML program (``.mlpackage``) with coremltools.

    Raises ``RuntimeError`` naming the operation coremltools cannot convert.
    """
    require("coreml")
    import coremltools as ct

    try:
        with quiet("coremltools"):
            converted = ct.convert(program.run_decompositions({}), convert_to="mlprogram")
    except NotImplementedError as error:
        raise RuntimeError(f"coremltools {ct.__version__} cannot convert this step: {error}") from error
    converted.save(str(path))
    return converted
