"""A small reader for GGUF files: metadata, tensor table, and tensors on demand.

GGUF (llama.cpp's format) is one file: a header, key/value metadata (the
config and the tokenizer vocabulary), a table of tensors (name, shape, type,
offset), then the tensor data. This reader parses the first three in plain
Python and maps the data lazily, so opening the file costs almost no memory;
``gguf`` (the reference package) does the dequantization.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
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
