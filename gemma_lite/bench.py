"""The benchmark: tokens/s and peak memory of each way to generate; ``python -m gemma_lite bench``.

Four ways to generate, as in Sebastian Raschka's "Gemma 3 270M From Scratch" table:

=================  ========================================================
regular            no cache: every step re-runs the whole sequence (eager)
regular-compiled   the same, with ``torch.compile`` (dynamic sequence length)
kv                 static KV cache: prefill once, then one token per step
kv-compiled        KV cache + compiled one-token decode step (fixed shapes)
spec-lookup        speculative decoding, prompt-lookup drafts, compiled verification
spec-redrafter     speculative decoding, the recurrent draft head, compiled verification
export-eager       chapter 13's step with its cache as explicit tensors, eager
export-program     that step through ``torch.export`` (the exported graph's module)
export-onnx        that step exported to ONNX, run by onnxruntime
export-aoti        that step compiled ahead of time into an AOTInductor package
export-torchscript that step traced by TorchScript
=================  ========================================================

The export modes run one prompt at a time, the prompt one token per step too; their
compile time is the export and compilation, their files go in a temporary folder.

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
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from .devices import device_of, dtype_name, dtype_of
from .export import RUNNERS, exported_generator
from .fast import DecodePlan, ShapeTiming, kernel_layers, time_calls
from .generate import Generator
from .measure import MB, PeakMemory, Stopwatch, read_bandwidth, stored_bytes
from .quantize import quant_scheme
from .speculative import SpeculativeGenerator, drafter_named

MODES = ("regular", "regular-compiled", "kv", "kv-compiled")
SPEC_MODES = ("spec-lookup", "spec-redrafter")
HF_MODES = ("hf-dynamic", "hf-static-compiled")
EXPORT_MODES = tuple(f"export-{runner}" for runner in RUNNERS)  # chapter 13: the step leaves PyTorch
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
    quant: str = "none"  # weight format: none (the dtype), int8, int4
    bytes_per_token: int = 0  # weight bytes a decode step reads: every stored weight once
    read_gb_s: float = float("nan")  # the device's measured read bandwidth (``measure.read_bandwidth``)
    tokens_per_round: float = 0.0  # speculative modes: tokens a draft-and-verify round adds (0: other modes)

    @property
    def roofline_tok_s(self) -> float:
        """The fastest decode the read bandwidth allows: bandwidth / bytes per token."""
        return self.read_gb_s * 1e9 / self.bytes_per_token if self.bytes_per_token else float("nan")

    @property
    def roofline_share(self) -> float:
        """decode tok/s as a share of ``roofline_tok_s`` (1.0 = reading weights at full bandwidth)."""
        return self.decode_tok_s / self.roofline_tok_s


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


def decode_read_bytes(model) -> int:
    """Bytes a decode step reads: each weight matrix's tensors as its kernels take them, and every
    other parameter and buffer (norms) once; stored forms the kernels do not read are left out."""
    tensors = {}
    owned = set()
    for layer in kernel_layers(model):
        owned.update(id(t) for t in (*layer.parameters(), *layer.buffers()))
        tensors.update({id(t): t for t in layer.stored()})
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in owned:
            tensors.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _row(mode, model, new_tokens, decode, prefill, compile_s, peak, read_gb_s, per_round=0.0) -> BenchRow:
    device = device_of(model)
    return BenchRow(
        mode=mode,
        dtype=dtype_name(dtype_of(model)),
        device=str(device),
        new_tokens=new_tokens,
        decode_tok_s=round(decode, 2),
        prefill_tok_s=round(prefill, 1),
        compile_s=round(compile_s, 1),
        peak_mem_bytes=peak,
        torch=torch.__version__,
        machine=machine_name(device),
        quant=quant_scheme(model),
        bytes_per_token=decode_read_bytes(model),
        read_gb_s=round(read_gb_s, 1),
        tokens_per_round=round(per_round, 2),
    )


def make_generator(model, tokenizer, mode: str, draft_len: int = 4, width: int = 1, max_len: int = 256):
    """The generator that runs ``mode`` (one of MODES, SPEC_MODES or EXPORT_MODES).

    ``max_len``: the cache positions an export mode's step holds (its shapes are fixed).
    """
    if mode in SPEC_MODES:
        drafter = drafter_named(mode.removeprefix("spec-"), model)
        return SpeculativeGenerator(model, tokenizer, drafter, draft_len=draft_len, width=width, compile=True)
    if mode in EXPORT_MODES:
        folder = tempfile.TemporaryDirectory(prefix="gemma-lite-export-")
        gen = exported_generator(model, tokenizer, mode.removeprefix("export-"), max_len, folder.name)
        gen.folder = folder  # the files live as long as the generator
        return gen
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}'; choose from {', '.join(MODES + SPEC_MODES + EXPORT_MODES)}")
    return Generator(model, tokenizer, use_cache=mode.startswith("kv"), compile=mode.endswith("compiled"))


def bench_ours(
    model,
    tokenizer,
    mode: str,
    new_tokens: int,
    prompt: str = DEFAULT_PROMPT,
    runs: int = 3,
    generators: dict | None = None,
    read_gb_s: float = float("nan"),
    draft_len: int = 4,
    width: int = 1,
) -> BenchRow:
    """Time one of MODES, SPEC_MODES or EXPORT_MODES. ``generators`` keeps compiled generators between calls;
    a generator put there under a name of its own (a ``StepGenerator``) is timed as that mode.

    ``read_gb_s``: the device's read bandwidth, for the roofline columns.
    ``draft_len``, ``width``: the speculative modes' tokens per candidate and candidates per round.
    """
    generators = {} if generators is None else generators
    max_len = 256
    key = mode
    if mode in EXPORT_MODES:  # an exported step's cache has one size: a generator per size
        max_len = Generator(model, tokenizer).cache_len(len(tokenizer.encode(prompt)) + new_tokens)
        key = (mode, max_len)
    with PeakMemory(device_of(model)) as mem:  # an export mode's build included: its own copy of the weights
        if key not in generators:
            generators[key] = make_generator(model, tokenizer, mode, draft_len, width, max_len)
        gen = generators[key]
        # warm-up (compiles on first use); with a cache, the same length gives the same cache shape
        warm = gen(prompt, new_tokens if gen.use_cache else min(new_tokens, 8), stop_at_eos=False)
        results = [gen(prompt, new_tokens, stop_at_eos=False) for _ in range(runs)]
    decode = statistics.median(r.decode_tok_s for r in results)
    prefill = statistics.median(r.prompt_tokens[0] / r.prefill_s for r in results)
    compile_s = sum(r.compile_s for r in (warm, *results))  # the warm-up compiles (0 once compiled)
    compile_s += getattr(gen, "build_s", 0.0)  # an export mode: the export and compilation
    peak = stored_bytes(model) + mem.growth
    per_round = statistics.median(r.stats.mean_accepted for r in results) if mode in SPEC_MODES else 0.0
    return _row(mode, model, new_tokens, decode, prefill, compile_s, peak, read_gb_s, per_round)


def speculative_sweep(
    model,
    tokenizer,
    prompts: dict[str, str],
    drafters: dict,
    draft_lens: Sequence[int] = (1, 2, 4, 6),
    widths: Sequence[int] = (1,),
    new_tokens: int = 64,
    compile: bool = False,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Speculative greedy decoding for every (prompt, drafter, draft length, width): one dict each.

    Keys: prompt, drafter, draft_len, width, tokens_per_round, verified_per_round (tree
    nodes the model ran), beam_tokens_per_round (the same candidates run separately),
    decode_tok_s, and the share of decode time spent drafting, verifying and on the rest.
    """
    rows = []
    for prompt_name, prompt in prompts.items():
        for drafter_name, drafter in drafters.items():
            for draft_len in draft_lens:
                for width in widths:
                    gen = SpeculativeGenerator(
                        model, tokenizer, drafter, draft_len=draft_len, width=width, compile=compile
                    )
                    if compile:
                        gen(prompt, new_tokens, stop_at_eos=False)  # compile this tree size first
                    out = gen(prompt, new_tokens, stop_at_eos=False)
                    stats = out.stats
                    row = dict(
                        prompt=prompt_name,
                        drafter=drafter_name,
                        draft_len=draft_len,
                        width=width,
                        compiled=compile,
                        tokens_per_round=round(stats.mean_accepted, 3),
                        verified_per_round=round(stats.verified / stats.rounds, 3),
                        beam_tokens_per_round=round(stats.beam_tokens / stats.rounds, 3),
                        decode_tok_s=round(out.decode_tok_s, 2),
                        draft_share=round(stats.draft_s / stats.total_s, 4),
                        verify_share=round(stats.verify_s / stats.total_s, 4),
                        other_share=round(stats.other_s / stats.total_s, 4),
                        machine=machine_name(model.device),
                        torch=torch.__version__,
                    )
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
    return rows


