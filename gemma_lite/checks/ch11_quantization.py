"""Checks of the chapter 11 exercises (quantization): int4 packing, SpQR's bits per parameter,
one GPTQ column step, and the leave-one-out gain that picks SpQR's outliers."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels import pack_int4
from ..spqr import leave_one_out_gain
from .core import Mismatch, check, expect_close, expect_tensor


def spqr_bits_per_param(bits, group_size, stat_bits, stat_group, outlier_fraction) -> float:
    """Codes, a quantized scale and zero point per group, their fp16 step and start per
    ``stat_group`` groups, and a 16-bit value and column per outlier (row pointers and the
    column order left out)."""
    return bits + 2 * stat_bits / group_size + 2 * 2 * 16 / (group_size * stat_group) + 32 * outlier_fraction


@check("pack_int4 / unpack_int4")
def check_pack_int4(pack: Callable, unpack: Callable | None = None) -> str:
    """pack (..., n) codes 0..15 -> (..., n/2) uint8 as ``kernels.pack_int4``; unpack (if given) goes back."""
    for shape in ((1, 16), (3, 2, 32), (5, 8)):
        codes = torch.randint(0, 16, shape)
        expected = pack_int4(codes)
        half = shape[-1] // 2
        causes = [
            ("the nibbles are swapped: element j goes in the low nibble, j + n/2 in the high one",
             lambda c=codes, h=half: (c[..., h:] | (c[..., :h] << 4)).to(torch.uint8)),
            ("adjacent pairs are packed together; pack element j with element j + n/2 instead",
             lambda c=codes: (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)),
        ]
        got = expect_tensor(pack(codes), f"pack on shape {shape}")
        if got.dtype != torch.uint8:
            raise Mismatch(f"pack returned {got.dtype}: return uint8 bytes (two codes per byte)")
        expect_close(got, expected, f"pack on shape {shape}", atol=0, rtol=0, causes=causes)
        if unpack is not None:
            back = expect_tensor(unpack(expected), f"unpack on shape {shape}").to(torch.uint8)
            expect_close(back, codes.to(torch.uint8), f"unpack on shape {shape}", atol=0, rtol=0)
    return "two codes per byte, the same bytes as gemma_lite" + (", and back" if unpack else "")


@check("spqr_bits_per_param")
def check_spqr_bits(fn: Callable) -> str:
    """fn(bits, group_size, stat_bits, stat_group, outlier_fraction) -> bits per parameter."""
    configs = [(3, 16, 3, 16, 0.01), (4, 16, 3, 16, 0.0), (3, 32, 3, 16, 0.005), (4, 64, 2, 8, 0.02)]
    for config in configs:
        bits, group, stat_bits, stat_group, outliers = config
        expected = spqr_bits_per_param(*config)
        got = fn(*config)
        if not isinstance(got, (int, float)):
            raise Mismatch(f"spqr_bits_per_param{config} returned {type(got).__name__}; return a number")
        if abs(got - expected) <= 1e-9:
            continue
        mistakes = [
            ("the statistics are two per group: a scale and a zero point", expected - stat_bits / group),
            ("the second level is four fp16 numbers per stat_group groups: a step and a start for the "
             "scales, and for the zero points", expected - 2 * 16 / (group * stat_group)),
            ("an outlier costs 32 bits: a 16-bit value and a 16-bit column index", expected - 16 * outliers),
            ("the outliers are missing", expected - 32 * outliers),
        ]
        cause = next((c for c, value in mistakes if abs(got - value) <= 1e-9 and value != expected), None)
        raise Mismatch(
            f"spqr_bits_per_param{config} is {got:.4f}, expected {expected:.4f}"
            + (f"; likely cause: {cause}" if cause else "")
        )
    return (
        "the paper's configuration (3 bits, groups of 16, 3-bit statistics, 1% outliers) stores "
        f"{spqr_bits_per_param(*configs[0]):.3f} bits per parameter"
    )


def _column_step(block, u, i, rounded):
    error = (block[:, i] - rounded) / u[i, i]
    block[:, i:] -= error[:, None] * u[i, i:][None, :]
    return error


@check("gptq_column_step")
def check_gptq_column_step(fn: Callable) -> str:
    """fn(block (O, B), u (B, B), i, rounded (O,)) -> error (O,), updating block[:, i:] in place."""
    b = 8
    x = torch.randn(64, b)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(x.T @ x / 64 + 0.1 * torch.eye(b)))
    u = torch.linalg.cholesky(inverse, upper=True)
    for i in (0, 3, b - 1):
        block = torch.randn(6, b)
        rounded = block[:, i].round()
        expected_block = block.clone()
        expected_error = _column_step(expected_block, u, i, rounded)
        mine = block.clone()
        error = fn(mine, u, i, rounded)
        causes = [
            ("divide the rounding error by u[i, i]", lambda b=block, i=i, r=rounded: b[:, i] - r),
            ("the error is (w - rounded), not (rounded - w)", lambda e=expected_error: -e),
        ]
        expect_close(error, expected_error, f"the error of column {i}", causes=causes)
        if not torch.equal(mine[:, :i], block[:, :i]):
            raise Mismatch(f"columns before {i} changed: they are already rounded; update only block[:, i:]")
        skipped = expected_block.clone()
        skipped[:, i] = block[:, i]
        causes = [
            ("update the block in place (block[:, i:] -= ...)", lambda b=block: b),
            ("update column i too (block[:, i:], not block[:, i + 1:]): it ends at its rounded values",
             lambda s=skipped: s),
        ]
        expect_close(mine, expected_block, f"the block after the step on column {i}", causes=causes)
    return "the error divided by u[i, i], fed forward into the columns after it"


@check("leave_one_out_gain")
def check_leave_one_out_gain(fn: Callable) -> str:
    """fn(w (O, G), d (G,), bits) -> (O, G) as ``spqr.leave_one_out_gain``."""
    w = torch.randn(5, 16)
    w[2, 7] = 6.0  # one weight that stretches its row's grid
    d = torch.rand(16) + 0.5
    expected = leave_one_out_gain(w, d, 3)
    got = expect_tensor(fn(w, d, 3), "your gain")
    causes = [("divide each squared error by d (the inverse-Hessian diagonal)",
               lambda: leave_one_out_gain(w, torch.ones(16), 3))]
    expect_close(got, expected, "your gain", atol=1e-5, rtol=1e-4, causes=causes)
    if int(got[2].argmax()) != 7:
        raise Mismatch("the planted extreme weight should have the largest gain of its row")
    return "the same gain as gemma_lite for every weight, largest for the one that stretches its grid"
