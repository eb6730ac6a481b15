"""Device and dtype choices: the preference order, the names, the errors."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from gemma_lite.devices import (
    DTYPE_NAMES,
    available_devices,
    default_dtype,
    dtype_name,
    resolve_device,
    resolve_dtype,
)


@pytest.mark.parametrize(("cuda", "mps", "best", "listed"), [
    (False, False, "cpu", ["cpu"]),
    (False, True, "mps", ["cpu", "mps"]),
    (True, True, "cuda", ["cpu", "cuda", "mps"]),
])
def test_best_device_prefers_cuda_then_mps(cuda, mps, best, listed):
    with mock.patch("torch.cuda.is_available", return_value=cuda), \
         mock.patch("torch.backends.mps.is_available", return_value=mps):
        assert available_devices() == listed
        assert resolve_device(None) == torch.device(best)


def test_default_dtype_is_fp32_on_cpu():
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("name", ["bfloat16", "bf16", torch.bfloat16])
def test_dtype_names_and_short_names(name):
    assert resolve_dtype(name, torch.device("cpu")) == torch.bfloat16


def test_dtype_name_round_trips():
    for name in DTYPE_NAMES:
        assert dtype_name(resolve_dtype(name, torch.device("cpu"))) == name
