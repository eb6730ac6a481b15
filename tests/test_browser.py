"""The timing dashboard in a real browser: JupyterLab driven by headless Chromium (Playwright).

JupyterLab serves a copy of ``notebooks/10_torch_compile.ipynb`` (so that autosave never touches
the repository) on a free local port with a random token. The test runs only the dashboard cell
in a fresh kernel, asks for 8 new tokens, presses the widget's Run button, waits for the plot,
saves a screenshot and the table under ``artifacts/``, and checks that the plot names the two
series it should. About a minute, most of it loading the model and timing it.

Skipped, with the reason, where Playwright or Chromium (``/usr/bin/chromium``) is missing:
``bash course test`` installs Chromium with apt-get when it can.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO_ROOT

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
NOTEBOOK = "10_torch_compile.ipynb"
ARTIFACTS = REPO_ROOT / "artifacts"
EXPECTED_SERIES = ["#1 cpu float32: regular", "#1 cpu float32: kv"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with code {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def chromium():
    playwright = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    """(base url, token) of a JupyterLab serving a scratch copy of the chapter 10 notebook."""
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed")
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(REPO_ROOT / "notebooks" / NOTEBOOK, root / NOTEBOOK)
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["JUPYTER_RUNTIME_DIR"] = str(root / ".runtime")
    # the settings the course ships (no "official Jupyter news?" prompt, no update check), as
    # `python -m gemma_lite lab-settings` installs them, in a settings directory of this server's own
    app_settings = root / ".app-settings"
    subprocess.run(
        [sys.executable, "-m", "gemma_lite", "lab-settings", "--dir", str(app_settings)], env=env, check=True
    )
    log = root / "jupyterlab.log"
    command = [
        sys.executable, "-m", "jupyter", "lab", "--allow-root", "--no-browser",
        "--ServerApp.open_browser=False", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}",
        f"--LabApp.workspaces_dir={root / '.workspaces'}", f"--LabApp.user_settings_dir={root / '.settings'}",
        f"--LabApp.app_settings_dir={app_settings}", "--LabApp.expose_app_in_browser=True",
    ]
    with open(log, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/api/status?token={token}", server, log)
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


RUN_DASHBOARD_CELL = """async () => {
    const panel = window.jupyterapp.shell.currentWidget;
    const notebook = panel.content;
    const source = cell => cell.model.sharedModel.getSource();
    const index = notebook.widgets.findIndex(cell => source(cell).includes('BenchmarkDashboard()'));
    if (index < 0) { return 'no dashboard cell'; }
    notebook.activeCellIndex = index;
    await notebook.scrollToItem(index);
    await window.jupyterapp.commands.execute('notebook:run-cell');
    return 'ok';
}"""

KERNEL_IDLE = """() => {
    const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const session = panel && panel.sessionContext && panel.sessionContext.session;
    const kernel = session && session.kernel;
    return !!kernel && kernel.status === 'idle';
}"""

PLOT_WITH_TWO_SERIES = """() => {
    const img = document.querySelector('img.gemma-lite-plot');
    return !!img && img.dataset.series.split('|').length >= 2;
}"""


def test_dashboard_runs_and_plots_in_jupyterlab(chromium, jupyterlab):
    base, token = jupyterlab
    ARTIFACTS.mkdir(exist_ok=True)
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}", timeout=120_000)
        page.wait_for_function(KERNEL_IDLE, timeout=120_000)
        notification = page.request.get(
            f"{base}/lab/api/settings/@jupyterlab/apputils-extension:notification?token={token}"
        ).json()
        defaults = {k: v.get("default") for k, v in notification["schema"]["properties"].items()}
        assert defaults["fetchNews"] == "false" and defaults["checkForUpdates"] is False, defaults  # ours
        assert "official Jupyter news" not in page.content()
        assert page.evaluate(RUN_DASHBOARD_CELL) == "ok"

        run_button = page.locator("button.widget-button", has_text="Run")
        run_button.wait_for(timeout=120_000)
        lengths = page.locator(".widget-text", has_text="new tokens").locator("input")
        lengths.fill("8")
        lengths.press("Tab")  # let the widget send its new value before the click
        run_button.click()

        page.wait_for_function(PLOT_WITH_TWO_SERIES, timeout=300_000)
        plot = page.locator("img.gemma-lite-plot")
        plot.scroll_into_view_if_needed()
        page.wait_for_function("() => !document.querySelector('button.widget-button.mod-success').disabled",
                               timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        plot.locator("xpath=ancestor::div[contains(@class, 'widget-vbox')][1]").screenshot(
            path=str(ARTIFACTS / "dashboard_widget.png"))

        series = plot.get_attribute("data-series").split("|")
        table = page.locator(".widget-html pre").inner_text()
        status = page.locator(".widget-html", has_text="rows.").first.inner_text()
        (ARTIFACTS / "dashboard_table.txt").write_text(table + "\n")
        assert series == EXPECTED_SERIES, series
        assert "done, 2 rows" in status, status
        assert "regular" in table and "kv" in table and "decode tok/s" in table, table
        assert plot.evaluate("img => img.naturalWidth") > 500  # the PNG really decoded
    finally:
        page.close()
