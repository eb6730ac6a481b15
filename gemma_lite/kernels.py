"""Ways to compute ``x @ W^T`` for each weight format; ``fast.py`` picks among them by measuring.

A decode step multiplies one activation row by every weight matrix once, so the
kernel that streams a format's bytes fastest wins. Every kernel here computes
the same product (fp32 accumulation) and takes the stored tensors of its format:

==========  ====================================  ==================================
format      stored tensors                        the plain computation
==========  ====================================  ==================================
dense       weight (O, I), fp32/bf16/fp16         ``F.linear(x, weight)``
int8        q (O, I) int8, scale (O,)             ``F.linear(x, q * scale[:, None])``
int4, int3  packed (O, I/G, G/2 or 3G/8) uint8,   ``F.linear(x, dequantize(...))``
            scale and offset (O, I/G) per group
spqr3/4     decoded to int4's layout, plus        the grouped product plus the sparse one
            corrections in CSR (ptr, row, col, value)
==========  ====================================  ==================================

A grouped weight is ``code * scale + offset`` of its group of G consecutive
weights of a row. int4 packing: byte ``j`` of a group holds its weight ``j`` in
the low nibble and ``j + G/2`` in the high one; int3 packs 8 codes in 3 bytes
(``pack_int3``).

The "reduce" kernels write the product as an elementwise multiply and a sum,
``(x[:, None, :] * w).sum(-1)``. Run eagerly that would build an (N, O, I)
tensor, so they are only used inside ``torch.compile``, which turns them into
one loop that reads each weight byte once and never stores the dequantized
matrix: on a 2-core CPU that streams int8 weights at the memory's read
bandwidth, where the library kernels are slower. Grouped codes defeat it (it
sums each small group across a vector's lanes); their "native" kernel is
written by hand in C++ (``native.py``), for CPUs with AVX2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import native

FORMATS = ("dense", "int8", "int4", "int3", "spqr3", "spqr4")
Kernel = Callable[..., torch.Tensor]


@torch.library.custom_op("gemma_lite::gemv", mutates_args=())
def gemv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight (O, I) @ x (I,) -> (O,), with ATen's matrix-vector kernel.

    A custom op so that torch.compile calls this kernel as it is instead of
    lowering it to its own code.
    """
    return torch.mv(weight, x)


