"""Measuring tools: wall time, resident and tensor memory, in seconds and bytes."""

from __future__ import annotations

import mmap
import time

import pytest
import torch
from torch import nn

from gemma_lite.measure import (
    PeakMemory,
    ResidentPeak,
    Stopwatch,
    TensorMemory,
    parameter_bytes,
    peak_resident_bytes,
    resident_bytes,
)

BLOCK = 64 * 10**6  # bytes: far above the noise of the interpreter's own allocations


def test_stopwatch_times_the_block():
    with Stopwatch("cpu") as watch:
        time.sleep(0.05)
    assert 0.05 <= watch.seconds < 1.0


@pytest.mark.parametrize("meter", [ResidentPeak, PeakMemory], ids=["ResidentPeak", "PeakMemory"])
def test_peak_sees_memory_freed_before_the_block_ends(meter):
    with meter() as mem:
        pages = mmap.mmap(-1, BLOCK)  # fresh pages: the allocator's free lists cannot hold them already
        torch.frombuffer(pages, dtype=torch.uint8).fill_(1)  # written: resident
        pages.close()
    assert mem.start > 0 and mem.peak >= mem.start
    assert BLOCK * 0.9 <= mem.growth <= BLOCK * 1.5


def test_peak_resident_is_at_least_the_resident_memory_now():
    peak = peak_resident_bytes()
    if peak is None:
        pytest.skip("no /proc/self/status here")
    assert peak >= resident_bytes() * 0.99


def test_tensor_memory_counts_new_storage_not_views():
    with TensorMemory() as mem:
        a = torch.ones(1000)  # 4,000 bytes
        b = a * 2  # 4,000 more
        a.view(10, 100).add_(1)  # a view, in place: nothing new
        del b
    assert mem.peak == 8000 and mem.now == 4000


def test_parameter_bytes_counts_the_stored_dtype():
    layer = nn.Linear(10, 20, bias=False)
    assert parameter_bytes(layer) == 10 * 20 * 4
    assert parameter_bytes(layer.to(torch.bfloat16)) == 10 * 20 * 2
