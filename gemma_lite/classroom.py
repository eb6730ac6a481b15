"""Memory for a room: how much each extra learner's kernel costs; ``python -m gemma_lite room``.

Starts ``n`` Jupyter kernels at once (this Python's, as a JupyterHub would), has
each load the bundled model and generate a sentence, and then, while all of
them still hold their model, reads each kernel's memory from the operating
system:

* RSS, resident memory: every page the kernel uses, counting shared ones in full;
* USS, unique memory: the pages only this kernel uses, what stopping it would free;
* PSS, proportional memory: each shared page divided among the kernels that share it,
  so that the kernels' PSS add up to what they cost the machine together.

With ``shared=True`` the kernels load ``"bundled"``: their weights are views of
one safetensors file in the weights directory, kept once in the page cache.
With ``shared=False`` each dequantizes the GGUF into its own copy.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

import psutil
import torch

from .measure import MB

KERNEL_CODE = """
import torch
import gemma_lite
from gemma_lite.generate import generate
from gemma_lite.gguf_file import bundled_gguf_path

source = "bundled" if {shared} else bundled_gguf_path()
model, tokenizer = gemma_lite.load(source, device="cpu", dtype=torch.float32, progress=False)
with torch.inference_mode():
    text = generate(model, tokenizer, "The capital of France is", 12)
"""


@dataclass
class KernelMemory:
    rss: int
    uss: int
    pss: int


@dataclass
class RoomMeasurement:
    """The memory of ``n`` kernels that each hold the model, shared or not."""

    kernels: int
    shared: bool
    memory: list[KernelMemory]
    seconds: float

    @property
    def total_pss(self) -> int:
        return sum(m.pss for m in self.memory)

    def row(self, first: RoomMeasurement | None) -> str:
        rss = statistics.median(m.rss for m in self.memory)
        uss = statistics.median(m.uss for m in self.memory)
        extra = (
            ""
            if first is None or self.kernels == 1
            else (f"{(self.total_pss - first.total_pss) / (self.kernels - 1) / MB:>12.0f}")
        )
        return (
            f"{'shared' if self.shared else 'private':<9}{self.kernels:>8}{rss / MB:>10.0f}{uss / MB:>10.0f}"
            f"{self.total_pss / MB:>12.0f}{extra:>12}{self.seconds:>10.0f}"
        )


def kernel_tree_memory(pid: int) -> KernelMemory:
    """RSS, USS and PSS of a kernel process and its children, in bytes."""
    process = psutil.Process(pid)
    infos = [p.memory_full_info() for p in (process, *process.children(recursive=True))]
    return KernelMemory(sum(i.rss for i in infos), sum(i.uss for i in infos), sum(i.pss for i in infos))


def measure_room(kernels: int, shared: bool, timeout: float = 900) -> RoomMeasurement:
    """Start ``kernels`` kernels at once, let each load the model and generate, then measure them."""
    from jupyter_client.manager import KernelManager

    managers = [
        KernelManager(kernel_cmd=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"])
        for _ in range(kernels)
    ]
    clients = []
    start = time.perf_counter()
    try:
        for km in managers:
            km.start_kernel()
            client = km.client()
            client.start_channels()
            clients.append(client)
        for client in clients:
            client.wait_for_ready(timeout=timeout)
        requests = [client.execute(KERNEL_CODE.format(shared=shared)) for client in clients]
        for client, msg_id in zip(clients, requests, strict=True):
            while True:  # wait for this request's reply; fail loudly if the kernel's code raised
                reply = client.get_shell_msg(timeout=timeout)
                if reply["parent_header"].get("msg_id") == msg_id:
                    break
            if reply["content"]["status"] != "ok":
                raise RuntimeError(
                    f"a kernel failed: {reply['content'].get('ename')}: {reply['content'].get('evalue')}"
                )
        seconds = time.perf_counter() - start
        memory = [kernel_tree_memory(km.provisioner.pid) for km in managers]
    finally:
        for client in clients:
            client.stop_channels()
        for km in managers:
            km.shutdown_kernel(now=True)
    return RoomMeasurement(kernels, shared, memory, seconds)


def room_report(counts=(1, 4, 8), on_row=None) -> str:
    """A table of the memory of 1, 4 and 8 kernels, with shared and with private weights; ``on_row(line)``
    as each line is ready (the measurements take minutes)."""
    from .bench import machine_name

    lines = []

    def add(line: str) -> None:
        lines.append(line)
        if on_row is not None:
            on_row(line)

    head = f"{'weights':<9}{'kernels':>8}{'RSS MB':>10}{'USS MB':>10}{'sum PSS MB':>12}{'+MB/kernel':>12}"
    add(head + f"{'time s':>10}")
    add("-" * len(lines[0]))
    for shared in (True, False):
        first = None
        for n in counts:
            measured = measure_room(n, shared)
            first = first or measured
            add(measured.row(first))
    add("RSS, USS: the median kernel; +MB/kernel: what each kernel after the first adds to the sum of PSS")
    memory = psutil.virtual_memory().total / 1e9
    add(f"machine: {machine_name()} | {memory:.0f} GB | torch {torch.__version__}")
    return "\n".join(lines)
