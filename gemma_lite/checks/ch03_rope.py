"""Checks of chapter 03 (RoPE): the rotation; for the exercises, its complex form, the wavelengths
and the rotation matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..layers import RotaryEmbedding, apply_rope
from .core import Cause, Mismatch, check, expect_close, expect_tensor


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x (B, H, T, D) by positions (T,) times inv_freq (D/2,)."""
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return apply_rope(x, angles.cos().to(x.dtype), angles.sin().to(x.dtype))


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    return apply_rope(x, *RotaryEmbedding(x.shape[-1], base)(positions, x.dtype))


def _rope_interleaved(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """The other RoPE convention: rotate neighbours (2i, 2i + 1)."""
    angles = positions.float()[:, None] * RotaryEmbedding(x.shape[-1], base).inv_freq()[None, :]
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def _rope_causes(x: torch.Tensor, positions: torch.Tensor, base: float) -> list[Cause]:
    D = x.shape[-1]
    other = 1_000_000.0 if base == 10_000.0 else 10_000.0
    return [
        (
            f"wrong base: you rotated with base {other:,.0f} where {base:,.0f} was asked",
            lambda: _rope(x, positions, other),
        ),
        (
            "positions ignored: rotate by the positions given, not by 0..T-1",
            lambda: _rope(x, torch.arange(x.shape[-2]), base),
        ),
        (
            "Gemma pairs dimension i with i + D/2 (rotate_half), not neighbours 2i and 2i + 1",
            lambda: _rope_interleaved(x, positions, base),
        ),
        (
            "rotated the wrong way: rotate_half(x) is (-x2, x1), not (x2, -x1)",
            lambda: _rope(x, -positions, base),
        ),
        (
            "frequencies: inv_freq = base ** (-2i / D) for i = 0 .. D/2 - 1",
            lambda: _rotate(x, positions, base ** (-torch.arange(D // 2).float() / D)),
        ),
    ]


def _rope_cases():
    x = torch.randn(2, 3, 6, 16)  # (B, H, T, D)
    for base in (10_000.0, 1_000_000.0):
        for positions in (torch.arange(6), torch.tensor([3, 4, 5, 40, 41, 200])):
            yield x, positions, base


def _compare_rotations(fn) -> None:
    """fn's rotations against gemma_lite.layers' on every case of ``_rope_cases``."""
    for x, positions, base in _rope_cases():
        expect_close(
            fn(x, positions, base),
            _rope(x, positions, base),
            f"rotated x (base {base:,.0f}, positions {positions.tolist()})",
            causes=_rope_causes(x, positions, base),
        )


@check("rope")
def check_rope(fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> str:
    """fn(x (B, H, T, D), positions (T,), base) -> x rotated, as gemma_lite.layers does it."""
    _compare_rotations(fn)
    return "rotations match gemma_lite.layers for both bases (10,000 and 1,000,000)"


@check("rope_complex")
def check_rope_complex(fn) -> str:
    """fn(x (B, H, T, D), positions (T,), base) -> rotated x, computed with complex numbers."""
    _compare_rotations(fn)
    return "complex multiplication gives the same rotation as rotate_half"


@check("wavelengths")
def check_wavelengths(fn: Callable[[int, float], torch.Tensor]) -> str:
    """fn(head_dim, base) -> (D/2,) tokens per full turn of each rotating pair."""
    for D, base in ((256, 10_000.0), (256, 1_000_000.0), (16, 10_000.0)):
        inv_freq = RotaryEmbedding(D, base).inv_freq()
        causes = [
            ("a full turn is 2π radians: wavelength = 2π / inv_freq", lambda f=inv_freq: 1 / f),
            ("that is the angular speed; the wavelength is its inverse times 2π", lambda f=inv_freq: f),
        ]
        expect_close(
            fn(D, base), 2 * math.pi / inv_freq, f"wavelengths({D}, {base:,.0f})", rtol=1e-4, causes=causes
        )
    return "wavelength = 2π / inv_freq, from 2π tokens up to about 2π × base"


@check("rope_matrix")
def check_rope_matrix(fn: Callable[[int, int, float], torch.Tensor]) -> str:
    """fn(position, head_dim, base) -> (D, D) matrix R with R @ x = x rotated for that position."""
    D = 16
    x = torch.randn(D, 5)  # five column vectors
    for base in (10_000.0, 1_000_000.0):
        for position in (0, 3, 200):

            def rotated(p, base=base):
                return _rope(x.T.reshape(1, 1, 5, D), torch.full((5,), p), base)[0, 0].T  # (D, 5)

            got = expect_tensor(fn(position, D, base), f"rope_matrix({position}, {D}, {base:,.0f})")
            if got.shape != (D, D):
                raise Mismatch(
                    f"rope_matrix({position}, {D}, {base:,.0f}) has shape {tuple(got.shape)}, "
                    f"expected ({D}, {D})"
                )
            causes = [
                (
                    "R @ x rotates backwards: you built the transpose (the rotation by -position)",
                    lambda p=position, rotated=rotated: rotated(-p),
                ),
                (
                    "Gemma pairs dimension i with i + D/2, not neighbours 2i and 2i + 1",
                    lambda p=position, base=base: (
                        _rope_interleaved(x.T.reshape(1, 1, 5, D), torch.full((5,), p), base)[0, 0].T
                    ),
                ),
            ]
            expect_close(
                got.float() @ x,
                rotated(position),
                f"rope_matrix({position}, {D}, {base:,.0f}) @ x",
                causes=causes,
            )
    return "R(p) @ x rotates x exactly like rope(x, p)"


def _tables_variant(D: int, base: float, positions: torch.Tensor, dtype, mode: str):
    """RoPE tables with a common mistake: "half" (D/2 columns), "interleaved", "exponent"."""
    if mode == "exponent":
        inv_freq = base ** (-torch.arange(D // 2).float() / D)
    else:
        inv_freq = RotaryEmbedding(D, base).inv_freq()
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    if mode == "interleaved":
        angles = angles.repeat_interleave(2, dim=-1)
    elif mode != "half":
        angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@check("RotaryEmbedding")
def check_rotary_embedding(cls) -> str:
    """cls(head_dim, base), forward(positions (T,), dtype) -> cos, sin, each (T, head_dim)."""
    D = 16
    for base in (10_000.0, 1_000_000.0):
        mine = cls(D, base)
        for positions in (torch.arange(6), torch.tensor([3, 4, 5, 40, 41, 600])):
            for dtype in (torch.float32, torch.bfloat16):
                got = mine(positions, dtype)
                if not isinstance(got, tuple) or len(got) != 2:
                    raise Mismatch("forward should return the pair (cos, sin)")
                expected = RotaryEmbedding(D, base)(positions, dtype)
                for which, g, e, k in (("cos", got[0], expected[0], 0), ("sin", got[1], expected[1], 1)):
                    causes = [
                        (
                            "each angle is needed for both halves of its pair: concatenate the (T, D/2) "
                            "angles with themselves, torch.cat([angles, angles], dim=-1)",
                            lambda m="half", k=k, p=positions, b=base, d=dtype: _tables_variant(
                                D, b, p, d, m
                            )[k],
                        ),
                        (
                            "Gemma pairs dimension i with i + D/2: concatenate the angles (cat), "
                            "do not repeat each one (repeat_interleave)",
                            lambda m="interleaved", k=k, p=positions, b=base, d=dtype: _tables_variant(
                                D, b, p, d, m
                            )[k],
                        ),
                        (
                            "frequencies: inv_freq = base ** (-2i / D) for i = 0 .. D/2 - 1",
                            lambda m="exponent", k=k, p=positions, b=base, d=dtype: _tables_variant(
                                D, b, p, d, m
                            )[k],
                        ),
                        (
                            "cos and sin are swapped",
                            lambda k=k, e=expected: e[1 - k],
                        ),
                    ]
                    expect_close(
                        g,
                        e,
                        f"{which} table (base {base:,.0f}, positions {positions.tolist()}, {dtype})",
                        causes=causes,
                    )
    return "cos and sin tables match gemma_lite.layers.RotaryEmbedding for both bases, fp32 and bf16"


def _apply_variant(x, cos, sin, mode: str) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    if mode == "sign":
        return x * cos + torch.cat([x2, -x1], dim=-1) * sin
    if mode == "swapped":
        return x * sin + torch.cat([-x2, x1], dim=-1) * cos
    even, odd = x[..., 0::2], x[..., 1::2]  # "interleaved": neighbours form the pairs
    c, s = cos[..., : x.shape[-1] // 2], sin[..., : x.shape[-1] // 2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)


@check("apply_rope")
def check_apply_rope(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> str:
    """fn(x (B, H, T, D), cos (T, D), sin (T, D)) -> x rotated pair by pair (i with i + D/2)."""
    x, positions = torch.randn(2, 3, 6, 16), torch.tensor([0, 1, 2, 30, 31, 500])
    for base in (10_000.0, 1_000_000.0):
        cos, sin = RotaryEmbedding(16, base)(positions, x.dtype)
        causes = [
            (
                "rotate_half(x) is (-x2, x1), not (x2, -x1)",
                lambda c=cos, s=sin: _apply_variant(x, c, s, "sign"),
            ),
            (
                "x goes with cos and rotate_half(x) with sin",
                lambda c=cos, s=sin: _apply_variant(x, c, s, "swapped"),
            ),
            (
                "Gemma pairs dimension i with i + D/2 (two halves), not neighbours 2i and 2i + 1",
                lambda c=cos, s=sin: _apply_variant(x, c, s, "interleaved"),
            ),
        ]
        expect_close(fn(x, cos, sin), apply_rope(x, cos, sin), f"rotated x (base {base:,.0f})", causes=causes)
    return "x * cos + rotate_half(x) * sin, with pairs (i, i + D/2), like gemma_lite.layers.apply_rope"
