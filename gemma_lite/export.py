"""Leaving PyTorch: the decode step as a pure function, exported (chapter 13).

    step = ExplicitCacheStep(model, model.new_cache(1, 64))
    program = export_step(step)                         # torch.export: one graph, no Python
    onnx_path = to_onnx(step, "gemma-step.onnx")        # ONNX, run by onnxruntime
    gen = ExportedGenerator(model, tokenizer, step, OnnxStep(onnx_path))
    gen("The capital of France is", 16).text           # the package's Generator, the ONNX step

An exported program is a graph of tensor operations with fixed inputs and
outputs. It keeps no Python state between calls, so the KV cache, which the
package's generator writes in place, becomes explicit: each call receives the
cache as tensors and returns the updated ones. ``ExplicitCacheStep`` is that
function around the package's own ``decode_step`` and caches; every runner
here (eager, exported, onnxruntime, an AOTInductor package, a TorchScript trace,
Core ML on macOS) takes
``(token (B, 1), input_pos (1,), *state)`` and returns ``(logits (B, V),
*state)``, and ``ExportedGenerator`` drives any of them like the package's
own generator.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import platform
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .generate import Generator, decode_step
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
    """Silence Python warnings, the named loggers' notes below ERROR, and what the exporters
    print to stderr (graph dumps beside their errors) while exporting; errors still raise."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    try:
        for name in loggers:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
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


class ExportedGenerator(Generator):
    """``Generator`` around a step that takes its KV cache as tensors and returns it updated.

    ``run(token (B, 1), input_pos (1,), *state) -> (logits (B, V), *state)`` is the
    ``ExplicitCacheStep`` itself (the default) or any runner made from it: the
    module of its exported program, an ``OnnxStep``, an AOTInductor package, a
    TorchScript trace, a ``CoreMLStep``. The prompt goes through the same one-token step, one
    position at a time, so one exported graph is all a deployment needs; the
    sampling, stopping and timing are ``Generator``'s, so the benchmark times
    every runner like the package's own modes.

    ``build_s``: the seconds it took to make ``run`` (export, compilation), which
    the benchmark reports as its compile time. With ``keep_logits=True`` the
    logits of every chosen token are kept in ``logits`` (V,) (cleared each call).
    """

    def __init__(
        self,
        model: Gemma,
        tokenizer,
        step: ExplicitCacheStep,
        run: Step | None = None,
        *,
        build_s: float = 0.0,
        keep_logits: bool = False,
    ):
        super().__init__(model, tokenizer)
        self.step, self.run, self.build_s = step, run if run is not None else step, build_s
        self.logits: list[torch.Tensor] | None = [] if keep_logits else None

    def cache_for(self, batch: int, length: int) -> ExplicitState:
        if batch != self.step.batch:
            raise ValueError(f"this exported step runs {self.step.batch} prompt(s) at a time, got {batch}")
        if length > self.step.max_len:
            raise ValueError(
                f"the prompt and the new tokens need {length} cache positions; this step's cache has "
                f"{self.step.max_len}: ask for fewer tokens or export a step with a larger cache"
            )
        if self.logits is not None:
            self.logits.clear()
        return ExplicitState(list(self.step.initial_state()), self.step.max_len)

    def advance(self, token: torch.Tensor, position: torch.Tensor, cache: ExplicitState) -> torch.Tensor:
        """One call of the step: token (B, 1) at position (1,) -> logits (B, V); the cache is replaced."""
        logits, *cache.tensors = self.run(token, position.clone(), *cache.tensors)
        return logits

    def keep(self, logits: torch.Tensor) -> torch.Tensor:
        if self.logits is not None:
            self.logits.append(logits[0])
        return logits

    def step_fn(self) -> Callable:
        def one(_model, token, position, cache, _valid_from):
            return self.keep(self.advance(token, position, cache))

        return one

    def last_logits(self, ids, valid_from, cache, check_inputs: bool = True) -> torch.Tensor:
        if cache is None or valid_from is not None:
            raise ValueError("an exported step runs prompts of one length, with its cache")
        for t in range(ids.shape[1]):
            logits = self.advance(ids[:, t : t + 1], torch.tensor([t], device=ids.device), cache)
        return self.keep(logits)


