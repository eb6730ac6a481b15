"""The benchmark: tokens/s and peak memory of each way to generate; ``python -m gemma_lite bench``.

Four ways to generate, as in Sebastian Raschka's "Gemma 3 270M From Scratch" table:

=================  ========================================================
regular            no cache: every step re-runs the whole sequence (eager)
regular-compiled   the same, with ``torch.compile`` (dynamic sequence length)
kv                 static KV cache: prefill once, then one token per step
kv-compiled        KV cache + compiled one-token decode step (fixed shapes)
=================  ========================================================

``--compare-hf`` adds HF transformers' ``generate`` on the same weights
(dynamic cache, and static cache + torch.compile) in the same process, and
prints our speed as a ratio of HF's best mode for each dtype.

Timing done right: a warm-up call first (which also compiles), device sync,
only generated tokens counted, the median of ``runs`` runs. The tools that
measure (``Stopwatch``, ``PeakMemory``) live in ``measure.py``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from .devices import dtype_name
from .generate import Generator
from .measure import MB, PeakMemory, Stopwatch, parameter_bytes

MODES = ("regular", "regular-compiled", "kv", "kv-compiled")
HF_MODES = ("hf-dynamic", "hf-static-compiled")
DEFAULT_PROMPT = "The capital of France is"


@dataclass
class BenchRow:
    mode: str
    dtype: str
    device: str
    new_tokens: int
    decode_tok_s: float
    prefill_tok_s: float
    compile_s: float
    peak_mem_bytes: int  # the model's weights + peak working memory of the run (cache, activations, compile)
    torch: str
    machine: str


def machine_name(device: torch.device | str = "cpu") -> str:
    """A one-line description of the hardware: CPU model and threads, or the GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple {platform.machine()} (MPS)"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def _row(mode, model_dtype, device, new_tokens, decode, prefill, compile_s, peak) -> BenchRow:
    return BenchRow(
        mode=mode,
        dtype=dtype_name(model_dtype),
        device=str(device),
        new_tokens=new_tokens,
        decode_tok_s=round(decode, 2),
        prefill_tok_s=round(prefill, 1),
        compile_s=round(compile_s, 1),
        peak_mem_bytes=peak,
        torch=torch.__version__,
        machine=machine_name(device),
    )


def bench_ours(
    model,
    tokenizer,
    mode: str,
    new_tokens: int,
    prompt: str = DEFAULT_PROMPT,
    runs: int = 3,
    generators: dict | None = None,
) -> BenchRow:
    """Time one of MODES. ``generators`` keeps compiled generators between calls."""
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; choose from {', '.join(MODES)}")
    generators = {} if generators is None else generators
    gen = generators.setdefault(
        mode, Generator(model, tokenizer, use_cache=mode.startswith("kv"), compile=mode.endswith("compiled"))
    )
    with PeakMemory(model.device) as mem:
        # warm-up (compiles on first use); with a cache, the same length gives the same cache shape
        warm = gen(prompt, new_tokens if gen.use_cache else min(new_tokens, 8), stop_at_eos=False)
        results = [gen(prompt, new_tokens, stop_at_eos=False) for _ in range(runs)]
    decode = statistics.median(r.decode_tok_s for r in results)
    prefill = statistics.median(r.prompt_tokens[0] / r.prefill_s for r in results)
    compile_s = sum(r.compile_s for r in (warm, *results))  # the warm-up compiles (0 once compiled)
    peak = parameter_bytes(model) + mem.growth
    return _row(mode, model.dtype, model.device, new_tokens, decode, prefill, compile_s, peak)


def load_hf_reference(dtype: torch.dtype, device: torch.device):
    """HF transformers' Gemma3ForCausalLM on the bundled GGUF (the reference)."""
    try:
        import transformers
    except ImportError as e:
        raise RuntimeError("--compare-hf needs HF transformers: pip install transformers accelerate") from e
    from .gguf_file import bundled_gguf_path

    path = bundled_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.to(device).eval()


def bench_hf(
    hf_model, tokenizer, mode: str, new_tokens: int, prompt: str = DEFAULT_PROMPT, runs: int = 3
) -> BenchRow:
    """Time HF ``generate``: decode speed = (N - 1) / (time for N tokens - time for 1 token)."""
    if mode not in HF_MODES:
        raise ValueError(f"unknown HF mode '{mode}'; choose from {', '.join(HF_MODES)}")
    device = hf_model.device
    ids = torch.tensor([tokenizer.encode(prompt)], device=device)
    options = dict(do_sample=False, pad_token_id=tokenizer.pad_id)
    if mode == "hf-static-compiled":
        options["cache_implementation"] = "static"
        if not hasattr(hf_model, "_gemma_lite_eager_forward"):
            hf_model._gemma_lite_eager_forward = hf_model.forward
        hf_model.forward = torch.compile(hf_model._gemma_lite_eager_forward, mode="default")
    else:
        hf_model.forward = getattr(hf_model, "_gemma_lite_eager_forward", hf_model.forward)

    def timed(n: int) -> float:
        with Stopwatch(device) as watch, torch.inference_mode():
            out = hf_model.generate(ids, max_new_tokens=n, **{**options, "min_new_tokens": n})
        assert out.shape[1] == ids.shape[1] + n
        return watch.seconds

    with PeakMemory(device) as mem:
        first = timed(new_tokens)  # warm-up (and compile) for both lengths timed below
        timed(1)
        one = statistics.median(timed(1) for _ in range(runs))
        full = statistics.median(timed(new_tokens) for _ in range(runs))
    compile_s = max(0.0, first - full) if mode.endswith("compiled") else 0.0
    decode = (new_tokens - 1) / (full - one) if new_tokens > 1 else float("nan")
    return _row(
        mode,
        hf_model.dtype,
        device,
        new_tokens,
        decode,
        ids.shape[1] / one,
        compile_s,
        parameter_bytes(hf_model) + mem.growth,
    )


