"""Checks of the chapter 08 exercises (memory arithmetic): training state, the longest context that fits."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import GemmaConfig
from ..memory import FP32, dtype_bytes, kv_cache_bytes
from .core import check, expect_equal


@check("training_state_bytes")
def check_training_state_bytes(fn: Callable[[int, torch.dtype], int]) -> str:
    """fn(n_params, dtype) -> bytes of weights, gradients and Adam's state for training in ``dtype``."""
    for n, dtype in ((268_098_176, torch.float32), (268_098_176, torch.bfloat16), (1000, torch.float16)):
        b = dtype_bytes(dtype)
        master = FP32 if b != FP32 else 0
        causes = [
            (
                "the gradients count too: one per parameter, in the weights' dtype",
                lambda n=n, b=b, m=master: n * (b + 2 * FP32 + m),
            ),
            (
                "Adam keeps two moments per parameter (m and v)",
                lambda n=n, b=b, m=master: n * (2 * b + FP32 + m),
            ),
            (
                "Adam's moments stay in fp32 whatever the weights' dtype",
                lambda n=n, b=b, m=master: n * (4 * b + m),
            ),
        ]
        if master:  # first: it is the likeliest reason for 12 bytes per parameter in bf16
            causes.insert(
                0,
                (
                    "with bf16 or fp16 weights, Adam updates an fp32 master copy of them",
                    lambda n=n, b=b: n * (2 * b + 2 * FP32),
                ),
            )
        expected = n * (2 * b + 2 * FP32 + master)
        expect_equal(fn(n, dtype), expected, f"training_state_bytes({n:_}, {dtype})", causes)
    return "16 bytes per parameter, in fp32 and in mixed precision alike"


def _longest_fitting(
    budget: int, cfg: GemmaConfig, dtype: torch.dtype, ring: bool = True, cap: bool = True
) -> int:
    """The largest context whose cache fits in ``budget`` (0 if none), by bisection."""
    lo, hi = 0, cfg.max_seq_len if cap else 1 << 40
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kv_cache_bytes(cfg, mid, dtype, ring=ring) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


@check("max_context")
def check_max_context(fn: Callable[[int, GemmaConfig, torch.dtype], int]) -> str:
    """fn(budget_bytes, cfg, dtype) -> the longest context whose KV cache (batch 1) fits in the budget."""
    real, tiny = GemmaConfig.gemma3_270m(), GemmaConfig.tiny()
    for budget, cfg, dtype in (
        (50_000_000, real, torch.bfloat16),
        (100_000_000, real, torch.float32),
        (5_000_000, real, torch.bfloat16),
        (2_000_000_000, real, torch.bfloat16),
        (10_000, tiny, torch.float32),
        (1_000, real, torch.float32),
    ):
        causes = [
            (
                "local layers stop growing at the window (ring buffer): only global layers grow",
                lambda b=budget, c=cfg, d=dtype: _longest_fitting(b, c, d, ring=False),
            ),
            (
                "off by one: one token more no longer fits",
                lambda b=budget, c=cfg, d=dtype: _longest_fitting(b, c, d) + 1,
            ),
            (
                "the model stops at cfg.max_seq_len, however much memory there is",
                lambda b=budget, c=cfg, d=dtype: _longest_fitting(b, c, d, cap=False),
            ),
        ]
        name = "270m" if cfg == real else "tiny"
        expected = _longest_fitting(budget, cfg, dtype)
        expect_equal(fn(budget, cfg, dtype), expected, f"max_context({budget:_}, {name}, {dtype})", causes)
    return "inverts kv_cache_bytes: global layers grow with the context, local ones stop at the window"
