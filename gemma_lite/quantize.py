"""Weight-only quantization as module swaps: ``quantize(model, method, **options)``.

Only the weight matrices change; activations, norms and the KV cache keep the
model's dtype. Every ``Linear`` becomes a quantized layer and the tied
embedding/head becomes a ``QuantizedEmbedding`` around one, with real packed
storage, so the model's memory shrinks with its bits per weight. Methods:

* ``int8``: round to nearest, per output channel: ``w = q * scale``, q in -127..127.
* ``int4`` (or ``int3``): round to nearest in groups of ``group_size`` weights of
  a row: ``w = q * scale + offset``, q spanning the group's min..max.
* ``gptq``: the same grouped format (``bits`` 3 or 4), the codes chosen column by
  column with the error fed forward through calibration statistics (``gptq.py``).
* ``spqr``: 3-bit (or 4-bit) codes in groups of 16 whose scales and zero points are
  themselves quantized to 3 bits, plus the few sensitive weights kept in 16-bit
  in a sparse table (``spqr.py``).

``head`` decides the tied embedding/head on its own: "same" (the method's
format), "int8", or "none" (kept in the model's dtype). ``bits_per_param``
counts every stored bit; ``save_quantized`` / ``load(directory)`` keep a
calibrated model so that it is calibrated once.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from .kernels import KernelChoice, dequantize_groups, matmul, pack_codes
from .layers import Linear
from .model import Gemma

METHODS = ("int8", "int4", "int3", "gptq", "spqr")
CALIBRATED = ("gptq", "spqr")
HEAD_CHOICES = ("same", "int8", "none")


class QuantizedLinear(KernelChoice, nn.Module):
    """A (O, I) matrix stored in a quantized format; ``forward`` is x @ W^T, (..., I) -> (..., O).

    The stored columns may be in another order than the input's (GPTQ and SpQR
    quantize the most important columns first): ``perm`` (I,) then says which
    input column each stored column is, and inputs are permuted to match.
    """

    def __init__(self, in_features: int, out_features: int, perm: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("perm", None if perm is None else perm.to(torch.int32))
        inverse = None if perm is None else torch.argsort(perm).to(torch.int32)
        self.register_buffer("inverse_perm", inverse, persistent=False)

    def restore_derived(self) -> None:
        """Recompute the tensors derived from the stored ones (after loading a state dict)."""
        if self.perm is not None:
            self.inverse_perm = torch.argsort(self.perm).to(torch.int32)

    def stored_weight(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weights (O, I), or only the given rows (..., I), in fp32 and in stored column order."""
        raise NotImplementedError

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weights (O, I), or only the given rows (..., I), in fp32, in the input's column order."""
        weight = self.stored_weight(rows)
        return weight if self.perm is None else weight[..., self.inverse_perm]

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x[..., self.perm]
        return matmul(self.weight_format, self.current_kernel(), x, *self.stored())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x)

    def description(self) -> dict:
        """What ``layer_from_description`` needs to rebuild this layer's empty buffers."""
        return {"format": self.weight_format, "in": self.in_features, "out": self.out_features}

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

    def stored_weight(self, rows=None):
        q, scale = (self.q, self.scale) if rows is None else (self.q[rows], self.scale[rows])
        return q.float() * scale.float()[..., None]

    def description(self):
        return {**super().description(), "scale_dtype": str(self.scale.dtype).removeprefix("torch.")}


def check_group_size(group_size: int, in_features: int, bits: int) -> None:
    """A group must hold whole bytes of codes and tile the row."""
    step = 8 if bits == 3 else 2
    if group_size < step or group_size % step or in_features % group_size:
        fits = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0 and g % step == 0]
        raise ValueError(
            f"int{bits} group_size {group_size} must be a multiple of {step} that divides the "
            f"input width {in_features}; try one of {fits}"
        )


