"""The timing dashboard: run the benchmark from a notebook, watch it, compare runs.

    from gemma_lite.widgets import BenchmarkDashboard
    BenchmarkDashboard().show()      # JupyterLab: widgets; a plain script: text and a PNG

The logic lives in ``BenchmarkSession``, plain Python that tests call without a
browser: settings in, ``BenchRow``s out, every run kept so that devices,
dtypes and modes can be compared, and one matplotlib figure for all of them.
``BenchmarkDashboard`` only wires widgets to a session; it runs the benchmark
in a background thread so that the Stop button stays responsive (the
benchmark stops after the row it is timing).
"""

from __future__ import annotations

import base64
import html
import io
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from matplotlib.figure import Figure

from .bench import DEFAULT_PROMPT, MODES, BenchRow, bench_ours, format_table, run_benchmark
from .devices import DTYPE_NAMES, DTYPES, available_devices, device_of, dtype_name, dtype_of
from .generate import Generator
from .measure import MB, read_bandwidth

ModelFor = Callable[[str, torch.dtype], tuple]  # (device, dtype) -> (model, tokenizer)


def load_for_benchmark(device: str, dtype: torch.dtype) -> tuple:
    """The bundled model on ``device`` in ``dtype``, with the decode kernels ``bench`` would pick."""
    from .fast import optimize_for_decode
    from .loading import load

    model, tokenizer = load("bundled", device, dtype, progress=False)
    optimize_for_decode(model)
    return model, tokenizer


@dataclass(frozen=True)
class Settings:
    """One benchmark run: where, in which precision, which modes, how many new tokens."""

    device: str = "cpu"
    dtype: str = "float32"
    modes: tuple[str, ...] = ("regular", "kv")
    new_tokens: tuple[int, ...] = (32,)
    runs: int = 1

    def __post_init__(self) -> None:
        if not self.modes:
            raise ValueError(f"choose one or more modes from {', '.join(MODES)}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype}")
        if not self.new_tokens or any(n < 2 for n in self.new_tokens):
            raise ValueError("new tokens: one or more whole numbers of at least 2, like 32 or 16, 64")
        if self.runs < 1:
            raise ValueError("runs must be at least 1")

    @property
    def jobs(self) -> int:
        """Rows the benchmark will produce."""
        return len(self.modes) * len(self.new_tokens)


@dataclass
class Run:
    """The rows of one run, in the order they arrived."""

    number: int
    settings: Settings
    rows: list[BenchRow] = field(default_factory=list)
    finished: bool = False

    @property
    def label(self) -> str:
        return f"#{self.number} {self.settings.device} {self.settings.dtype}"

    @property
    def stopped(self) -> bool:
        return self.finished and len(self.rows) < self.settings.jobs


