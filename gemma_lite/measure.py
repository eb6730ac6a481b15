"""Measuring: wall time, device sync, resident memory and tensor memory, all in seconds and bytes.

    sync(device)                  wait for the device's queued work (cuda, mps; cpu: nothing)
    Stopwatch(device)             wall time of a block, the device synchronized at both ends
    parameter_bytes(module)       bytes of a module's parameters, as stored
    stored_bytes(module)          the same with its buffers (quantized weights, scales)
    read_bandwidth(device)        GB/s at which the device reads memory (a short probe)
    resident_bytes()              this process's resident memory now
    peak_resident_bytes()         the process's resident high-water mark (Linux), or None
    ResidentPeak                  the process's peak resident memory inside a block (Linux: exact)
    PeakMemory(device)            peak memory of a device inside a block (cuda: the allocator)
    TensorMemory                  peak bytes of the tensors created inside a block (any device)

Everything is counted in bytes; tables print ``MB`` = 10**6 bytes (``MB`` below).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MB = 10**6  # bytes in the MB every table prints

_STATUS = "/proc/self/status"  # Linux: VmRSS, VmHWM (the resident high-water mark)
_CLEAR_REFS = "/proc/self/clear_refs"  # Linux: writing "5" resets VmHWM to the current resident size


def sync(device: torch.device | str) -> None:
    """Wait until the work queued on ``device`` is done (GPUs run asynchronously; CPU: nothing to do)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Stopwatch:
    """Wall time of the ``with`` block in ``seconds``, the device synchronized at both ends.

    with Stopwatch(device) as watch:
        model(ids)
    watch.seconds
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device, self.seconds = torch.device(device), 0.0

    def __enter__(self) -> Stopwatch:
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._start


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters as they are stored (a tied matrix counts once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def read_bandwidth(device: torch.device | str = "cpu", nbytes: int = 256_000_000, rounds: int = 7) -> float:
    """GB/s at which ``device`` reads memory: the median time to sum an fp32 buffer of ``nbytes``.

    A STREAM-like read probe, with every thread PyTorch uses; the buffer is far
    larger than any cache. It is the ceiling for a decode step, which reads
    every weight once: tokens/s <= bandwidth / bytes read per token.
    """
    data = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    data.sum()  # warm-up: the pages are touched, the threads started
    times = []
    for _ in range(rounds):
        with Stopwatch(device) as watch:
            data.sum()
        times.append(watch.seconds)
    return nbytes / statistics.median(times) / 1e9


def stored_bytes(module: nn.Module) -> int:
    """Bytes of everything ``module`` stores: parameters and buffers (quantized weights, scales)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def resident_bytes() -> int:
    """This process's resident memory now."""
    import psutil

    return psutil.Process().memory_info().rss


def peak_resident_bytes() -> int | None:
    """The kernel's record of this process's peak resident memory (``VmHWM``); None off Linux."""
    try:
        with open(_STATUS) as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


class ResidentPeak:
    """The process's peak resident memory while the block runs, in bytes: ``start``, ``peak``, ``growth``.

    On Linux the kernel's exact high-water mark (``VmHWM``), reset on entry
    through ``/proc/self/clear_refs``, so nothing runs beside the measured code.
    Elsewhere resident memory is sampled by a thread every ``interval`` seconds.
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.start = self.peak = 0
        self._exact = os.path.exists(_CLEAR_REFS) and peak_resident_bytes() is not None

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start)

    def __enter__(self) -> ResidentPeak:
        self.start = self.peak = resident_bytes()
        if self._exact:
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc) -> None:
        if self._exact:
            self.peak = peak_resident_bytes()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, resident_bytes())


class PeakMemory:
    """Peak memory of ``device`` while the block runs, in bytes: ``start``, ``peak``, ``growth``.

    CUDA: the allocator's own peak of tensor memory. CPU and MPS (which shares
    the CPU's memory): the process's resident peak, ``ResidentPeak``.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.start = self.peak = 0

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self._resident = ResidentPeak().__enter__()
            self.start = self._resident.start
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._resident.__exit__(*exc)
            self.peak = self._resident.peak


class TensorMemory(TorchDispatchMode):
    """Bytes of the tensors that operations create inside the ``with`` block.

    Every operation's new output storage is counted until it is freed; views
    and in-place results share an existing storage and cost nothing. ``peak``
    is the most bytes alive at once, ``now`` what is still alive. It sees
    tensors, not the allocator, so it works the same on CPU, CUDA and MPS.

        with TensorMemory() as mem:
            model(ids)
        mem.peak
    """

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._live: dict[int, int] = {}  # id(storage) -> bytes

    def _free(self, key: int) -> None:
        self.now -= self._live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors_in = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {id(t.untyped_storage()) for t in tensors_in}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._live or key in inputs or storage.nbytes() == 0:
                continue
            self._live[key] = storage.nbytes()
            self.now += storage.nbytes()
            weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.now)
        return out
