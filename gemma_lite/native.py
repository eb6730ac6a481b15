"""Hand-written CPU kernels for grouped 4-bit weights and for a few rows times the head.

``torch.compile`` turns int8 products into loops that stream at the memory's
read bandwidth, but not grouped 4-bit ones: a scale every 16 weights makes
its generated code sum each group across a vector's lanes, and a decode step
with SpQR's groups of 16 then runs slower than bf16. ``csrc/grouped_gemv.cpp``
does what that code cannot: it keeps one vector accumulator per row, scales
each group's products into it, and adds SpQR's sparse corrections in the same
pass. It needs a C++ compiler (the one ``torch.compile`` uses) and a CPU with
AVX2 and FMA; it is built once, in about half a minute, into torch's extension
cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
Where it cannot be built the kernel is simply not offered (``available()``),
and the layers keep their other kernels.

``csrc/few_rows_gemm.cpp`` multiplies 2-16 fp32 rows by an fp32 matrix,
reading it once: speculative decoding's verification pass, whose matrices
the CPU's sgemm reads at a third of the bandwidth for so few rows. It is used once the
module is loaded (``loaded()``); ``SpeculativeGenerator`` loads it.
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("grouped_gemv.cpp", "few_rows_gemm.cpp")]
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]  # OpenMP shares the rows among threads


def cpu_has_avx2() -> bool:
    """Whether PyTorch found AVX2 (or better) on this CPU."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def extension():
    """The compiled module, or None (with a warning saying why) where it cannot be built."""
    if not cpu_has_avx2():
        return None
    from torch.utils.cpp_extension import load

    print("Loading gemma_lite's CPU kernels (built on first use: about 30 s)...", file=sys.stderr, flush=True)
    try:
        return load(
            name="gemma_lite_native",
            sources=[str(s) for s in SOURCES],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, a read-only cache: the other kernels remain
        message = f"gemma_lite's CPU kernels could not be built ({error}); the other kernels remain"
        warnings.warn(message, stacklevel=2)
        return None


def available() -> bool:
    """Whether the kernels can run here (building them on the first call)."""
    return extension() is not None


def loaded():
    """The module if this process has loaded it already, else None (never builds it)."""
    return extension() if extension.cache_info().currsize else None


@torch.library.custom_op("gemma_lite::grouped_gemv", mutates_args=())
def grouped_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    ptr: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """x (I,) fp32 @ grouped 4-bit codes (O, I/G, G/2) with fp16 scale and offset (O, I/G) -> (O,) fp32,
    plus the CSR corrections (ptr (O + 1,) int32, cols int16, values fp16; empty ptr for none).

    A custom op so that torch.compile calls the kernel as it is.
    """
    return extension().grouped_gemv(x, packed, scale, offset, ptr, cols, values)


@grouped_gemv.register_fake
def _(x, packed, scale, offset, ptr, cols, values):
    return x.new_empty(packed.shape[0])