class BenchmarkSession:
    """Runs the benchmark for a dashboard (or a test) and keeps every run for comparison.

    ``model_for(device, dtype)`` gives (model, tokenizer); models are kept
    between runs, one per (device, dtype). ``add_mode`` adds a mode of your
    own: a generator (such as a ``StepGenerator`` around your decode step) on
    its own model, timed beside the package's modes. ``stop()`` may be called
    from another thread: the benchmark stops before its next row.
    """

    def __init__(self, model_for: ModelFor = load_for_benchmark, prompt: str = DEFAULT_PROMPT):
        self.model_for, self.prompt = model_for, prompt
        self.runs: list[Run] = []
        self._models: dict[tuple[str, torch.dtype], tuple] = {}
        self.own_modes: dict[str, Generator] = {}
        self._stop = threading.Event()

    @property
    def modes(self) -> tuple[str, ...]:
        """Every mode this session can time: the package's, then those added with ``add_mode``."""
        return (*MODES, *self.own_modes)

    def add_mode(self, name: str, generator: Generator) -> None:
        """Time ``generator`` as one more mode, ``name``, on its own model's device and dtype."""
        if name in MODES:
            raise ValueError(f"'{name}' is one of the package's modes: give yours another name")
        self.own_modes[name] = generator

    def check(self, settings: Settings) -> None:
        """A ValueError that says what to change if ``settings`` cannot run in this session."""
        unknown = [m for m in settings.modes if m not in self.modes]
        if unknown:
            raise ValueError(f"unknown mode {unknown[0]!r}: choose from {', '.join(self.modes)}")
        for name in settings.modes:
            if name in self.own_modes:
                model = self.own_modes[name].model
                where = (device_of(model).type, dtype_name(dtype_of(model)))
                if where != (torch.device(settings.device).type, settings.dtype):
                    raise ValueError(
                        f"'{name}' runs its model where it was loaded, on {where[0]} in {where[1]}: "
                        f"choose those, or leave '{name}' out"
                    )

    def add_model(self, model, tokenizer) -> None:
        """Reuse a model that is already loaded (no second copy in memory)."""
        self._models[(model.device.type, model.dtype)] = (model, tokenizer)

    def model(self, device: str, dtype: torch.dtype) -> tuple:
        key = (torch.device(device).type, dtype)
        if key not in self._models:
            self._models[key] = self.model_for(device, dtype)
        return self._models[key]

    def run(self, settings: Settings, on_row: Callable[[Run, BenchRow], None] | None = None) -> Run:
        """Run the benchmark (in the calling thread); ``on_row(run, row)`` as each row is ready."""
        self._stop.clear()
        run = Run(len(self.runs) + 1, settings)
        self.runs.append(run)

        def row_ready(row: BenchRow) -> None:
            run.rows.append(row)
            if on_row is not None:
                on_row(run, row)

        self.check(settings)
        dtype = DTYPES[settings.dtype]
        package = [m for m in settings.modes if m in MODES]
        own = [m for m in settings.modes if m in self.own_modes]
        try:
            if package:
                run_benchmark(
                    lambda d, _quant: self.model(settings.device, d),
                    package,
                    [dtype],
                    settings.new_tokens,
                    runs=settings.runs,
                    prompt=self.prompt,
                    on_row=row_ready,
                    should_stop=self._stop.is_set,
                )
            read_gb_s = run.rows[0].read_gb_s if run.rows else float("nan")
            for n in settings.new_tokens:
                for name in own:
                    if self._stop.is_set():
                        return run
                    if read_gb_s != read_gb_s:
                        read_gb_s = read_bandwidth(torch.device(settings.device))
                    gen = self.own_modes[name]
                    row_ready(
                        bench_ours(
                            gen.model,
                            gen.tokenizer,
                            name,
                            n,
                            self.prompt,
                            settings.runs,
                            self.own_modes,
                            read_gb_s,
                        )
                    )
        finally:
            run.finished = True
        return run

    def stop(self) -> None:
        self._stop.set()

    # -- what the dashboard shows

    def series(self) -> list[str]:
        """The names of the plotted series: "<run label>: <mode>"."""
        return [f"{run.label}: {mode}" for run in self.runs for mode in self._modes(run.rows)]

    def table(self) -> str:
        return "\n\n".join(
            f"{run.label}{' (stopped)' if run.stopped else ''}\n{format_table(run.rows)}"
            for run in self.runs
            if run.rows
        )

    def figure(self) -> Figure:
        """Three panels: decode tok/s per mode, tok/s against new tokens, peak memory per mode.

        The speed panel draws each run's memory roofline as a dashed line: the
        tok/s at which every weight is read once per token at the measured
        read bandwidth, the ceiling for a decode step.
        """
        fig = Figure(figsize=(13, 3.8), layout="constrained")
        speed, length, memory = fig.subplots(1, 3)
        runs = [run for run in self.runs if run.rows]
        modes = self._modes([r for run in runs for r in run.rows])
        width = 0.8 / max(1, len(runs))
        for k, run in enumerate(runs):
            longest = {r.mode: r for r in run.rows if r.new_tokens == max(x.new_tokens for x in run.rows)}
            xs = [i + (k - (len(runs) - 1) / 2) * width for i, m in enumerate(modes) if m in longest]
            shown = [m for m in modes if m in longest]
            bars = speed.bar(xs, [longest[m].decode_tok_s for m in shown], width, label=run.label)
            speed.bar_label(bars, fmt="%.1f", fontsize="small")
            roofline = run.rows[0].roofline_tok_s
            if roofline == roofline:  # measured
                style = dict(linestyle="--", linewidth=1, color=bars.patches[0].get_facecolor())
                label = f"{run.label}: memory roofline {roofline:.0f}"
                if roofline <= 3 * max(r.decode_tok_s for r in run.rows):
                    speed.axhline(roofline, label=label, **style)
                else:  # far above the bars: drawing it would flatten them, so it is only named
                    speed.plot([], [], label=f"{label} (above the chart)", **style)
            memory.bar(xs, [longest[m].peak_mem_bytes / MB for m in shown], width, label=run.label)
            for mode in self._modes(run.rows):
                rows = sorted((r for r in run.rows if r.mode == mode), key=lambda r: r.new_tokens)
                length.plot(
                    [r.new_tokens for r in rows],
                    [r.decode_tok_s for r in rows],
                    "o-",
                    label=f"{run.label}: {mode}",
                )
        for ax, title, unit in ((speed, "decode speed", "tokens / s"), (memory, "peak memory", "MB")):
            ax.set_xticks(range(len(modes)), modes, rotation=15)
            ax.set_title(title)
            ax.set_ylabel(unit)
        length.set_title("speed against generated length")
        length.set_xlabel("new tokens")
        length.set_ylabel("tokens / s")
        lengths = sorted({r.new_tokens for run in runs for r in run.rows})
        if len(lengths) > 1:
            length.set_xscale("log", base=2)
            length.set_xticks(lengths, [str(n) for n in lengths])
            length.legend(fontsize="small")
        else:  # one point per mode is no curve: say how to get one
            length.cla()
            length.set_axis_off()
            hint = "Give several lengths, like 16, 64, 256,\nto see the speed against the length."
            length.text(0.5, 0.5, hint, ha="center", va="center", transform=length.transAxes)
        for ax in (speed, length, memory):
            ax.set_ylim(0, ax.get_ylim()[1] * 1.2)  # from zero, with room for the legend
        if runs:
            speed.legend(fontsize="small")
        return fig

    def _modes(self, rows: Sequence[BenchRow]) -> list[str]:
        """The modes of ``rows``, in the order of ``modes``."""
        return [m for m in self.modes if any(r.mode == m for r in rows)]

    def figure_png(self) -> bytes:
        buffer = io.BytesIO()
        self.figure().savefig(buffer, format="png", dpi=80)
        return buffer.getvalue()

    def figure_html(self) -> str:
        """The figure as an <img>; its ``data-series`` attribute names the series (for browser tests)."""
        png = base64.b64encode(self.figure_png()).decode()
        series = html.escape("|".join(self.series()), quote=True)
        return (
            f'<img class="gemma-lite-plot" alt="benchmark plot: {series}" data-series="{series}" '
            f'style="max-width:100%" src="data:image/png;base64,{png}"/>'
        )


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


