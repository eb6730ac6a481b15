"""Where the model runs and in which precision: device and dtype choices, in one place.

    available_devices()            ["cpu", "cuda", "mps"], those this machine has
    resolve_device(None)           cuda, then mps, then cpu; a named device must exist
    default_dtype(device)          fp32 on CPU and MPS, bf16 on CUDA when supported
    resolve_dtype("bf16", device)  a name, a torch.dtype or None -> one of DTYPES
    dtype_name(torch.bfloat16)     "bfloat16", the name the tables and files use
    device_of(model)               where a module's weights live (dtype_of: their dtype)
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = tuple(DTYPES)  # the names shown in menus and tables
_SHORT_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def available_devices() -> list[str]:
    """The device types this machine can run on, cpu first."""
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    return [name for name, ok in available.items() if ok]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` picks cuda, then mps, then cpu. A named device must be available."""
    available = available_devices()
    if device is None:
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if d in available))
    device = torch.device(device)
    if device.type not in available:
        raise RuntimeError(
            f"device '{device}' was requested but is not available on this machine "
            f"(available: {', '.join(available)}). Pass device=None to pick the best available one."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(
            f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU and MPS (exact parity with the reference); bf16 on CUDA when supported."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` -> ``default_dtype(device)``; a name ("bfloat16", "bf16", ...) or a dtype -> that dtype."""
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, str):
        name = _SHORT_NAMES.get(dtype, dtype)
        if name not in DTYPES:
            raise ValueError(f"unknown dtype '{dtype}'; use one of {sorted([*DTYPES, *_SHORT_NAMES])}")
        return DTYPES[name]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's weights live: its first parameter's device."""
    return next(module.parameters()).device


def dtype_of(module: torch.nn.Module) -> torch.dtype:
    """A module's activations' dtype: its first parameter's (the norms', when matrices are quantized)."""
    return next(module.parameters()).dtype