@gemv.register_fake
def _(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return weight.new_empty(weight.shape[0])


@torch.library.custom_op("gemma_lite::few_rows_product", mutates_args=())
def few_rows_product(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x (N, I) @ weight (O, I)^T -> (N, O) for 2-16 fp32 rows: a speculative round's verification pass.

    The CPU's sgemm reads the weight at a third of the memory's bandwidth for so
    few rows. With the native module loaded (``native.loaded()``), its
    ``few_rows_gemm`` reads the weight once for all rows; otherwise a tall matrix
    (the 262,144-row head) goes as (weight @ x^T)^T, 2-3x faster than ``F.linear``.
    A custom op so that torch.compile calls it as it is instead of rewriting it.
    """
    ext = native.loaded()
    if ext is not None and weight.is_contiguous() and x.shape[1] % 8 == 0:
        return ext.few_rows_gemm(x, weight)
    if weight.shape[0] >= 65_536:
        return (weight @ x.T).T.contiguous()
    return F.linear(x, weight)


@few_rows_product.register_fake
def _(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("gemma_lite::materialize", mutates_args=())
def materialize(x: torch.Tensor) -> torch.Tensor:
    """A copy of x that torch.compile cannot fuse away.

    The "reduce" kernels read their input row once per output row. Left to
    itself, Inductor would recompute whatever produced that row (a norm, GeGLU's
    gelu) inside the reduction, once per output row: thousands of times. Passing
    the row through an opaque op makes it compute the row once and store it.
    """
    return x.clone()


@materialize.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


# ---------------------------------------------------------------- dense: weight (O, I)


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The plain computation: (N, I) @ (O, I)^T -> (N, O).

    2-16 fp32 rows on the CPU (a speculative round verifying a few tokens) go
    through ``few_rows_product``: for so few rows the CPU's sgemm path of
    ``F.linear`` is 2-5x slower (measured on the 2-core VMs, the head worst).
    """
    if few_rows(x, weight):
        return few_rows_product(weight, x)
    return F.linear(x, weight)


def few_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """2-16 fp32 rows on the CPU against a row-major fp32 weight (not in an exported graph,
    which holds only PyTorch's own operations and serves any number of rows)."""
    return (
        not torch.compiler.is_exporting()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and 1 < x.shape[0] <= 16
        and weight.stride(1) == 1
    )


def dense_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One row through ATen's matrix-vector kernel: (1, I) -> (1, O)."""
    return gemv(weight, x[0])[None]


def dense_reduce(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Multiply and sum in fp32 (compiled only): (N, I) -> (N, O)."""
    return (materialize(x).float()[:, None, :] * weight.float()).sum(-1).to(x.dtype)


# ---------------------------------------------------------------- int8: q (O, I), scale (O,)


def in_row_blocks(kernel: Kernel, x: torch.Tensor, *stored: torch.Tensor, rows: int = 16_384) -> torch.Tensor:
    """``kernel`` on blocks of ``rows`` weight rows at a time, outputs joined: (N, I) -> (N, O).

    Dequantizing kernels then hold one block's temporary, not the whole matrix's
    (the 262144 x 640 head would need 671 MB in fp32).
    """
    total = stored[0].shape[0]
    if total <= rows:
        return kernel(x, *stored)
    return torch.cat([kernel(x, *(t[i : i + rows] for t in stored)) for i in range(0, total, rows)], dim=-1)


def _int8_block(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The plain computation: dequantize a block of rows at a time and multiply. (N, I) -> (N, O)."""
    return in_row_blocks(_int8_block, x, q, scale)


def int8_reduce(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Sum of x * q in fp32, times the row scale (compiled only). (N, I) -> (N, O)."""
    return ((materialize(x).float()[:, None, :] * q.float()).sum(-1) * scale.float()).to(x.dtype)


def int8_packed_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """ATen's weight-only int8 kernel. (N, I) -> (N, O).

    Its vectorised x86 path takes bf16 activations only (fp32 ones run ten times
    slower), so fp32 activations are rounded to bf16 for it: it then agrees with
    the plain computation to bf16 rounding, not fp32.
    """
    dtype = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
    # Inductor hands this op to ATen and needs its inputs stored, not fused casts
    x_in = x if x.dtype == dtype else materialize(x.to(dtype))
    scale_in = scale if scale.dtype == dtype else materialize(scale.to(dtype))
    return torch._weight_int8pack_mm(x_in, q, scale_in).to(x.dtype)


# ------------------- int4 / int3: codes packed per group (O, I/G, bytes), scale and offset (O, I/G)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(..., n) integers in 0..15 -> (..., n/2) uint8: element j low nibble, element j + n/2 high."""
    half = codes.shape[-1] // 2
    codes = codes.to(torch.uint8)
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., n/2) uint8 -> (..., n) uint8 codes; the inverse of ``pack_int4``."""
    return torch.cat([packed & 15, packed >> 4], dim=-1)


def pack_int3(codes: torch.Tensor) -> torch.Tensor:
    """(..., n) integers in 0..7, n a multiple of 8 -> (..., 3n/8) uint8, exactly 3 bits each.

    Two planes: the low two bits of the four quarters of the n codes share
    n/4 bytes (quarter k at bits 2k, 2k+1), and the high bits of the eight
    eighths share n/8 bytes (eighth k at bit k).
    """
    codes = codes.to(torch.uint8)
    quarters = (codes & 3).unflatten(-1, (4, -1))  # (..., 4, n/4)
    eighths = (codes >> 2).unflatten(-1, (8, -1))  # (..., 8, n/8)
    low = sum(quarters[..., k, :] << (2 * k) for k in range(4))
    high = sum(eighths[..., k, :] << k for k in range(8))
    return torch.cat([low, high], dim=-1).to(torch.uint8)


def unpack_int3(packed: torch.Tensor) -> torch.Tensor:
    """(..., 3n/8) uint8 -> (..., n) uint8 codes; the inverse of ``pack_int3``."""
    n = packed.shape[-1] * 8 // 3
    low, high = packed[..., : n // 4], packed[..., n // 4 :]
    low_bits = torch.cat([(low >> (2 * k)) & 3 for k in range(4)], dim=-1)  # (..., n)
    high_bits = torch.cat([(high >> k) & 1 for k in range(8)], dim=-1)  # (..., n)
    return low_bits | (high_bits << 2)


PACKERS = {4: (pack_int4, unpack_int4), 3: (pack_int3, unpack_int3)}


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) codes in 0..2^bits - 1 -> packed uint8 along the last dimension."""
    return PACKERS[bits][0](codes)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed uint8 -> (..., n) uint8 codes; the inverse of ``pack_codes``."""
    return PACKERS[bits][1](packed)


def dequantize_groups(
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(O, I/G, bytes) packed codes, (O, I/G) scale and offset -> (O, I) weights, computed in fp32."""
    codes = unpack_codes(packed, bits)  # (O, I/G, G)
    weight = codes.float() * scale.float()[..., None] + offset.float()[..., None]
    return weight.flatten(-2).to(dtype)


def grouped_linear(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int
) -> torch.Tensor:
    """The plain computation: dequantize a block of rows at a time and multiply. (N, I) -> (N, O)."""

    def block(x, packed, scale, offset):
        return F.linear(x, dequantize_groups(packed, scale, offset, bits, x.dtype))

    return in_row_blocks(block, x, packed, scale, offset)


def grouped_reduce(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int
) -> torch.Tensor:
    """Each code times its x, summed per group in fp32, then scaled (compiled only). (N, I) -> (N, O).

    sum_j x_j (q_j s + m) = s * sum_j x_j q_j + m * sum_j x_j for each group, so
    the codes are multiplied as they are, and the scale and offset once per group.
    """
    rows, groups, _ = packed.shape
    codes = unpack_codes(packed, bits).float()  # (O, I/G, G)
    xs = materialize(x).float().view(x.shape[0], 1, groups, -1)  # (N, 1, I/G, G)
    dot = (xs * codes).sum(-1)  # (N, O, I/G)
    return (dot * scale.float() + xs.sum(-1) * offset.float()).sum(-1).to(x.dtype)


def int4_linear(x, packed, scale, offset):
    return grouped_linear(x, packed, scale, offset, bits=4)


def int4_reduce(x, packed, scale, offset):
    return grouped_reduce(x, packed, scale, offset, bits=4)


def int3_linear(x, packed, scale, offset):
    return grouped_linear(x, packed, scale, offset, bits=3)


def int3_reduce(x, packed, scale, offset):
    return grouped_reduce(x, packed, scale, offset, bits=3)


def int4_native(x, packed, scale, offset):
    """One row through the hand-written AVX2 kernel (``native.py``), no corrections. (1, I) -> (1, O)."""
    none = torch.empty(0, dtype=torch.int32, device=packed.device)
    return spqr_native(x, packed, scale, offset, none, none, none, none)


# ------ spqr: codes in groups plus a sparse table of corrections. Decoded for speed into int4's
# layout (3-bit codes widened to nibbles, statistics to fp16) with the corrections in CSR:
# ptr (O + 1,) int32, and per correction its row (int32), column (int16) and value (fp16).


def sparse_product(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, out_features: int
):
    """x (N, I) times a sparse (O, I) matrix given as (row, column, value) triples -> (N, O), fp32."""
    contributions = x.float()[:, cols.long()] * values.float()  # (N, nnz)
    return x.new_zeros(x.shape[0], out_features, dtype=torch.float32).index_add_(1, rows, contributions)


def spqr_linear(x, packed, scale, offset, ptr, rows, cols, values):
    """The grouped product plus the corrections. (N, I) -> (N, O)."""
    dense = grouped_linear(x, packed, scale, offset, bits=4)
    return (dense.float() + sparse_product(x, rows, cols, values, packed.shape[0])).to(x.dtype)


def spqr_reduce(x, packed, scale, offset, ptr, rows, cols, values):
    """The same with the grouped part as a compiled reduction."""
    dense = grouped_reduce(x, packed, scale, offset, bits=4)
    return (dense.float() + sparse_product(x, rows, cols, values, packed.shape[0])).to(x.dtype)


def spqr_native(x, packed, scale, offset, ptr, rows, cols, values):
    """Codes and corrections in one pass of the AVX2 kernel (groups of 16+; an empty ``ptr``: no
    corrections). (1, I) -> (1, O)."""
    if packed.shape[-1] % 8:  # groups of 8: the kernel's vectors do not fit
        return spqr_linear(x, packed, scale, offset, ptr, rows, cols, values)
    return native.grouped_gemv(x[0].float(), packed, scale, offset, ptr, cols, values)[None].to(x.dtype)


SPQR_KERNELS = {"linear": spqr_linear, "reduce": spqr_reduce, "native": spqr_native}

# Every kernel of a format, by name; the first is the plain computation.
KERNELS: dict[str, dict[str, Kernel]] = {
    "dense": {"linear": dense_linear, "gemv": dense_gemv, "reduce": dense_reduce},
    "int8": {"linear": int8_linear, "reduce": int8_reduce, "packed_mm": int8_packed_mm},
    "int4": {"linear": int4_linear, "reduce": int4_reduce, "native": int4_native},
    "int3": {"linear": int3_linear, "reduce": int3_reduce},
    "spqr3": SPQR_KERNELS,
    "spqr4": SPQR_KERNELS,
}

# Kernels that build an (N, O, I) temporary when run eagerly: compiled use only.
COMPILED_ONLY = frozenset({"reduce"})
# Kernels that round fp32 activations to bf16 (see ``int8_packed_mm``).
BF16_ACTIVATIONS = frozenset({"packed_mm"})


def usable(fmt: str, name: str, dtype: torch.dtype, device: torch.device, compiled: bool) -> bool:
    """Whether kernel ``name`` of format ``fmt`` can run for this activation dtype and device."""
    if name in COMPILED_ONLY and not compiled:
        return False
    if name == "gemv":
        return device.type == "cpu"  # elsewhere the library's own F.linear is the right call
    if name == "packed_mm":
        return device.type == "cpu"
    if name == "native":
        return device.type == "cpu" and native.available()
    return True


def matmul(fmt: str, kernel: str, x: torch.Tensor, *stored: torch.Tensor) -> torch.Tensor:
    """x (..., I) @ W^T -> (..., O) with the named kernel for one-row inputs, the plain one otherwise.

    ``kernel`` is the choice for a single row (a decode step); longer inputs
    (prefill, training) always take the plain computation.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] != 1:
        kernel = next(iter(KERNELS[fmt]))
    out = KERNELS[fmt][kernel](x2, *stored)
    return out.view(*lead, out.shape[-1])


class KernelChoice:
    """Which kernel one-row inputs take, eagerly and inside ``torch.compile``.

    A mixin for the layers that hold a weight matrix; ``fast.optimize_for_decode``
    sets both names by measuring, per format and shape. Until then: the plain one.
    """

    weight_format = "dense"
    eager_kernel = "linear"
    compiled_kernel = "linear"

    def stored(self) -> tuple[torch.Tensor, ...]:
        """The tensors this layer's format keeps, in the order its kernels take them."""
        return (self.weight,)

    def current_kernel(self) -> str:
        if torch.compiler.is_exporting():  # an exported graph holds PyTorch's own operations only
            return next(iter(KERNELS[self.weight_format]))
        return self.compiled_kernel if torch.compiler.is_compiling() else self.eager_kernel

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., I) @ W^T -> (..., O) with this layer's kernel."""
        return matmul(self.weight_format, self.current_kernel(), x, *self.stored())
