"""The timing dashboard's logic, without a browser: callbacks called directly, a tiny model."""

from __future__ import annotations

import subprocess

import pytest
import torch
from helpers import PYTHON, REPO_ROOT, python_env, tiny_model_for

from gemma_lite.generate import Generator, StepGenerator, decode_step
from gemma_lite.widgets import BenchmarkDashboard, BenchmarkSession, Settings, parse_lengths, run_in_terminal

FAST = Settings(modes=("regular", "kv"), new_tokens=(4, 8), runs=1)


@pytest.fixture
def session():
    return BenchmarkSession(model_for=lambda device, dtype: tiny_model_for(dtype, device))


def test_a_run_produces_one_row_per_mode_and_length(session):
    seen = []
    run = session.run(FAST, on_row=lambda run, row: seen.append((row.mode, row.new_tokens)))
    assert seen == [("regular", 4), ("kv", 4), ("regular", 8), ("kv", 8)]
    assert run.finished and not run.stopped and len(run.rows) == FAST.jobs
    assert all(row.decode_tok_s > 0 and row.dtype == "float32" for row in run.rows)


def test_runs_are_kept_for_comparison(session):
    session.run(FAST)
    session.run(Settings(dtype="bfloat16", modes=("kv",), new_tokens=(4,)))
    assert session.series() == ["#1 cpu float32: regular", "#1 cpu float32: kv", "#2 cpu bfloat16: kv"]
    assert "#2 cpu bfloat16" in session.table() and "bfloat16" in session.table()
    html = session.figure_html()
    assert 'data-series="#1 cpu float32: regular|#1 cpu float32: kv|#2 cpu bfloat16: kv"' in html
    assert session.figure_png().startswith(b"\x89PNG")
    assert len(session._models) == 2  # one model per (device, dtype), loaded once


def test_figure_has_three_panels_with_the_series(session):
    session.run(FAST)
    fig = session.figure()
    speed, length, memory = fig.axes
    assert [t.get_text() for t in speed.get_xticklabels()] == ["regular", "kv"]
    assert [line.get_label() for line in length.get_lines()] == [
        "#1 cpu float32: regular",
        "#1 cpu float32: kv",
    ]
    assert len(memory.patches) == 2
    assert [int(t) for t in length.get_xticks()] == [4, 8]


def test_the_speed_panel_draws_the_memory_roofline_or_names_it_when_far_above(session):
    run = session.run(FAST)
    roofline = run.rows[0].roofline_tok_s  # the tiny model reads ~1 MB a token: far above its bars
    assert roofline > 3 * max(r.decode_tok_s for r in run.rows)
    speed = session.figure().axes[0]
    labels = [line.get_label() for line in speed.get_lines()]
    assert labels == [f"#1 cpu float32: memory roofline {roofline:.0f} (above the chart)"]
    assert speed.get_ylim()[1] < roofline
    fastest = max(r.decode_tok_s for r in run.rows)
    for row in run.rows:  # a machine whose memory allows only twice the fastest bar: the line is drawn
        row.read_gb_s = 2 * fastest * row.bytes_per_token / 1e9
    speed = session.figure().axes[0]
    (line,) = speed.get_lines()
    assert line.get_ydata()[0] == pytest.approx(run.rows[0].roofline_tok_s)
    assert "(above the chart)" not in line.get_label()


def test_one_length_draws_no_degenerate_curve(session):
    session.run(Settings(modes=("regular", "kv"), new_tokens=(4,), runs=1))
    speed, length, memory = session.figure().axes
    assert len(speed.patches) == 2 and not length.get_lines()
    assert "several lengths" in " ".join(t.get_text() for t in length.texts)


def test_stop_between_rows(session):
    run = session.run(FAST, on_row=lambda run, row: session.stop())
    assert len(run.rows) == 1 and run.stopped
    assert "(stopped)" in session.table()
    assert len(session.run(FAST).rows) == FAST.jobs  # the next run starts afresh


def test_dashboard_callbacks(session):
    dash = BenchmarkDashboard(session, FAST)
    assert dash.progress.value == 0 and not dash.run_button.disabled
    dash.modes["regular"].value = False
    dash.lengths.value = "4, 6"
    dash.on_run()
    dash.wait(120)
    assert dash.progress.value == dash.progress.max == 2
    assert "done, 2 rows" in dash.status.value
    assert 'data-series="#1 cpu float32: kv"' in dash.plot.value
    assert "kv" in dash.table.value and dash.stop_button.disabled and not dash.run_button.disabled


