"""``parity-kit demo``: real papermill execution of real notebooks in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from parity_kit.app.demo import NotebookResult, select_notebooks, summary_table
from parity_kit.errors import ParityKitError

SCRIPT = Path(sys.executable).parent / "parity-kit"
ROOT = Path(__file__).resolve().parent.parent


def _notebook(*sources: str) -> nbformat.NotebookNode:
    params = nbformat.v4.new_code_cell('interactive = True\nsmoke = False\nreports_dir = "reports"')
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[params, *[nbformat.v4.new_code_cell(s) for s in sources]])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def _write_findings_cell(name: str) -> str:
    return ("import parity_kit as pk\n"
            f"pk.write_findings({name!r}, {{'smoke': smoke, 'interactive': interactive}}, "
            "'the ok notebook ran to the end', {'answer': 6 * 7}, reports_dir=reports_dir)")


@pytest.mark.slow
def test_demo_runs_all_notebooks_reports_failures_and_exits_non_zero(tmp_path):
    nbs, reports = tmp_path / "nbs", tmp_path / "reports"
    nbs.mkdir()
    nbformat.write(_notebook(_write_findings_cell("01_ok")), nbs / "01_ok.ipynb")
    nbformat.write(_notebook("raise ValueError('deliberate failure in cell two')"), nbs / "02_fails.ipynb")
    nbformat.write(_notebook("x = 1"), nbs / "03_no_findings.ipynb")
    nbformat.write(nbformat.v4.new_notebook(), nbs / "helper.ipynb")  # not numbered: not run
    reports.mkdir()
    stale = reports / "03_no_findings.findings.json"
    stale.write_text("{}")  # left from an earlier run: must not count for this one

    done = subprocess.run([str(SCRIPT), "demo", "--smoke", "--notebooks", str(nbs), "--reports", str(reports)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr

    # the good notebook: three files, parameters injected, the kernel ran this interpreter
    findings = json.loads((reports / "01_ok.findings.json").read_text())
    assert findings["figures"] == {"answer": 42}
    assert findings["parameters"] == {"smoke": True, "interactive": False}
    assert findings["environment"]["python_prefix"] == sys.prefix
    assert (reports / "01_ok.ipynb").exists() and (reports / "01_ok.html").exists()
    # the failing one: executed copy and HTML still written, and they show the error
    assert "deliberate failure in cell two" in (reports / "02_fails.html").read_text()
    assert "deliberate failure in cell two" in (reports / "02_fails.ipynb").read_text()
    assert not (reports / "02_fails.findings.json").exists()
    assert not stale.exists()
    assert not list(reports.glob(".*"))  # no partial files left
    assert not (reports / "helper.ipynb").exists()

    table = {ln.split()[0]: ln for ln in done.stdout.splitlines() if ln[:2].isdigit()}
    assert set(table) == {"01_ok", "02_fails", "03_no_findings"}
    assert " ok " in table["01_ok"] and "the ok notebook ran to the end" in table["01_ok"]
    assert "failed" in table["02_fails"] and "ValueError" in table["02_fails"]
    assert "no findings" in table["03_no_findings"]


@pytest.mark.slow
def test_demo_smoke_runs_every_repository_notebook(tmp_path):
    reports = tmp_path / "reports"
    done = subprocess.run([str(SCRIPT), "demo", "--smoke", "--reports", str(reports)],
                          capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    names = [p.stem for p in sorted((ROOT / "parity_kit" / "notebooks").glob("[0-9]*.ipynb"))]
    assert len(names) >= 6
    for name in names:
        findings = json.loads((reports / f"{name}.findings.json").read_text())
        assert findings["notebook"] == name
        assert findings["parameters"]["smoke"] is True
        assert findings["conclusion"] and findings["figures"], name
        assert findings["environment"]["torch"], name
        assert (reports / f"{name}.ipynb").exists()
        assert "data:image/png;base64," in (reports / f"{name}.html").read_text(), name
        # every notebook that compares modules records its calibrated verdict counts (issue #23)
        counted = [k for k in findings["figures"] if k.endswith("n_modules_consistent")]
        assert counted, name
        for key in counted:
            total = findings["figures"][key.removesuffix("_consistent")]
            assert total > 0 and 0 <= findings["figures"][key] <= total, (name, key)
    summary = {ln.split()[0]: ln for ln in done.stdout.splitlines() if ln[:2].isdigit()}
    assert set(summary) == set(names) and all(" ok " in line for line in summary.values())


def test_select_notebooks_by_full_or_short_name():
    nbs = [Path("00_quickstart.ipynb"), Path("01_fp16_fp32_divergence.ipynb")]
    assert select_notebooks(nbs, ["quickstart"]) == nbs[:1]
    assert select_notebooks(nbs, ["01_fp16_fp32_divergence", "00_quickstart.ipynb"]) == nbs[::-1]
    assert select_notebooks(nbs, None) == nbs
    with pytest.raises(ParityKitError, match="available: 00_quickstart"):
        select_notebooks(nbs, ["fp16"])


def test_summary_table_truncates_headlines():
    rows = [NotebookResult("00_quickstart", "ok", 12.34, "x" * 200, None, None, None)]
    text = summary_table(rows, width=50)
    assert text.splitlines()[1].endswith("x" * 49 + "…")
    assert "12.3s" in text


def test_repository_notebooks_are_numbered_and_committed_without_outputs():
    nbs = sorted((ROOT / "parity_kit" / "notebooks").glob("[0-9]*.ipynb"))
    assert any(p.stem == "00_quickstart" for p in nbs)
    nb = nbformat.read(ROOT / "parity_kit" / "notebooks" / "00_quickstart.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "write_findings" in code[-1].source