def minmax_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset (..., ) that map codes 0..2^bits-1 onto each row's min..max of ``w`` (..., G).

    Both are rounded to fp16, as they are stored, so that codes chosen with
    them decode to exactly the values a stored layer computes.
    """
    low, high = w.amin(-1), w.amax(-1)
    scale = ((high - low) / (2**bits - 1)).half().float().clamp(min=2**-24)  # fp16's smallest step
    return scale, low.half().float()


def encode(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """The nearest code of each weight on the grid ``code * scale + offset``, in 0..2^bits-1."""
    return ((w - offset) / scale).round().clamp(0, 2**bits - 1)


class GroupLinear(QuantizedLinear):
    """3- or 4-bit codes in groups of G weights of a row: w = code * scale + offset.

    packed (O, I/G, G*bits/8) uint8 (``kernels.pack_codes``); scale, offset (O, I/G) fp16.
    Built from codes by GPTQ, or by rounding to nearest (``round_to_nearest``).
    """

    def __init__(self, codes, scale, offset, bits: int, perm: torch.Tensor | None = None):
        out_features, in_features = codes.shape
        group_size = in_features // scale.shape[1]
        check_group_size(group_size, in_features, bits)
        super().__init__(in_features, out_features, perm)
        self.bits, self.group_size = bits, group_size
        self.weight_format = f"int{bits}"
        grouped = codes.view(out_features, -1, group_size)  # (O, I/G, G)
        self.register_buffer("packed", pack_codes(grouped, bits))
        self.register_buffer("scale", scale.to(torch.float16))
        self.register_buffer("offset", offset.to(torch.float16))

    @classmethod
    def round_to_nearest(cls, weight: torch.Tensor, bits: int = 4, group_size: int = 64) -> GroupLinear:
        """Each group's min..max split into 2^bits - 1 steps, each weight to its nearest code."""
        out_features, in_features = weight.shape
        check_group_size(group_size, in_features, bits)
        w = weight.detach().float().view(out_features, -1, group_size)  # (O, I/G, G)
        scale, offset = minmax_grid(w, bits)  # (O, I/G)
        codes = encode(w, scale[..., None], offset[..., None], bits)
        return cls(codes.view(out_features, in_features), scale, offset, bits)

    def stored(self):
        return self.packed, self.scale, self.offset

    def stored_weight(self, rows=None):
        if rows is None:
            return dequantize_groups(self.packed, self.scale, self.offset, self.bits)
        flat = rows.reshape(-1)
        weight = dequantize_groups(self.packed[flat], self.scale[flat], self.offset[flat], self.bits)
        return weight.view(*rows.shape, self.in_features)

    def description(self):
        return {
            **super().description(),
            "bits": self.bits,
            "group_size": self.group_size,
            "permuted": self.perm is not None,
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}"


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


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every weight matrix of the model by name, the tied embedding/head last."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (Linear, QuantizedLinear))}
    embed = model.tok_embed
    layers.pop("tok_embed.matrix", None)
    layers["tok_embed"] = embed.matrix if isinstance(embed, QuantizedEmbedding) else embed
    return layers


def quant_scheme(model: nn.Module) -> str:
    """How a model's weights are stored: "none" (in its dtype) or the method it was quantized with."""
    return getattr(model, "quant_method", "none")


def replace_layer(model: Gemma, name: str, layer: nn.Module) -> None:
    """Put ``layer`` where the weight matrix ``name`` was (``tok_embed``: as the embedding/head)."""
    if name == "tok_embed":
        if not isinstance(layer, QuantizedLinear):  # kept dense
            return
        model.tok_embed = QuantizedEmbedding(layer, model.tok_embed.scale, model.dtype)
        return
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)


def rounded(weight: torch.Tensor, method: str, group_size: int, dtype: torch.dtype) -> QuantizedLinear:
    """One weight matrix (O, I) rounded to nearest in ``method`` ("int8", "int4" or "int3")."""
    if method == "int8":
        return Int8Linear(weight, dtype)
    return GroupLinear.round_to_nearest(weight, int(method[-1]), group_size)


def check_options(method: str, head: str, bits: int | None, group_size: int | None) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose from {', '.join(METHODS)}")
    if head not in HEAD_CHOICES:
        raise ValueError(f"head={head!r}: choose from {', '.join(HEAD_CHOICES)}")
    if bits is not None and method in CALIBRATED and bits not in (3, 4):
        raise ValueError(f"{method} bits={bits}: choose 3 or 4")
    if bits is not None and method not in CALIBRATED:
        raise ValueError(f"{method} fixes its bits; bits= is for gptq and spqr")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be a positive number of weights, got {group_size}")


@torch.no_grad()
def quantize(
    model: Gemma,
    method: str,
    *,
    group_size: int | None = None,
    bits: int | None = None,
    head: str = "same",
    tokenizer=None,
    calibration: torch.Tensor | None = None,
    progress: bool = True,
    **options,
) -> Gemma:
    """Swap every weight matrix of ``model`` for its quantized version, in place; returns the model.

    method: "int8", "int4", "int3" (round to nearest), "gptq" or "spqr" (calibrated).
    group_size: weights per scale and offset (int4/int3/gptq: default 64 / 128; spqr: 16).
    bits: the code width of gptq (3 or 4, default 4) and spqr (3 or 4, default 3).
    head: the tied embedding/head: "same" as the rest, "int8", or "none" (kept dense).
    tokenizer / calibration: gptq and spqr need calibration tokens, (N, T) ids, or a
        tokenizer to read the bundled calibration text (``calibration.py``).
    options: more settings of ``gptq.GPTQ`` / ``spqr.SpQR`` (damp, act_order,
        outlier_threshold, ...).
    """
    check_options(method, head, bits, group_size)
    if quant_scheme(model) != "none":
        raise ValueError("this model is already quantized; load it again to quantize it another way")
    dtype = model.dtype
    layers = weight_layers(model)

    if method in CALIBRATED:
        from .calibration import calibrated_quantize  # the heavy part: only when asked for

        calibrated_quantize(
            model, method, tokenizer, calibration, bits, group_size, head, progress, **options
        )
    else:
        if options:
            raise ValueError(f"{method} takes no options {sorted(options)}; they are for gptq and spqr")
        group_size = group_size or 64
        for name, layer in layers.items():
            if name == "tok_embed" and head == "none":
                continue
            if name == "tok_embed" and head == "int8":
                replace_layer(model, name, Int8Linear(layer.weight, dtype))
            else:
                replace_layer(model, name, rounded(layer.weight, method, group_size, dtype))
            layer.weight = None  # free the dense copy now
    model.quant_method = method
    return model