def speculative_report(model, tokenizer, prompts: dict[str, str], new_tokens: int = 96, on_row=None) -> dict:
    """What chapter 12 plots: kv-compiled and both speculative modes on each prompt (compiled,
    greedy), sweeps of draft length and width (eager: tokens per round and tokens verified), and
    where a compiled round's time goes. The model's kernels are measured first."""
    from .fast import optimize_for_decode
    from .speculative import PromptLookup, RecurrentDrafter

    optimize_for_decode(model, compiled=True, row_major_head=True)
    report = {"machine": machine_name(model.device), "torch": torch.__version__, "bench": {}, "sweep": []}
    for name, prompt in prompts.items():
        rows = run_benchmark(
            lambda dtype, quant: (model, tokenizer),
            ["kv-compiled", *SPEC_MODES],
            [model.dtype],
            [new_tokens],
            runs=1,
            prompt=prompt,
            on_row=on_row,
        )
        report["bench"][name] = [asdict(r) for r in rows]
    lookup, head = {"lookup": PromptLookup()}, {"redrafter": RecurrentDrafter.bundled(model)}
    sweep = report["sweep"]
    sweep += speculative_sweep(model, tokenizer, prompts, lookup, (1, 2, 4, 6), (1,), 64, on_row=on_row)
    sweep += speculative_sweep(model, tokenizer, prompts, head, (1, 2, 4, 6), (1, 2, 4), 64, on_row=on_row)
    both = {**lookup, **head}
    sweep += speculative_sweep(model, tokenizer, prompts, both, (4,), (1,), 64, compile=True, on_row=on_row)
    return report


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
    hf_model,
    tokenizer,
    mode: str,
    new_tokens: int,
    prompt: str = DEFAULT_PROMPT,
    runs: int = 3,
    read_gb_s: float = float("nan"),
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
    peak = stored_bytes(hf_model) + mem.growth
    return _row(mode, hf_model, new_tokens, decode, ids.shape[1] / one, compile_s, peak, read_gb_s)


