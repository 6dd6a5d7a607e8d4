"""End to end in a real browser: JupyterLab serves a dashboard notebook, headless Chromium runs all its cells through
the Run menu, a dashboard slider is moved with the keyboard, and the plot must redraw.

Needs Python playwright and a Chromium at /usr/bin/chromium (``apt-get install -y chromium``; ``playwright install``
is not used); skips with the reason otherwise. The server runs on a free localhost port with a fresh random token,
in a temporary root holding a copy of ``notebooks/03_sample_weights.ipynb``, with ``SGS_LAB_FAST=1`` and a fresh
run cache; Jupyter's config, data, runtime, settings and workspace directories are temporary too. A screenshot is
kept in the test's ``tmp_path`` and, when ``SGS_LAB_SCREENSHOTS`` names a directory, copied there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]  # fmt: skip
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "03_sample_weights.ipynb"
SCREENSHOTS_ENV = "SGS_LAB_SCREENSHOTS"
SERVER_START_S = 90  # a cold JupyterLab on a busy 2-core machine
KERNEL_START_S = 120
FIRST_WIDGET_S = 150  # imports, a tiny training run, then the widgets' JavaScript
REDRAW_S = 45


def _missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "Python playwright is not installed (pip install playwright; the browser comes from apt, not from it)"
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM}: install it with `apt-get install -y chromium`"
    if importlib.util.find_spec("jupyterlab") is None:
        return "JupyterLab is not installed"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _settings(directory: Path) -> None:
    """JupyterLab user settings: start the notebook's kernel without asking, fetch no news, check no updates."""
    overrides = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"autoStartDefaultKernel": True},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                             "checkForUpdates": False},
    }  # fmt: skip
    for name, value in overrides.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


def _stop(process: subprocess.Popen, base: str, token: str) -> None:
    """Ask the server to shut down (it stops its kernels), then terminate, then kill its process group."""
    if process.poll() is None:
        request = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                         headers={"Authorization": f"token {token}"})  # fmt: skip
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except OSError:
            pass
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def jupyterlab(tmp_path):
    """(base URL, token, log path) of a JupyterLab serving a temporary root with the dashboard notebook."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    root, home = tmp_path / "root", tmp_path / "jupyter"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    _settings(home / "settings")
    env = {
        **os.environ, "SGS_LAB_FAST": "1", "SGS_LAB_RUNS": str(tmp_path / "runs"),
        "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "IPYTHONDIR": str(home / "ipython"),
    }  # fmt: skip
    port, token = _free_port(), secrets.token_hex(24)
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.token={token}", "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
    ]  # fmt: skip
    log_path = tmp_path / "jupyterlab.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as response:
                    if response.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start (exit code {process.poll()}):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield base, token, log_path
    finally:
        _stop(process, base, token)
    assert process.poll() is not None, "the JupyterLab server outlived the test"


def _wait_for_kernel(page, base: str, token: str, timeout: float) -> None:
    """Until the notebook's kernel is idle with the page's websocket connected (the server's own view): cells sent
    before that can be lost when the first connection attempt races the kernel start. Accepts a kernel-selection
    dialog should one appear (the settings ask JupyterLab to start the notebook's kernel without one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        accept = page.locator(".jp-Dialog .jp-mod-accept")
        if accept.count() and accept.first.is_visible():
            accept.first.click()
        request = urllib.request.Request(f"{base}/api/kernels", headers={"Authorization": f"token {token}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                kernels = json.load(response)
        except (OSError, ValueError):
            kernels = []
        if any(k.get("execution_state") == "idle" and k.get("connections", 0) > 0 for k in kernels):
            return
        time.sleep(0.25)
    raise TimeoutError(f"no idle, connected kernel after {timeout:.0f} s")


def _keep(screenshot: Path) -> None:
    target = os.environ.get(SCREENSHOTS_ENV)
    if target and screenshot.exists():
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(target) / screenshot.name)


BARS_JS = """([plot, before]) => JSON.stringify(
    Array.from(plot.querySelectorAll('.barlayer path')).map(p => p.getAttribute('d'))) !== before"""


def test_moving_a_dashboard_slider_redraws_the_plot(jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright

    base, token, log_path = jupyterlab
    screenshot = tmp_path / "browser_dashboard.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{base}/lab/tree/{NOTEBOOK.name}?token={token}", timeout=60_000)
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
            _wait_for_kernel(page, base, token, KERNEL_START_S)
            page.locator(".lm-MenuBar-item", has_text="Run").first.click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

            # the weight dashboard is the notebook's first widget: an epoch slider over a histogram
            output = page.locator(".jp-OutputArea-output", has=page.locator(".widget-slider")).first
            output.wait_for(timeout=FIRST_WIDGET_S * 1000)
            dashboard = output.locator(".widget-vbox").first
            slider = dashboard.locator(".widget-slider").first
            plot = dashboard.locator(".js-plotly-plot").first
            plot.locator(".barlayer path").first.wait_for(timeout=REDRAW_S * 1000)
            epoch = int(slider.locator(".widget-readout").inner_text())
            assert epoch >= 1, "the slider starts at the last epoch, and a fast run has several"
            assert f"epoch {epoch}" in plot.locator(".gtitle").text_content()
            before = plot.evaluate("p => JSON.stringify(Array.from(p.querySelectorAll('.barlayer path'))"
                                   ".map(path => path.getAttribute('d')))")  # fmt: skip

            handle = slider.locator(".noUi-handle").first
            handle.focus()
            page.keyboard.press("ArrowLeft")
            page.wait_for_function(BARS_JS, arg=[plot.element_handle(), before], timeout=REDRAW_S * 1000)

            assert slider.locator(".widget-readout").inner_text() == str(epoch - 1)
            page.wait_for_function("([plot, text]) => plot.querySelector('.gtitle').textContent.includes(text)",
                                   arg=[plot.element_handle(), f"epoch {epoch - 1}"], timeout=REDRAW_S * 1000)  # fmt: skip
            dashboard.scroll_into_view_if_needed()
            page.screenshot(path=str(screenshot))
        except Exception:
            page.screenshot(path=str(screenshot))
            _keep(screenshot)
            print(f"JupyterLab log:\n{log_path.read_text()[-3000:]}")
            raise
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    _keep(screenshot)


def test_a_missing_browser_is_a_visible_skip_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    reason = _missing()
    assert reason is not None
    if importlib.util.find_spec("playwright") is not None:
        assert "apt-get install -y chromium" in reason
