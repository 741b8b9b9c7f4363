"""A real-browser test: JupyterLab on localhost, the quickstart notebook in headless Chromium.

Runs the notebook, changes the candidate dtype in its panel, clicks Run, and checks that a new figure
and a new table appear. Needs Debian's chromium (``/usr/bin/chromium``, or ``PARITY_KIT_CHROMIUM``) and
Playwright for Python (the browser itself is never downloaded). Skipped cleanly where either is
missing, except under CI (``CI=true``), where a missing browser is a failure. On a failure a screenshot
is saved (its path is in the failure message) to see what the page showed.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from parity_kit._util.paths import notebooks_dir

CHROMIUM = os.environ.get("PARITY_KIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _require_browser() -> None:
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"chromium at {CHROMIUM}")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[test]')")
    if missing:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"browser test needs {', '.join(missing)}; .ci/run installs them")
        pytest.skip(f"missing {', '.join(missing)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quickstart_copy(folder: Path) -> None:
    """The quickstart with ``smoke = True`` typed into its parameters cell, as a user would."""
    nb = nbformat.read(notebooks_dir() / "00_quickstart.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert "smoke = False" in params.source
    params.source = params.source.replace("smoke = False", "smoke = True")
    nbformat.write(nb, folder / "00_quickstart.ipynb")


def _lab_settings(folder: Path) -> Path:
    # Lab 4 renders only the cells in view ("windowing"); render all so outputs below the fold exist in the DOM.
    # Start the notebook's own kernel (python3) without the "Select Kernel" dialog.
    tracker = folder / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none", "autoStartDefaultKernel": True}))
    news = folder / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    return folder


@pytest.fixture
def jupyter_lab(tmp_path):
    _require_browser()
    root = tmp_path / "nb"
    root.mkdir()
    _quickstart_copy(root)
    port, token = _free_port(), secrets.token_hex(16)
    log_path = tmp_path / "lab.log"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root",
             f"--LabApp.user_settings_dir={_lab_settings(tmp_path / 'settings')}",
             f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
             "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail("JupyterLab did not start:\n" + log_path.read_text()[-3000:])
                    time.sleep(0.3)  # polling a port that is not open yet; there is no event to wait on
            yield base, token, log_path
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_quickstart_panel_in_a_real_browser(jupyter_lab, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base, token, log_path = jupyter_lab
    screenshot = tmp_path / "browser-failure.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        try:
            page.goto(f"{base}/lab/tree/00_quickstart.ipynb?token={token}")
            notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook")
            notebook.wait_for()
            # the kernel has started and answered: the status bar says "Python 3 (ipykernel) | Idle" (a loaded
            # machine takes more than the default 5 s to start a kernel)
            expect(page.locator(".jp-StatusBar-Widget", has_text="| Idle").first).to_be_visible(timeout=120_000)
            expect(page.locator(".jp-Dialog")).to_have_count(0)

            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

            # the last cell prints where the findings went: every cell above it has run
            outputs = notebook.locator(".jp-OutputArea-output")
            expect(outputs.filter(has_text="findings written to")).to_have_count(1, timeout=300_000)
            static_images = outputs.locator("img").count()
            assert static_images >= 2, "the static cells draw the error plot and the heatmap"

            run_button = page.locator("button.widget-button", has_text="Run")
            panel = notebook.locator(".widget-vbox").filter(has=run_button).last
            expect(panel).to_be_visible()
            results = panel.locator(".widget-output")
            expect(results.locator("img")).to_have_count(0)

            dtype_select = panel.locator(".widget-dropdown").filter(has_text="candidate dtype").locator("select")
            expect(dtype_select).to_have_value("bf16")
            dtype_select.select_option("fp16")
            panel.locator(run_button).click()

            expect(panel.get_by_text("done (run 1)")).to_be_visible(timeout=180_000)
            expect(results.locator("img")).to_have_count(2)
            table = results.locator("table")
            expect(table).to_have_count(1)
            expect(table).to_contain_text("fp16")
            expect(table).not_to_contain_text("bf16")
            expect(results).to_contain_text("tiny-llama-from-config fp16 cpu eager")  # the conclusion names the candidate run
            assert "Error" not in panel.locator(".widget-html").all_inner_texts()[-1]
        except BaseException as exc:
            page.screenshot(path=str(screenshot), full_page=True)
            raise AssertionError(f"{exc}\nscreenshot: {screenshot}\nJupyterLab log: {log_path}") from exc
        finally:
            browser.close()