def run_benchmark(
    model_for: Callable[[torch.dtype, str], tuple],
    modes: Sequence[str] = MODES,
    dtypes: Sequence[torch.dtype] = (torch.float32,),
    new_tokens: Sequence[int] = (128,),
    compare_hf: bool = False,
    runs: int = 3,
    prompt: str = DEFAULT_PROMPT,
    on_row: Callable[[BenchRow], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    quants: Sequence[str] = ("none",),
    draft_len: int = 4,
    width: int = 1,
) -> list[BenchRow]:
    """Every (dtype, quantization, length, mode); ``model_for(dtype, quant)`` gives (model, tokenizer).

    ``quants``: "none" (weights in the dtype), "int8", "int4". HF transformers
    (``compare_hf``) runs once per dtype, with unquantized weights.
    ``on_row`` is called as each row is ready (progress, live plots);
    ``should_stop`` is polled between rows (a stop button).
    """
    rows: list[BenchRow] = []
    read_gb_s = float("nan")
    for dtype in dtypes:
        for quant in quants:
            model, tokenizer = model_for(dtype, quant)
            if read_gb_s != read_gb_s:  # once per run, on the benchmark's device
                read_gb_s = read_bandwidth(model.device)
            with_hf = compare_hf and quant == "none"
            hf_model = load_hf_reference(dtype, model.device) if with_hf else None
            if not _bench_model(
                model,
                tokenizer,
                hf_model,
                modes,
                new_tokens,
                runs,
                prompt,
                read_gb_s,
                rows,
                on_row,
                should_stop,
                (draft_len, width),
            ):
                return rows
            del model, hf_model
    return rows


def _bench_model(
    model,
    tokenizer,
    hf_model,
    modes,
    new_tokens,
    runs,
    prompt,
    read_gb_s,
    rows,
    on_row,
    should_stop,
    speculative=(4, 1),
):
    """The rows of one model (and HF's); False if stopped."""
    generators: dict = {}
    for n in new_tokens:
        jobs = [(m, False) for m in modes] + [(m, True) for m in (HF_MODES if hf_model is not None else ())]
        for mode, is_hf in jobs:
            if should_stop is not None and should_stop():
                return False
            row = (
                bench_hf(hf_model, tokenizer, mode, n, prompt, runs, read_gb_s)
                if is_hf
                else bench_ours(model, tokenizer, mode, n, prompt, runs, generators, read_gb_s, *speculative)
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return True


def profile_decode(model, tokenizer, plan: DecodePlan, steps: int = 32, prompt: str = DEFAULT_PROMPT) -> str:
    """Where a compiled decode step's time goes: the weight products, and everything else.

    The weight products' share is what the kernels ``plan`` chose take when each
    is timed on its own (``fast.measure_kernels``); the rest of the step is
    attention over the cache, norms, RoPE, the residual adds, choosing the
    token, and the compiled function's own Python and guard checks. The
    roofline is the step time at which every stored weight byte is read once
    at the measured read bandwidth.
    """
    gen = Generator(model, tokenizer, compile=True)
    gen(prompt, steps + 1, stop_at_eos=False)  # compile, and warm up
    result = gen(prompt, steps + 1, stop_at_eos=False)
    step_ms = 1e3 * statistics.median(result.step_times)
    # Timed alone, each compiled product also pays a compiled call's own fixed cost, which the
    # whole step pays once: measure it on a trivial compiled function and take it out.
    one = torch.zeros(1, device=model.device)
    trivial = torch.compile(torch.neg, dynamic=False)
    call_s = time_calls({"call": lambda: trivial(one)}, rounds=5, device=model.device)["call"]
    chosen = plan.chosen(compiled=True)

    def product_ms(t: ShapeTiming) -> float:
        # On a tiny matrix the product is lost in the call cost's noise: it costs at least nothing.
        return 1e3 * t.layers * max(0.0, t.seconds() - call_s)

    products_ms = sum(map(product_ms, chosen))
    head_ms = sum(product_ms(t) for t in chosen if t.out_features == plan.head_rows)
    weight_bytes = stored_bytes(model)
    bandwidth = read_bandwidth(model.device)
    bound_ms = weight_bytes / bandwidth / 1e6
    rest_ms = step_ms - products_ms
    lines = [
        f"compiled decode step, {dtype_name(model.dtype)}, weights {quant_scheme(model)}: "
        f"{step_ms:.2f} ms/token ({1e3 / step_ms:.1f} tok/s)",
        f"  weight products (chosen kernels, each timed alone) {products_ms:7.1f} ms"
        f"   (head {head_ms:.1f} ms; a compiled call's own {1e6 * call_s:.0f} us taken out of each)",
        f"  everything else (attention, norms, RoPE, sampling, Python, guards) {rest_ms:7.1f} ms",
        f"weights read per token: {weight_bytes / 1e9:.3f} GB; read bandwidth {bandwidth:.1f} GB/s",
        f"roofline: {bound_ms:.1f} ms/token = {1e3 / bound_ms:.1f} tok/s; "
        f"this step reaches {bound_ms / step_ms:.0%} of it",
    ]
    return "\n".join(lines)


def format_table(rows: Sequence[BenchRow]) -> str:
    """A fixed-width table; with HF rows, each row's speed as a multiple of HF's best."""
    hf_best: dict[tuple[str, int], float] = {}
    for r in rows:
        if r.mode.startswith("hf-"):
            key = (r.dtype, r.new_tokens)
            hf_best[key] = max(hf_best.get(key, 0.0), r.decode_tok_s)
    # MB = 10**6 bytes, as everywhere in the course
    head = (
        f"{'mode':<19}{'weights':<17}{'new tok':>8}{'decode tok/s':>14}{'GB/token':>10}{'roofline':>10}"
        f"{'prefill tok/s':>15}{'compile s':>11}{'peak MB':>9}"
    )
    per_round = any(r.tokens_per_round > 0 for r in rows)  # a speculative row
    head += f"{'tok/round':>11}" if per_round else ""
    lines = [head + ("   vs HF best" if hf_best else ""), "-" * (len(head) + (13 if hf_best else 0))]
    for r in rows:
        weights = r.dtype if r.quant == "none" else f"{r.quant} ({r.dtype})"
        line = (
            f"{r.mode:<19}{weights:<17}{r.new_tokens:>8}{r.decode_tok_s:>14.1f}"
            f"{r.bytes_per_token / 1e9:>10.3f}{r.roofline_share:>10.0%}{r.prefill_tok_s:>15.1f}"
            f"{r.compile_s:>11.1f}{r.peak_mem_bytes / MB:>9.0f}"
        )
        if per_round:
            line += f"{r.tokens_per_round:>11.2f}" if r.tokens_per_round > 0 else f"{'-':>11}"
        best = hf_best.get((r.dtype, r.new_tokens))
        if best:
            line += f"{r.decode_tok_s / best:>12.2f}x"
        lines.append(line)
    if rows:
        r = rows[0]
        bandwidth = f"{r.read_gb_s:.1f} GB/s, measured in this run"
        lines.append(f"roofline = decode tok/s x GB/token / read bandwidth ({bandwidth})")
        lines.append(f"machine: {r.machine} | torch {r.torch} | device {r.device}")
    return "\n".join(lines)


def write_json(rows: Sequence[BenchRow], path: str) -> None:
    with open(path, "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=2)
