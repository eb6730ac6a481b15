"""The benchmark: rows, table, JSON, and the HF comparison (timing values are not asserted)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import tiny_bench_model

from gemma_lite.bench import (
    MODES,
    BenchRow,
    bench_hf,
    format_table,
    profile_decode,
    run_benchmark,
    write_json,
)
from gemma_lite.fast import optimize_for_decode


def test_run_benchmark_rows_table_and_json(tmp_path):
    seen = []
    rows = run_benchmark(
        tiny_bench_model,
        ["regular", "kv"],
        [torch.float32, torch.bfloat16],
        [4, 8],
        runs=1,
        prompt="hello",
        on_row=seen.append,
    )
    assert [(r.mode, r.dtype, r.new_tokens) for r in rows] == [
        (m, d, n) for d in ("float32", "bfloat16") for n in (4, 8) for m in ("regular", "kv")
    ]
    assert seen == rows
    for r in rows:
        assert r.decode_tok_s > 0 and r.prefill_tok_s > 0 and r.peak_mem_bytes > 0
        assert r.torch == torch.__version__ and r.machine and r.device == "cpu"
        assert r.quant == "none" and r.read_gb_s > 0
        assert r.bytes_per_token == tiny_bench_model(torch.float32)[0].num_parameters() * (
            4 if r.dtype == "float32" else 2
        )
        assert r.roofline_share == pytest.approx(r.decode_tok_s * r.bytes_per_token / (r.read_gb_s * 1e9))
    lines = format_table(rows).splitlines()
    assert [line.split()[:3] for line in lines[2:-2]] == [[r.mode, r.dtype, str(r.new_tokens)] for r in rows]
    assert "read bandwidth" in lines[-2] and f"{rows[0].read_gb_s:.1f} GB/s" in lines[-2]
    path = tmp_path / "rows.json"
    write_json(rows, str(path))
    assert [BenchRow(**r) for r in json.loads(path.read_text())] == rows


def test_quantized_rows_read_fewer_bytes():
    rows = run_benchmark(
        tiny_bench_model, ["kv"], new_tokens=[4], runs=1, prompt="hello", quants=("none", "int8", "int4")
    )
    assert [r.quant for r in rows] == ["none", "int8", "int4"]
    dense, int8, int4 = (r.bytes_per_token for r in rows)
    assert dense > int8 > int4
    lines = format_table(rows).splitlines()
    assert [line.split()[1:3] for line in lines[3:5]] == [["int8", "(float32)"], ["int4", "(float32)"]]


def test_stop_between_rows():
    rows = run_benchmark(tiny_bench_model, MODES[:2], new_tokens=[4], runs=1, should_stop=lambda: True)
    assert rows == []


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        run_benchmark(tiny_bench_model, ["fast"], new_tokens=[4], runs=1)


def test_table_shows_ratio_to_hf_best():
    common = dict(
        dtype="float32",
        device="cpu",
        new_tokens=8,
        prefill_tok_s=1.0,
        compile_s=0.0,
        peak_mem_bytes=1_000_000,
        torch="x",
        machine="m",
    )
    rows = [
        BenchRow(mode="kv", decode_tok_s=30.0, **common),
        BenchRow(mode="hf-dynamic", decode_tok_s=15.0, **common),
    ]
    assert [line.split()[-1] for line in format_table(rows).splitlines()[2:4]] == ["2.00x", "1.00x"]


def test_table_prints_peak_memory_in_mb_of_a_million_bytes():
    row = BenchRow("kv", "float32", "cpu", 8, 30.0, 1.0, 0.0, 536_870_912, torch="", machine="")
    header, _, line = format_table([row]).splitlines()[:3]
    assert header.split()[-2:] == ["peak", "MB"]
    assert line.split()[-1] == "537"  # 536,870,912 bytes = 512 MiB = 537 MB


@pytest.mark.slow
def test_hf_rows_on_the_real_model(real, hf_model):
    row = bench_hf(hf_model, real[1], "hf-dynamic", 8, runs=1)
    assert row.mode == "hf-dynamic" and row.decode_tok_s > 0 and row.new_tokens == 8


@pytest.mark.compile
@pytest.mark.parametrize("quant", ["none", "int8"])
def test_profile_splits_the_step_into_weight_products_and_the_rest(quant):
    model, tokenizer = tiny_bench_model(torch.float32, quant)
    plan = optimize_for_decode(model, rounds=1)
    report = profile_decode(model, tokenizer, plan, steps=3, prompt="hello")
    ms, tok_s = map(float, re.search(r"([\d.]+) ms/token \(([\d.]+) tok/s\)", report).groups())
    assert ms * tok_s == pytest.approx(1000, rel=0.05)
    assert f"weights {quant}" in report
    products = float(re.search(r"weight products .*?([-\d.]+) ms", report).group(1))
    rest = float(re.search(r"everything else .*?([-\d.]+) ms", report).group(1))
    assert 0 <= products < 1e3 * plan.matmul_seconds(compiled=True)  # less each call's fixed cost
    assert products + rest == pytest.approx(ms, abs=0.15)


@pytest.mark.compile
def test_speculative_rows_report_tokens_per_round():
    from gemma_lite.bench import bench_ours

    model, tokenizer = tiny_bench_model()
    row = bench_ours(model, tokenizer, "spec-lookup", 24, prompt="abcabcabcabc", runs=1, draft_len=3)
    assert row.mode == "spec-lookup" and 1.0 <= row.tokens_per_round <= 4.0
    plain = bench_ours(model, tokenizer, "kv", 24, prompt="abcabcabcabc", runs=1)
    table = format_table([plain, row]).splitlines()
    assert table[0].split()[-1] == "tok/round"
    assert table[2].split()[-1] == "-" and float(table[3].split()[-1]) == row.tokens_per_round


def test_export_modes_are_timed_like_the_others_with_their_export_as_compile_time():
    pytest.importorskip("onnxruntime")
    from gemma_lite.bench import bench_ours

    model, tokenizer = tiny_bench_model()
    generators: dict = {}
    rows = [
        bench_ours(model, tokenizer, mode, 8, prompt="hello", runs=1, generators=generators)
        for mode in ("kv", "export-eager", "export-program", "export-onnx")
    ]
    kv, eager, program, onnx = rows
    assert all(r.decode_tok_s > 0 and r.prefill_tok_s > 0 for r in rows)
    assert eager.compile_s == 0.0 and program.compile_s > 0 and onnx.compile_s > 0
    assert [r.bytes_per_token for r in rows] == [kv.bytes_per_token] * 4
    # the same greedy tokens from every runner
    texts = {mode: gen("hello", 8, stop_at_eos=False).new_ids for mode, gen in generators.items()}
    assert len({str(t) for t in texts.values()}) == 1, texts
    assert sorted(map(str, generators)) == sorted(
        ["kv", *(str((m, 256)) for m in ("export-eager", "export-program", "export-onnx"))]
    )
