"""Every decode kernel computes the plain product of its format, within that format's rounding."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from helpers import max_abs_diff

from gemma_lite import native
from gemma_lite.gptq import gptq
from gemma_lite.kernels import (
    BF16_ACTIVATIONS,
    COMPILED_ONLY,
    KERNELS,
    dequantize_groups,
    grouped_linear,
    in_row_blocks,
    int4_native,
    matmul,
    pack_int3,
    pack_int4,
    unpack_int3,
    unpack_int4,
    usable,
)
from gemma_lite.quantize import GroupLinear, Int8Linear
from gemma_lite.spqr import SpQRFit, SpQRLinear

SHAPES = [(96, 64), (40, 128)]  # (O, I): whole groups of 16; 40 rows are not whole groups of 16


def quantized_layer(fmt: str, weight: torch.Tensor, dtype: torch.dtype):
    """A layer holding ``weight`` (O, I) in ``fmt`` (groups of 16; SpQR with a few outliers)."""
    if fmt == "int8":
        return Int8Linear(weight, dtype)
    if fmt in ("int4", "int3"):
        return GroupLinear.round_to_nearest(weight, int(fmt[-1]), group_size=16)
    bits = int(fmt[-1])  # spqr3, spqr4
    fit = partial(SpQRFit, bits=bits, threshold=4.0, stat_bits=3, stat_group=16)
    rounded = gptq(weight, torch.eye(weight.shape[1]), fit, 16, act_order=False)
    assert rounded.outliers.any()
    return SpQRLinear(rounded, bits, 16, 3, 16)


def stored_and_weight(fmt: str, out_features: int, in_features: int, dtype: torch.dtype):
    """The stored tensors of a random matrix in ``fmt``, and that matrix as the plain computation sees it."""
    weight = (
        torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(out_features)) * 0.1
    )
    if fmt == "dense":
        weight = weight.to(dtype)
        return (weight,), weight.float()
    layer = quantized_layer(fmt, weight, dtype)
    return layer.stored(), layer.dequantize().to(dtype).float()


def cases():
    for fmt, kernels in KERNELS.items():
        for name in kernels:
            for dtype in (torch.float32, torch.bfloat16):
                marks = [pytest.mark.compile] if name in COMPILED_ONLY else []
                yield pytest.param(fmt, name, dtype, marks=marks, id=f"{fmt}-{name}-{str(dtype)[6:]}")


@torch.no_grad()
@pytest.mark.parametrize("fmt, name, dtype", list(cases()))
def test_every_kernel_agrees_with_the_plain_computation(fmt, name, dtype):
    compiled = name in COMPILED_ONLY
    if name == "native" and not native.available():
        pytest.skip("the AVX2 kernel cannot be built here (no AVX2 or no C++ compiler)")
    assert usable(fmt, name, dtype, torch.device("cpu"), compiled)
    kernel = torch.compile(KERNELS[fmt][name], dynamic=False) if compiled else KERNELS[fmt][name]
    for out_features, in_features in SHAPES:
        stored, weight = stored_and_weight(fmt, out_features, in_features, dtype)
        x = torch.randn(1, in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
        expected = x.float() @ weight.t()  # fp32 product of the very values the kernel holds
        got = kernel(x, *stored)
        assert got.shape == (1, out_features) and got.dtype == dtype
        # each output is a sum of I products: fp32 accumulation differs only in order; bf16 outputs
        # (and bf16-rounded activations) add one rounding of 2**-8 relative to the largest value
        rounds_to_bf16 = dtype == torch.bfloat16 or name in BF16_ACTIVATIONS
        tolerance = 2e-2 * expected.abs().max().item() if rounds_to_bf16 else 1e-5
        assert max_abs_diff(got, expected) <= tolerance, (fmt, name, dtype)


def test_eager_only_kernels_are_not_offered_for_compiled_only_use():
    assert not usable("dense", "reduce", torch.float32, torch.device("cpu"), compiled=False)
    assert usable("dense", "reduce", torch.float32, torch.device("cpu"), compiled=True)
    assert not usable("dense", "gemv", torch.float32, torch.device("meta"), compiled=False)


def test_int4_packing_round_trips_and_puts_the_two_halves_of_a_group_in_one_byte():
    nibbles = torch.randint(0, 16, (5, 12), generator=torch.Generator().manual_seed(0))
    packed = pack_int4(nibbles)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), nibbles.to(torch.uint8))
    assert int(packed[2, 1]) == int(nibbles[2, 1]) + 16 * int(nibbles[2, 7])


def test_int4_dequantizes_each_group_with_its_scale_and_offset():
    nibbles = torch.arange(16).repeat(2, 2)  # (2, 32): two groups of 16 per row
    scale = torch.tensor([[1.0, 2.0], [0.5, 1.0]])
    offset = torch.tensor([[0.0, -1.0], [3.0, 0.0]])
    weight = dequantize_groups(pack_int4(nibbles.view(2, 2, 16)), scale, offset, bits=4)
    assert torch.equal(weight[0, :16], torch.arange(16.0))
    assert torch.equal(weight[0, 16:], 2 * torch.arange(16.0) - 1)
    assert torch.equal(weight[1, :16], 0.5 * torch.arange(16.0) + 3)


def test_int3_packing_stores_8_codes_in_3_bytes_and_round_trips():
    codes = torch.randint(0, 8, (3, 2, 16), generator=torch.Generator().manual_seed(0))
    packed = pack_int3(codes)
    assert packed.shape == (3, 2, 6) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int3(packed), codes.to(torch.uint8))
    # code 5 of 16: low bits in byte 5 % 4 at bits 2-3 (quarter 1),
    # high bit in byte 4 + 5 % 2 at bit 2 (eighth 2)
    low, high = int(packed[1, 0, 1]), int(packed[1, 0, 4 + 1])
    assert (low >> 2) & 3 == int(codes[1, 0, 5]) & 3 and (high >> 2) & 1 == int(codes[1, 0, 5]) >> 2


def test_dequantizing_kernels_work_in_blocks_of_rows_with_the_same_result():
    weight = torch.randn(50, 8)
    x = torch.randn(3, 8)
    assert torch.allclose(in_row_blocks(F.linear, x, weight, rows=16), F.linear(x, weight), atol=1e-6)


def test_longer_inputs_take_the_plain_kernel():
    weight = torch.randn(6, 4)
    x = torch.randn(2, 3, 4)  # prefill-like: 6 rows; "gemv" handles one row only
    assert torch.allclose(matmul("dense", "gemv", x, weight), x @ weight.t(), atol=1e-6)
    assert matmul("dense", "gemv", x[:1, :1], weight).shape == (1, 1, 6)


@torch.no_grad()
@pytest.mark.parametrize("group_size", [16, 32, 64, 8])
def test_the_native_kernel_handles_every_group_size_and_falls_back_below_16(group_size):
    if not native.available():
        pytest.skip("the AVX2 kernel cannot be built here (no AVX2 or no C++ compiler)")
    gen = torch.Generator().manual_seed(group_size)
    layer = GroupLinear.round_to_nearest(torch.randn(300, 640, generator=gen), 4, group_size)
    x = torch.randn(1, 640, generator=gen)
    expected = grouped_linear(x, *layer.stored(), bits=4)
    got = int4_native(x, *layer.stored())
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_the_native_kernel_names_a_wrong_input():
    if not native.available():
        pytest.skip("the AVX2 kernel cannot be built here (no AVX2 or no C++ compiler)")
    layer = GroupLinear.round_to_nearest(torch.randn(32, 64), 4, 16)
    none = torch.empty(0, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="x has 32 entries, the matrix 64"):
        native.grouped_gemv(torch.randn(32), *layer.stored(), none, none, none)


@torch.no_grad()
def test_a_few_rows_times_the_tall_head_agree_with_f_linear_in_every_path():
    """dense_linear's few-row product (2-16 fp32 rows): the native kernel (once loaded), the tall
    matrix's fallback, and torch.compile of it all give F.linear's result."""
    from gemma_lite.kernels import dense_linear, few_rows, few_rows_product

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(70_000, 64, generator=gen)
    compiled = torch.compile(dense_linear, dynamic=False)
    for rows in (2, 5, 16):
        x = torch.randn(rows, 64, generator=gen)
        assert few_rows(x, weight)
        expected = F.linear(x, weight)
        for got in (dense_linear(x, weight), compiled(x, weight), (weight @ x.T).T):
            assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4, rtol=1e-5)
    assert not few_rows(torch.randn(17, 64), weight) and not few_rows(torch.randn(1, 64), weight)
    if native.available():
        assert native.loaded() is not None
        assert torch.allclose(few_rows_product(weight, x), F.linear(x, weight), atol=1e-4, rtol=1e-5)
        with pytest.raises(RuntimeError, match="at most 16 rows, got 17"):
            native.extension().few_rows_gemm(torch.randn(17, 64), weight)