@dataclass
class ExplicitState:
    """The cache of an ``ExportedGenerator``'s generation: the step's state tensors, and their size."""

    tensors: list[torch.Tensor]
    max_len: int


RUNNERS = ("eager", "program", "onnx", "aoti", "torchscript")
"""What ``exported_generator`` can run the step with: the ``ExplicitCacheStep`` itself, its
``torch.export`` program, onnxruntime, an AOTInductor package, a TorchScript trace."""


def exported_generator(
    model: Gemma, tokenizer, runner: str, max_len: int, folder: str | Path
) -> ExportedGenerator:
    """An ``ExportedGenerator`` for one prompt at a time with a cache of ``max_len`` positions,
    its step run by ``runner`` (one of RUNNERS); the files it needs are written in ``folder``.

    Its ``build_s`` is the time the export and compilation took.
    """
    if runner not in RUNNERS:
        raise ValueError(f"unknown runner '{runner}'; choose from {', '.join(RUNNERS)}")
    folder = Path(folder)
    step = ExplicitCacheStep(model, model.new_cache(1, max_len))
    start = time.perf_counter()
    if runner == "eager":
        run: Step = step
    elif runner == "program":
        run = export_step(step).module()
    elif runner == "onnx":
        run = OnnxStep(to_onnx(step, folder / "step.onnx"))
    elif runner == "aoti":
        run = load_aoti(aoti_package(export_step(step), folder / "step.pt2"))
    else:
        traced, standing = to_torchscript(step)
        if traced is None:
            raise RuntimeError(standing)
        run = traced
    return ExportedGenerator(model, tokenizer, step, run, build_s=time.perf_counter() - start)


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
    """Convert an exported step to a CoreML ML program (``.mlpackage``) with coremltools, in fp32.

    The program is first lowered to PyTorch's core ATen operations (``run_decompositions()``):
    coremltools knows those, not every operation an exported graph starts with (the caches'
    ``index_copy`` becomes an ``index_put``). Raises ``RuntimeError`` naming an operation
    coremltools still cannot convert. Running the converted model needs macOS.
    """
    require("coreml")
    with quiet("coremltools"):  # also its import notes: an untested torch version, no runtime off macOS
        import coremltools as ct

        try:
            converted = ct.convert(
                program.run_decompositions(), convert_to="mlprogram", compute_precision=ct.precision.FLOAT32
            )
        except NotImplementedError as error:
            raise RuntimeError(f"coremltools {ct.__version__} cannot convert this step: {error}") from error
    converted.save(str(path))
    return converted


class CoreMLStep:
    """A step converted by ``to_coreml``, run by Core ML, called like ``ExplicitCacheStep``.

    Core ML is part of Apple's systems: elsewhere this raises ``RuntimeError`` saying so.
    The converted model's inputs are the step's, in order (``token``, ``input_pos``,
    ``state_0`` ...), its outputs the logits and the new state, in order.
    """

    def __init__(self, converted):
        if platform.system() != "Darwin":
            raise RuntimeError("running a CoreML model needs macOS: Core ML is part of Apple's systems")
        description = converted.get_spec().description
        self.converted = converted
        self.inputs = [(i.name, i.type.multiArrayType.dataType) for i in description.input]
        self.outputs = [o.name for o in description.output]

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        import coremltools as ct
        import numpy as np

        if len(args) != len(self.inputs):
            raise ValueError(f"this CoreML step takes {len(self.inputs)} inputs, got {len(args)}")
        int32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32
        feeds = {
            name: t.detach().cpu().numpy().astype(np.int32 if kind == int32 else np.float32)
            for (name, kind), t in zip(self.inputs, args, strict=True)
        }
        out = self.converted.predict(feeds)
        return [torch.from_numpy(np.asarray(out[name])) for name in self.outputs]
