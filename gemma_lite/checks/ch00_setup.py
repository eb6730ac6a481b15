"""Checks of chapter 00 (setup): picking a device; for the exercises, bf16 rounding and weight bytes."""

from __future__ import annotations

import struct
from collections.abc import Callable
from unittest import mock

import torch

from .core import Mismatch, check, expect_equal


@check("pick_device")
def check_pick_device(fn: Callable[[], torch.device | str]) -> str:
    """fn() -> the best device: cuda, then mps, then cpu. Tried on four simulated machines."""
    for cuda in (True, False):
        for mps in (True, False):
            with (
                mock.patch("torch.cuda.is_available", return_value=cuda),
                mock.patch("torch.backends.mps.is_available", return_value=mps),
            ):
                got = fn()
            if not isinstance(got, (str, torch.device)):
                raise Mismatch(f"return a torch.device or a name like 'cpu', got {type(got).__name__}")
            got = torch.device(got).type
            expected = "cuda" if cuda else "mps" if mps else "cpu"
            if got != expected:
                machine = f"CUDA {'yes' if cuda else 'no'}, MPS {'yes' if mps else 'no'}"
                raise Mismatch(
                    f"on a machine with {machine} you picked '{got}', expected '{expected}' "
                    "(prefer cuda, then mps, then cpu; ask torch.cuda.is_available() and "
                    "torch.backends.mps.is_available())"
                )
    return "prefers cuda, then mps, then cpu, on all four kinds of machine"


@check("bf16_round")
def check_bf16_round(fn: Callable[[float], float]) -> str:
    """fn(x) -> x rounded to bf16 (x first stored as fp32), by bit manipulation."""
    values = (25.298221281347036, 1.0, 0.1, -3.14159265, 1e-3, 1.00390625, 1.01171875, 65504.0, 3e38)

    def bits(x):
        return struct.unpack("<I", struct.pack("<f", x))[0]

    def from_bits(b):
        return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]

    for x in values:
        expected = torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).item()
        causes = [
            (
                "you cut off the low 16 bits; bf16 rounds to the nearest value",
                lambda x=x: from_bits(bits(x) & 0xFFFF0000),
            ),
            (
                "a tie (low bits exactly 0x8000) rounds to the even neighbour, not up",
                lambda x=x: from_bits((bits(x) + 0x8000) & 0xFFFF0000),
            ),
        ]
        expect_equal(float(fn(x)), expected, f"bf16_round({x!r})", causes)
    return "rounds to nearest, ties to even, like x.to(torch.bfloat16)"


@check("weight_bytes")
def check_weight_bytes(fn: Callable[[int, torch.dtype], int]) -> str:
    """fn(n_params, dtype) -> bytes to store that many values of that dtype."""
    for n, dtype in (
        (268_098_176, torch.float32),
        (268_098_176, torch.bfloat16),
        (268_098_176, torch.float16),
        (1000, torch.int8),
    ):
        size = torch.empty((), dtype=dtype).element_size()
        causes = [("that is bits: divide by 8", lambda n=n, size=size: n * size * 8)]
        expect_equal(fn(n, dtype), n * size, f"weight_bytes({n:_}, {dtype})", causes)
    return "4 bytes per fp32 value, 2 per bf16 and fp16, 1 per int8"
