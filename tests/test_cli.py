"""``python -m gemma_lite``: what a user sees on the command line."""

from __future__ import annotations

import subprocess

import pytest
from helpers import PYTHON, REPO_ROOT, python_env

from gemma_lite.generate import Generator


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "gemma_lite", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=python_env(), timeout=timeout)


@pytest.mark.slow
def test_generate_prints_the_greedy_continuation(real):
    prompt = "The capital of France is"
    out = run_cli("generate", prompt, "--max-new-tokens", "8", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    model, tokenizer = real
    expected = Generator(model, tokenizer)(prompt, 8)
    assert len(expected.new_ids[0]) == 8
    assert out.stdout == prompt + expected.text[0] + "\n"
    assert "8 tokens" in out.stderr  # the timing line goes to stderr, not into the text


def test_negative_temperature_is_refused():
    out = run_cli("generate", "Hello", "-t", "-1")
    assert out.returncode == 2
    assert out.stdout == ""
    assert "error: temperature must be >= 0 (0 means greedy), got -1" in out.stderr


def test_a_source_path_that_does_not_exist_is_refused():
    out = run_cli("generate", "Hello", "--source", "./no/such/model", "--device", "cpu")
    assert out.returncode == 2
    assert "error: source './no/such/model' does not exist: no such file or directory" in out.stderr
    assert "'bundled'" in out.stderr and ".gguf file" in out.stderr and "hub repo id" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_argument_is_an_argparse_error():
    out = run_cli("generate", "Hello", "--max-new-tokens", "many")
    assert out.returncode == 2
    assert "invalid int value: 'many'" in out.stderr


@pytest.mark.slow
def test_eval_reports_perplexity_bits_and_agreement_and_reloads_what_it_saved(tmp_path):
    import json

    saved, first, second = tmp_path / "int4", tmp_path / "first.json", tmp_path / "second.json"
    out = run_cli("eval", "--quant", "int4", "--group-size", "32", "--save", str(saved), "--json", str(first),
                  "--device", "cpu")
    assert out.returncode == 0, out.stderr
    report = json.loads(first.read_text())
    assert {"perplexity", "bits_per_param", "agreement", "model_bytes"} <= set(report)
    assert report["bits_per_param"] == 4 + 2 * 16 / 32
    assert report["perplexity"] >= report["reference_perplexity"] * 0.98  # rounding does not help much
    assert 0.5 < report["agreement"] < 1
    assert f"perplexity {report['perplexity']:.3f}" in out.stdout
    out = run_cli("eval", "--quant", str(saved), "--json", str(second), "--device", "cpu")
    assert out.returncode == 0, out.stderr
    again = json.loads(second.read_text())
    assert again["perplexity"] == report["perplexity"] and again["agreement"] == report["agreement"]


def test_eval_refuses_an_unknown_method():
    out = run_cli("eval", "--quant", "int5")
    assert out.returncode != 0
    assert "--quant 'int5' is neither a method (int8, int4, int3, gptq, spqr) nor a directory" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["lookup", "redrafter"])
def test_speculative_generate_prints_the_same_text(real, drafter):
    prompt = "The capital of France is"
    out = run_cli("generate", prompt, "-n", "12", "--device", "cpu", "--speculative", drafter, "--width", "2")
    assert out.returncode == 0, out.stderr
    model, tokenizer = real
    assert out.stdout == prompt + Generator(model, tokenizer)(prompt, 12).text[0] + "\n"
    assert "tokens per round" in out.stderr


def test_speculative_options_are_checked():
    out = run_cli("generate", "Hello", "--speculative", "lookup", "--draft-len", "0", "--device", "cpu")
    assert out.returncode == 2 and "draft_len must be a positive integer" in out.stderr
    out = run_cli("generate", "Hello", "--speculative", "redrafter", "--drafter", "/no/head.safetensors")
    assert out.returncode == 2 and "no draft head at /no/head.safetensors" in out.stderr