def parse_lengths(text: str) -> tuple[int, ...]:
    """ "16, 32 64" -> (16, 32, 64)."""
    try:
        return tuple(int(part) for part in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"new tokens: whole numbers separated by commas, got {text!r}") from None


class BenchmarkDashboard:
    """Widgets around a ``BenchmarkSession``: settings, Run / Stop, progress, plots, table."""

    def __init__(self, session: BenchmarkSession | None = None, settings: Settings = Settings()):
        self.session = session or BenchmarkSession()
        self.settings = settings
        self._thread: threading.Thread | None = None
        self.widget = self._build()

    def _build(self):
        import ipywidgets as w

        s = self.settings
        self.device = w.Dropdown(options=available_devices(), value=s.device, description="device")
        self.dtype = w.Dropdown(options=DTYPE_NAMES, value=s.dtype, description="dtype")
        self.modes = {
            m: w.Checkbox(value=m in s.modes, description=m, indent=False, layout=w.Layout(width="160px"))
            for m in self.session.modes
        }
        self.lengths = w.Text(value=", ".join(map(str, s.new_tokens)), description="new tokens")
        self.runs = w.BoundedIntText(value=s.runs, min=1, max=10, description="runs")
        self.run_button = w.Button(description="Run", button_style="success", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.progress = w.IntProgress(value=0, min=0, max=1, description="progress")
        self.status = w.HTML("Choose the settings and press Run.")
        self.plot = w.HTML()
        self.table = w.HTML()
        self.run_button.on_click(self.on_run)
        self.stop_button.on_click(self.on_stop)
        return w.VBox(
            [
                w.HBox([self.device, self.dtype, self.runs]),
                w.HBox([w.Label("modes", layout=w.Layout(width="90px")), *self.modes.values()]),
                w.HBox([self.lengths, self.run_button, self.stop_button, self.progress]),
                self.status,
                self.plot,
                self.table,
            ]
        )

    def read_settings(self) -> Settings:
        return Settings(
            device=self.device.value,
            dtype=self.dtype.value,
            modes=tuple(m for m, box in self.modes.items() if box.value),
            new_tokens=parse_lengths(self.lengths.value),
            runs=self.runs.value,
        )

    # -- callbacks: plain methods, so that tests can call them

    def on_run(self, _button=None) -> None:
        try:
            settings = self.read_settings()
            self.session.check(settings)
        except ValueError as e:
            self.status.value = f"<b>Cannot run:</b> {html.escape(str(e))}"
            return
        self.run_button.disabled, self.stop_button.disabled = True, False
        self.progress.value, self.progress.max = 0, settings.jobs
        self.status.value = f"Loading the model on {settings.device} ({settings.dtype}) and timing..."
        self._thread = threading.Thread(target=self._work, args=(settings,), daemon=True)
        self._thread.start()

    def on_stop(self, _button=None) -> None:
        self.session.stop()
        self.stop_button.disabled = True
        self.status.value = "Stopping after the current row..."

    def on_row(self, run: Run, row: BenchRow) -> None:
        self.progress.value = len(run.rows)
        self.status.value = (
            f"{run.label}: {row.mode}, {row.new_tokens} tokens: <b>{row.decode_tok_s:.1f} tokens/s</b>"
        )
        self.redraw()

    def redraw(self) -> None:
        self.plot.value = self.session.figure_html()
        self.table.value = f"<pre>{html.escape(self.session.table())}</pre>"

    def _work(self, settings: Settings) -> None:
        try:
            run = self.session.run(settings, self.on_row)
            self.status.value = f"{run.label}: {'stopped' if run.stopped else 'done'}, {len(run.rows)} rows."
        except Exception as e:  # shown in the dashboard: a background thread has no cell to print in
            self.status.value = f"<b>Error:</b> {html.escape(f'{type(e).__name__}: {e}')}"
        finally:
            self.run_button.disabled, self.stop_button.disabled = False, True

    def wait(self, timeout: float | None = None) -> None:
        """Block until the running benchmark ends (for scripts and tests)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def show(self, plot_path: str | None = "benchmark.png"):
        """Display the widgets in a notebook; in a plain script, run once and print (text fallback)."""
        if _in_notebook():
            from IPython.display import display

            display(self.widget)
            return None
        return run_in_terminal(self.session, self.settings, plot_path)


def run_in_terminal(session: BenchmarkSession, settings: Settings, plot_path: str | None = None) -> Run:
    """The dashboard without widgets: one line per row, the table, and the figure saved as a PNG."""
    print(f"timing {', '.join(settings.modes)} on {settings.device} ({settings.dtype}); Ctrl+C stops")

    def print_row(run: Run, row: BenchRow) -> None:
        print(
            f"  [{len(run.rows)}/{settings.jobs}] {row.mode:<17} {row.new_tokens:>4} tokens: "
            f"{row.decode_tok_s:8.1f} tokens/s",
            flush=True,
        )

    try:
        run = session.run(settings, print_row)
    except KeyboardInterrupt:
        run = session.runs[-1]
    print(session.table())
    if plot_path:
        with open(plot_path, "wb") as f:
            f.write(session.figure_png())
        print(f"plot saved to {plot_path}")
    return run