# ------------------------------------------------------------------ bits per parameter


def buffer_bits(layer: nn.Module) -> int:
    """Bits of every tensor the layer stores (its state dict: weights, scales, offsets, outliers...)."""
    return sum(t.numel() * t.element_size() * 8 for t in layer.state_dict().values())


def bits_per_param(model: nn.Module) -> float:
    """Stored bits of the weight matrices per weight, counted as the SpQR paper counts them.

    Everything a matrix keeps is counted: codes, first- and second-level scales
    and zero points, outlier values with their indices, column orders. The
    norms (0.01 % of the weights) are left out. fp32 gives 32, bf16 16.
    """
    layers = weight_layers(model).values()
    weights = sum(
        layer.out_features * layer.in_features if isinstance(layer, QuantizedLinear) else layer.weight.numel()
        for layer in layers
    )
    return sum(buffer_bits(layer) for layer in layers) / weights


# ------------------------------------------------------------------ saving and loading

QUANT_FILE = "quantization.json"


def save_quantized(model: Gemma, tokenizer, directory: str | Path) -> Path:
    """Write a quantized model to ``directory``: tensors (safetensors), layer formats, tokenizer.

    ``gemma_lite.load(directory)`` reads it back, giving the same logits.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layers = {
        name: layer.description()
        for name, layer in weight_layers(model).items()
        if isinstance(layer, QuantizedLinear)
    }
    meta = {
        "method": quant_scheme(model),
        "config": dataclasses.asdict(model.cfg),
        "dtype": str(model.dtype).removeprefix("torch."),
        "layers": layers,
    }
    (directory / QUANT_FILE).write_text(json.dumps(meta, indent=1))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    tokenizer.save(directory / "tokenizer.json")
    return directory


def is_quantized_dir(path: Path) -> bool:
    return path.is_dir() and (path / QUANT_FILE).is_file()


def empty_layer(description: dict) -> QuantizedLinear:
    """A layer of the described format and shape, its tensors still to be loaded."""
    fmt, rows, cols = description["format"], description["out"], description["in"]
    perm = torch.arange(cols) if description.get("permuted") else None
    if fmt == "int8":
        return Int8Linear(torch.zeros(rows, cols), getattr(torch, description["scale_dtype"]))
    if fmt in ("int4", "int3"):
        bits, group = description["bits"], description["group_size"]
        zeros = torch.zeros(rows, cols // group)
        return GroupLinear(torch.zeros(rows, cols, dtype=torch.uint8), zeros, zeros, bits, perm)
    if fmt in ("spqr3", "spqr4"):
        from .spqr import SpQRLinear

        return SpQRLinear.empty(description)
    raise ValueError(f"unknown layer format {fmt!r} in {QUANT_FILE}")


def load_quantized(directory: Path, device: torch.device, dtype: torch.dtype | None = None) -> Gemma:
    """The model ``save_quantized`` wrote to ``directory``, on ``device``, activations in ``dtype``
    (default: the dtype it was saved with)."""
    from safetensors.torch import load_file

    from .config import GemmaConfig
    from .weights import WeightsError, empty_model

    meta = json.loads((directory / QUANT_FILE).read_text())
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise WeightsError(f"{weights} is missing: save the quantized model again with save_quantized")
    cfg = GemmaConfig(**meta["config"])
    model = empty_model(cfg, torch.device("cpu"), getattr(torch, meta["dtype"]))
    for name, description in meta["layers"].items():
        replace_layer(model, name, empty_layer(description))
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"{weights} does not match {QUANT_FILE}: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "save the quantized model again"
        )
    for layer in weight_layers(model).values():
        if isinstance(layer, QuantizedLinear):
            layer.restore_derived()
    model.quant_method = meta["method"]
    if dtype is not None and dtype != model.dtype:
        set_activation_dtype(model, dtype)
    return model.to(device)


def set_activation_dtype(model: Gemma, dtype: torch.dtype) -> None:
    """Run a quantized model's activations in ``dtype``.

    What is kept in the activations' dtype follows (the norms, matrices kept dense,
    int8 row scales, the embedding's sqrt(C) factor); packed codes and the fp16
    statistics of groups stay as they are.
    """
    for param in model.parameters():
        param.data = param.data.to(dtype)
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.scale = module.scale.to(dtype)
        if isinstance(module, QuantizedEmbedding):
            module.dtype = dtype
            module.scale = torch.tensor(model.cfg.d_model**0.5, dtype=dtype).item()
