"""Ways to compute ``x @ W^T`` for each weight format; ``fast.py`` picks among them by measuring.

A decode step multiplies one activation row by every weight matrix once, so the
kernel that streams a format's bytes fastest wins. Every kernel here computes
the same product (fp32 accumulation) and takes the stored tensors of its format:

==========  ====================================  ==================================
format      stored tensors                        the plain computation
==========  ====================================  ==================================
dense       weight (O, I), fp32/bf16/fp16         ``F.linear(x, weight)``
int8        q (O, I) int8, scale (O,)             ``F.linear(x, q * scale[:, None])``
int4        packed (O, I/2) uint8, scale and      ``F.linear(x, dequantize(...))``
            offset (O, I/G) per group of G
==========  ====================================  ==================================

Int4 packing: byte ``j`` of a row holds column ``j`` in its low nibble and
column ``j + I/2`` in its high nibble, so both halves of a row are contiguous
runs of x. A weight is ``nibble * scale + offset`` of its group.

The "reduce" kernels write the product as an elementwise multiply and a sum,
``(x[:, None, :] * w).sum(-1)``. Run eagerly that would build an (N, O, I)
tensor, so they are only used inside ``torch.compile``, which turns them into
one loop that reads each weight byte once and never stores the dequantized
matrix: on a 2-core CPU that streams int8 and int4 weights at the memory's
read bandwidth, where the library kernels are slower or do not exist.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

FORMATS = ("dense", "int8", "int4")
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
    """The plain computation: (N, I) @ (O, I)^T -> (N, O)."""
    return F.linear(x, weight)


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


# -------------------------------------------------- int4: packed (O, I/2), scale and offset (O, I/G)


def pack_int4(nibbles: torch.Tensor) -> torch.Tensor:
    """(O, I) integers in 0..15 -> (O, I/2) uint8: column j low, column j + I/2 high."""
    half = nibbles.shape[-1] // 2
    nibbles = nibbles.to(torch.uint8)
    return nibbles[..., :half] | (nibbles[..., half:] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(O, I/2) uint8 -> (O, I) uint8 nibbles; the inverse of ``pack_int4``."""
    return torch.cat([packed & 15, packed >> 4], dim=-1)


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(O, I/2) nibbles, (O, I/G) scale and offset -> (O, I) weights, computed in fp32, in ``dtype``."""
    rows, groups = scale.shape
    nibbles = unpack_int4(packed).view(rows, groups, -1)  # (O, I/G, G)
    weight = nibbles.float() * scale.float()[..., None] + offset.float()[..., None]
    return weight.view(rows, -1).to(dtype)


def _int4_block(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    return F.linear(x, dequantize_int4(packed, scale, offset, x.dtype))


def int4_linear(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """The plain computation: dequantize a block of rows at a time and multiply. (N, I) -> (N, O)."""
    return in_row_blocks(_int4_block, x, packed, scale, offset)


def int4_reduce(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """Both nibbles of each byte times their x, summed in fp32 (compiled only). (N, I) -> (N, O).

    Needs the group size G to divide I/2, so that each half of a row holds whole groups.
    """
    rows, half = packed.shape
    groups = scale.shape[1]
    g = 2 * half // groups  # group size
    p = packed.view(rows, groups // 2, g)  # (O, I/2G, G)
    s, m = scale.float().view(rows, 2, groups // 2, 1), offset.float().view(rows, 2, groups // 2, 1)
    low = (p & 15).float() * s[:, 0] + m[:, 0]  # (O, I/2G, G): columns 0 .. I/2-1
    high = (p >> 4).float() * s[:, 1] + m[:, 1]  # columns I/2 .. I-1
    xs = materialize(x).float().view(x.shape[0], 1, 2, groups // 2, g)  # (N, 1, 2, I/2G, G)
    return (xs[:, :, 0] * low + xs[:, :, 1] * high).sum((-1, -2)).to(x.dtype)


# Every kernel of a format, by name; the first is the plain computation.
KERNELS: dict[str, dict[str, Kernel]] = {
    "dense": {"linear": dense_linear, "gemv": dense_gemv, "reduce": dense_reduce},
    "int8": {"linear": int8_linear, "reduce": int8_reduce, "packed_mm": int8_packed_mm},
    "int4": {"linear": int4_linear, "reduce": int4_reduce},
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
        return self.compiled_kernel if torch.compiler.is_compiling() else self.eager_kernel

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., I) @ W^T -> (..., O) with this layer's kernel."""
        return matmul(self.weight_format, self.current_kernel(), x, *self.stored())
