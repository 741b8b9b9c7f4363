"""``parity-kit report``: run a notebook headless and gather what to attach to a bug report."""

from __future__ import annotations

import ast
import datetime as dt
import os
import shutil
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

from .._util.atomic import atomic_path
from ..analyses.runs import RECORDINGS_SUFFIX
from ..errors import ParityKitError
from ..present.report import export_html
from .demo import execute_notebook


def parse_cli_value(text: str) -> Any:
    """A ``-p NAME VALUE`` value: a Python literal (number, True/False/None, quoted string), else the text.

    >>> parse_cli_value("3"), parse_cli_value("bf16"), parse_cli_value("false"), parse_cli_value("1e-3")
    (3, 'bf16', False, 0.001)
    """
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, (int, float, str, bool, list, dict, tuple)) or value is None else text


@dataclass
class ReportFiles:
    """What :func:`make_report` wrote; ``error`` is None when the notebook ran to the end."""

    executed: Path
    html: Path
    findings: list[Path]
    archive: Path | None
    error: str | None = None


def _parameters_cell(nb: Any) -> Any:
    return next((c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])), None)


def _literal_assignments(source: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return values
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return values


def _notebook_reports_dir(nb: Any, notebook: Path) -> Path | None:
    """``reports_dir`` as the notebook last ran with it: injected parameters win over the parameters cell."""
    value = None
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if cell.cell_type == "code" and ("parameters" in tags or "injected-parameters" in tags):
            value = _literal_assignments(cell.source).get("reports_dir", value)
    if not isinstance(value, str):
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (notebook.parent / path).resolve()


def _run_started(nb: Any) -> float | None:
    start = nb.metadata.get("papermill", {}).get("start_time")
    if not start:
        return None
    try:
        return dt.datetime.fromisoformat(start).replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        return None


def _artifacts(folder: Path, since: float | None) -> tuple[list[Path], list[Path]]:
    """Findings files and recording folders under ``folder`` written at or after ``since`` (all if None)."""
    if not folder.is_dir():
        return [], []
    slack = 2.0  # file-system timestamps are coarser than the clock papermill reads

    def fresh(p: Path) -> bool:
        return since is None or p.stat().st_mtime >= since - slack

    findings = sorted(p for p in folder.glob("*.findings.json") if fresh(p))
    recordings = sorted(p.parent for p in folder.rglob("index.json")
                        if (p.parent / "tensors.safetensors").exists() and fresh(p))
    return findings, recordings


def _zip_recordings(recordings: Sequence[Path], root: Path, archive: Path) -> Path:
    with atomic_path(archive) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rec in recordings:
            for file in sorted(rec.rglob("*")):
                if file.is_file():
                    zf.write(file, file.relative_to(root).as_posix())
    return archive


def make_report(
    notebook: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] = "reports",
    *,
    hide_code: bool = False,
    execute: bool = True,
    parameters: dict[str, Any] | None = None,
    progress: bool = True,
) -> ReportFiles:
    """Run a notebook headless (papermill, ``interactive=False``, ``reports_dir=out_dir``) and gather what
    to attach to a bug report in ``out_dir``: the executed copy, a self-contained HTML
    (:func:`parity_kit.present.report.export_html`: figures embedded, code hidden with ``hide_code``), the findings JSON the run wrote and ``<name>.recordings.zip`` of the
    recordings it saved. ``execute=False`` takes an already executed notebook as it is.

    A failing notebook still gets its executed copy and HTML (they show the error); ``error`` says what failed.

    >>> files = make_report("notebooks/05_bug_report.ipynb", "reports", parameters={"smoke": True})  # doctest: +SKIP
    >>> files.html.name, files.error  # doctest: +SKIP
    ('05_bug_report.html', None)
    """
    src = Path(notebook)
    if not src.is_file():
        raise ParityKitError(f"no notebook at {src}; check the path (e.g. notebooks/05_bug_report.ipynb)")
    try:
        nb = nbformat.read(src, as_version=4)
    except Exception as e:  # nbformat raises several unrelated types for unreadable files
        raise ParityKitError(f"{src} is not a readable notebook ({type(e).__name__}: {e})") from None
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    executed = out / f"{src.stem}.ipynb"
    html = out / f"{src.stem}.html"
    error: str | None = None

    if execute:
        if _parameters_cell(nb) is None:
            raise ParityKitError(
                f"{src} has no cell tagged 'parameters', so its settings cannot be injected; in JupyterLab open the "
                "first code cell's property inspector and add the tag 'parameters' (or pass --no-execute)")
        injected = {"interactive": False, "reports_dir": str(out), **(parameters or {})}
        started = time.time()
        error = execute_notebook(src, executed, injected, progress=progress)
        reports_dir: Path | None = Path(injected["reports_dir"]).expanduser()
        if not reports_dir.is_absolute():
            reports_dir = (src.parent / reports_dir).resolve()
        since: float | None = started
    else:
        if parameters:
            raise ParityKitError("-p sets parameters for a run; with --no-execute nothing runs, so drop -p or --no-execute")
        if src.resolve() != executed:
            shutil.copyfile(src, executed)
        reports_dir = _notebook_reports_dir(nb, src.resolve())
        since = _run_started(nb)
    export_html(executed, html, hide_code=hide_code)

    findings, recordings = _artifacts(reports_dir, since) if reports_dir is not None else ([], [])
    copied = []
    for f in findings:
        target = out / f.name
        if f.resolve() != target:
            shutil.copyfile(f, target)
        copied.append(target)
    archive = None
    if recordings:
        archive = _zip_recordings(recordings, reports_dir, out / f"{src.stem}{RECORDINGS_SUFFIX}.zip")
    return ReportFiles(executed, html, copied, archive, error)
