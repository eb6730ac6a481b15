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