def run_benchmark(
    model_for: Callable[[torch.dtype], tuple],
    modes: Sequence[str] = MODES,
    dtypes: Sequence[torch.dtype] = (torch.float32,),
    new_tokens: Sequence[int] = (128,),
    compare_hf: bool = False,
    runs: int = 3,
    prompt: str = DEFAULT_PROMPT,
    on_row: Callable[[BenchRow], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[BenchRow]:
    """Every (dtype, length, mode) combination; ``model_for(dtype)`` gives (model, tokenizer).

    ``on_row`` is called as each row is ready (progress, live plots);
    ``should_stop`` is polled between rows (a stop button).
    """
    rows: list[BenchRow] = []
    for dtype in dtypes:
        model, tokenizer = model_for(dtype)
        generators: dict = {}
        hf_model = load_hf_reference(dtype, model.device) if compare_hf else None
        for n in new_tokens:
            jobs = [(m, False) for m in modes] + [(m, True) for m in (HF_MODES if compare_hf else ())]
            for mode, is_hf in jobs:
                if should_stop is not None and should_stop():
                    return rows
                row = (
                    bench_hf(hf_model, tokenizer, mode, n, prompt, runs)
                    if is_hf
                    else bench_ours(model, tokenizer, mode, n, prompt, runs, generators)
                )
                rows.append(row)
                if on_row is not None:
                    on_row(row)
        del model, hf_model, generators
    return rows


def profile_decode(model, tokenizer, steps: int = 20, prompt: str = DEFAULT_PROMPT) -> str:
    """Where a compiled decode step spends its time, against the memory-traffic bound.

    Runs ``steps`` compiled decode steps under torch.profiler and groups the CPU
    time into matrix products (which stream the weights), attention, and the
    rest; then compares the step time with weights-read / measured bandwidth.
    """
    from torch.profiler import ProfilerActivity, profile

    from .fast import measure_head_kernels

    gen = Generator(model, tokenizer, compile=True)
    gen(prompt, steps + 2, stop_at_eos=False)  # compile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = gen(prompt, steps + 1, stop_at_eos=False)
    step_ms = 1e3 * statistics.median(result.step_times)
    groups = {
        "matrix products (weights)": ("mm", "mv", "linear", "gemv", "addmm"),
        "attention": ("attention",),
    }
    spent = dict.fromkeys([*groups, "everything else"], 0.0)
    for event in prof.key_averages():
        name = event.key.lower()
        if "compiled" in name or "torch-compiled" in name or "dynamo" in name:
            continue  # wrappers: their time is their children's
        group = next((g for g, keys in groups.items() if any(k in name for k in keys)), "everything else")
        spent[group] += event.self_cpu_time_total / 1e3 / len(result.step_times)
    weight_bytes = parameter_bytes(model)
    bandwidth = max(measure_head_kernels(model).values())
    bound_ms = weight_bytes / bandwidth / 1e6
    lines = [
        f"compiled decode step: {step_ms:.1f} ms/token ({1e3 / step_ms:.1f} tok/s), dtype {model.dtype}",
        *(f"  {name:<28}{ms:7.1f} ms" for name, ms in spent.items()),
        f"weights read per token: {weight_bytes / 1e9:.2f} GB; best measured kernel: {bandwidth:.1f} GB/s",
        f"memory-traffic bound at that speed: {bound_ms:.1f} ms/token = {1e3 / bound_ms:.1f} tok/s "
        f"(this step reaches {bound_ms / step_ms:.0%} of it)",
    ]
    return "\n".join(lines)


def format_table(rows: Sequence[BenchRow]) -> str:
    """A fixed-width table; with HF rows, each row's speed as a multiple of HF's best."""
    hf_best: dict[tuple[str, int], float] = {}
    for r in rows:
        if r.mode.startswith("hf-"):
            key = (r.dtype, r.new_tokens)
            hf_best[key] = max(hf_best.get(key, 0.0), r.decode_tok_s)
    head = (
        f"{'mode':<19}{'dtype':<10}{'new tok':>8}{'decode tok/s':>14}{'prefill tok/s':>15}"
        f"{'compile s':>11}{'peak MB':>9}"  # MB = 10**6 bytes, as everywhere in the course
    )
    lines = [head + ("   vs HF best" if hf_best else ""), "-" * (len(head) + (13 if hf_best else 0))]
    for r in rows:
        line = (
            f"{r.mode:<19}{r.dtype:<10}{r.new_tokens:>8}{r.decode_tok_s:>14.1f}{r.prefill_tok_s:>15.1f}"
            f"{r.compile_s:>11.1f}{r.peak_mem_bytes / MB:>9.0f}"
        )
        best = hf_best.get((r.dtype, r.new_tokens))
        if best:
            line += f"{r.decode_tok_s / best:>12.2f}x"
        lines.append(line)
    if rows:
        lines.append(f"machine: {rows[0].machine} | torch {rows[0].torch} | device {rows[0].device}")
    return "\n".join(lines)


def write_json(rows: Sequence[BenchRow], path: str) -> None:
    with open(path, "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=2)