def test_dashboard_stop_button(session):
    dash = BenchmarkDashboard(session, FAST)
    original = dash.on_row

    def press_stop_after_first_row(run, row):
        original(run, row)
        dash.on_stop()

    dash.on_row = press_stop_after_first_row
    dash.on_run()
    dash.wait(120)
    assert dash.progress.value == 1 and "stopped, 1 rows" in dash.status.value


@pytest.mark.parametrize("text,problem", [("", "new tokens"), ("ten", "whole numbers"), ("1", "at least 2")])
def test_bad_settings_are_reported_not_raised(session, text, problem):
    dash = BenchmarkDashboard(session, FAST)
    dash.lengths.value = text
    dash.on_run()
    assert "Cannot run" in dash.status.value and problem in dash.status.value
    assert not dash.run_button.disabled and session.runs == []


def test_errors_in_the_background_thread_are_shown():
    def broken(device, dtype):
        raise RuntimeError("no such device")

    dash = BenchmarkDashboard(BenchmarkSession(model_for=broken), FAST)
    dash.on_run()
    dash.wait(60)
    assert "RuntimeError: no such device" in dash.status.value and not dash.run_button.disabled


def test_parse_lengths():
    assert parse_lengths("16, 32 64") == (16, 32, 64)
    with pytest.raises(ValueError, match="whole numbers"):
        parse_lengths("16, many")
    with pytest.raises(ValueError, match="choose one or more modes"):
        Settings(modes=())


def test_text_fallback(session, tmp_path, capsys):
    run = run_in_terminal(session, FAST, str(tmp_path / "plot.png"))
    out = capsys.readouterr().out
    assert len(run.rows) == 4 and "[4/4] kv" in out and "decode tok/s" in out
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


def test_show_in_a_plain_script_runs_the_text_fallback(tmp_path):
    code = (
        "import torch\n"
        "from helpers import tiny_model_for\n"
        "from gemma_lite.widgets import BenchmarkDashboard, BenchmarkSession, Settings\n"
        "model_for = lambda device, dtype: tiny_model_for(dtype, device)\n"
        "session = BenchmarkSession(model_for)\n"
        "BenchmarkDashboard(session, Settings(modes=('kv',), new_tokens=(4,))).show('plot.png')\n"
    )
    env = python_env()
    env["PYTHONPATH"] += f":{REPO_ROOT / 'tests'}"
    out = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "[1/1] kv" in out.stdout and "plot saved to plot.png" in out.stdout
    assert (tmp_path / "plot.png").is_file()


def test_a_mode_of_ones_own_is_timed_and_plotted_beside_the_packages(session):
    model, tokenizer = session.model("cpu", torch.float32)
    caches = lambda batch, max_len: list(model.new_cache(batch, max_len).layers)  # noqa: E731
    session.add_mode("yours", StepGenerator(model, tokenizer, decode_step, caches, compile=False))
    run = session.run(Settings(modes=("kv", "yours"), new_tokens=(4, 8), runs=1))
    assert [(r.mode, r.new_tokens) for r in run.rows] == [("kv", 4), ("kv", 8), ("yours", 4), ("yours", 8)]
    assert all(r.decode_tok_s > 0 and r.read_gb_s == run.rows[0].read_gb_s for r in run.rows)
    assert session.series() == ["#1 cpu float32: kv", "#1 cpu float32: yours"]
    assert "yours" in session.table() and session.figure_png().startswith(b"\x89PNG")
    dash = BenchmarkDashboard(session, Settings(modes=("yours",), new_tokens=(4,)))
    assert "yours" in dash.modes and dash.modes["yours"].value


def test_a_mode_of_ones_own_says_what_to_change(session):
    model, tokenizer = session.model("cpu", torch.float32)
    with pytest.raises(ValueError, match="one of the package's modes"):
        session.add_mode("kv", Generator(model, tokenizer))
    session.add_mode("yours", Generator(model, tokenizer))
    with pytest.raises(ValueError, match="runs its model where it was loaded, on cpu in float32"):
        session.run(Settings(dtype="bfloat16", modes=("yours",), new_tokens=(4,)))
    with pytest.raises(ValueError, match="unknown mode 'mine': choose from regular, .*, yours"):
        session.run(Settings(modes=("mine",), new_tokens=(4,)))
    dash = BenchmarkDashboard(session, Settings(dtype="bfloat16", modes=("yours",), new_tokens=(4,)))
    dash.on_run()
    assert "Cannot run:" in dash.status.value and not dash.run_button.disabled
