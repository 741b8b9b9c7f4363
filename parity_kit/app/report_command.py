"""``parity-kit report``: run a notebook headless and gather what to attach to a bug report."""

from __future__ import annotations

import ast
import datetime as dt
import difflib
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

REPORT_NAME_PARAMETER = "report_name"
"""A notebook whose parameters cell sets this gets the report's name injected (its findings and recordings
are then named after the report, not after the template)."""
INSTRUCTIONS_TAG = "template-instructions"
"""Cells with this tag tell the user how to fill in the template; the report's HTML leaves them out."""


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


def _assignments(source: str) -> dict[str, Any]:
    """``name = value`` statements of a cell: literals as values, anything else as its source text."""
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
                values[node.targets[0].id] = _Source(ast.get_source_segment(source, node.value) or "?")
    return values


class _Source(str):
    """The source text of a parameter whose value is not a literal (shown as written)."""


def _literal_assignments(source: str) -> dict[str, Any]:
    return {k: v for k, v in _assignments(source).items() if not isinstance(v, _Source)}


def notebook_parameters(nb: Any) -> dict[str, Any]:
    """The values a notebook ran with: its ``parameters`` cell, overridden by papermill's injected cell.

    >>> cell = nbformat.v4.new_code_cell("model = 'a'\\nsmoke = False")
    >>> cell.metadata["tags"] = ["parameters"]
    >>> injected = nbformat.v4.new_code_cell("smoke = True")
    >>> injected.metadata["tags"] = ["injected-parameters"]
    >>> notebook_parameters(nbformat.v4.new_notebook(cells=[cell, injected]))
    {'model': 'a', 'smoke': True}
    """
    values: dict[str, Any] = {}
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if cell.cell_type == "code" and ("parameters" in tags or "injected-parameters" in tags):
            values.update(_assignments(cell.source))
    return values


def check_parameters(given: dict[str, Any], known: Sequence[str], notebook: str) -> None:
    """Refuse parameters the notebook's parameters cell does not set (papermill would only warn and run
    with the default), naming the known ones and the closest spelling.

    >>> check_parameters({"cand_dtype": "fp16"}, ["cand_dtype", "ref_dtype"], "my_bug.ipynb")
    >>> check_parameters({"cand_dtyp": "fp16"}, ["cand_dtype", "ref_dtype"], "my_bug.ipynb")
    Traceback (most recent call last):
    ...
    parity_kit.errors.ParityKitError: my_bug.ipynb has no parameter 'cand_dtyp' (did you mean 'cand_dtype'?); its parameters cell sets: cand_dtype, ref_dtype
    """
    unknown = [name for name in given if name not in known]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ParityKitError(f"{notebook} has no parameter {', '.join(hints)}; its parameters cell sets: "
                         f"{', '.join(known)}")


def _shown(value: Any) -> str:
    text = str(value) if isinstance(value, _Source) else repr(value)
    if isinstance(value, str) and not isinstance(value, _Source) and os.sep in value and Path(value).expanduser().exists():
        text += f" (folder {Path(value).expanduser().resolve()})"
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def report_header(name: str, parameters: dict[str, Any], started: str | None) -> str:
    """The markdown that opens a report's HTML: its name, when it ran and every parameter it ran with
    (kept with ``--hide-code``, which hides the parameters cell).

    >>> print(report_header("my_bug", {"cand_dtype": "fp16"}, None))
    # Report: my_bug
    <BLANKLINE>
    Made by `parity-kit report`. The parameters this run used (the parameters cell, with the values `-p` and `parity-kit report` set):
    <BLANKLINE>
    | parameter | value |
    | --- | --- |
    | `cand_dtype` | `'fp16'` |
    """
    when = f" on {started}" if started else ""
    rows = [f"| `{key}` | {_shown(value)} |" for key, value in parameters.items()]
    return "\n".join([f"# Report: {name}", "", f"Made by `parity-kit report`{when}. The parameters this run used "
                      "(the parameters cell, with the values `-p` and `parity-kit report` set):", "",
                      "| parameter | value |", "| --- | --- |", *rows])


def _export_report_html(executed: Path, html: Path, name: str, *, hide_code: bool) -> None:
    """The HTML of a report: the header first, the template's fill-in instructions left out."""
    nb = nbformat.read(executed, as_version=4)
    started = nb.metadata.get("papermill", {}).get("start_time")
    cells = [c for c in nb.cells if INSTRUCTIONS_TAG not in c.metadata.get("tags", [])]
    nb.cells = [nbformat.v4.new_markdown_cell(report_header(name, notebook_parameters(nb), started)), *cells]
    staged = executed.parent / f".{name}.html.ipynb"
    try:
        nbformat.write(nb, staged)
        export_html(staged, html, hide_code=hide_code)
    finally:
        staged.unlink(missing_ok=True)


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


def _artifacts(folder: Path, since: float | None, named: str | None = None) -> tuple[list[Path], list[Path]]:
    """Findings files and recording folders under ``folder`` written at or after ``since`` (all if None);
    with ``named``, only ``<named>.findings.json`` and the recordings under ``<named>.recordings/``."""
    if not folder.is_dir():
        return [], []
    slack = 2.0  # file-system timestamps are coarser than the clock papermill reads

    def fresh(p: Path) -> bool:
        return since is None or p.stat().st_mtime >= since - slack

    findings = sorted(p for p in folder.glob(f"{named or '*'}.findings.json") if fresh(p))
    records = folder / f"{named}{RECORDINGS_SUFFIX}" if named else folder
    recordings = sorted(p.parent for p in records.rglob("index.json")
                        if (p.parent / "tensors.safetensors").exists() and fresh(p))
    return findings, recordings


def _zip_recordings(recordings: Sequence[Path], root: Path, archive: Path) -> Path:
    with atomic_path(archive) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rec in recordings:
            for file in sorted(rec.rglob("*")):
                if file.is_file():
                    zf.write(file, file.relative_to(root).as_posix())
    return archive


def _report_name(name: str | None, src: Path) -> str:
    name = src.stem if name is None else name
    if not name or name != Path(name).name or name.startswith("."):
        raise ParityKitError(f"report name {name!r} must be a plain file name (no folder, not empty, no leading dot), "
                             "e.g. --name my_bug")
    return name


def _run_parameters(nb: Any, src: Path, name: str, out: Path, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """What papermill injects: the user's values, checked against the parameters cell, and ours."""
    cell = _parameters_cell(nb)
    if cell is None:
        raise ParityKitError(
            f"{src} has no cell tagged 'parameters', so its settings cannot be injected; in JupyterLab open the "
            "first code cell's property inspector and add the tag 'parameters' (or pass --no-execute)")
    known = list(_assignments(cell.source))
    check_parameters(parameters or {}, known, src.name)
    ours: dict[str, Any] = {"interactive": False, "reports_dir": str(out)}
    if REPORT_NAME_PARAMETER in known:
        ours[REPORT_NAME_PARAMETER] = name
    return {**ours, **(parameters or {})}


def make_report(
    notebook: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] = "reports",
    *,
    hide_code: bool = False,
    execute: bool = True,
    parameters: dict[str, Any] | None = None,
    progress: bool = True,
    name: str | None = None,
) -> ReportFiles:
    """Run a notebook headless (papermill, ``interactive=False``, ``reports_dir=out_dir``) and gather what
    to attach to a bug report in ``out_dir``: the executed copy, a self-contained HTML
    (:func:`parity_kit.present.report.export_html`: figures embedded, code hidden with ``hide_code``), the findings JSON the run wrote and ``<name>.recordings.zip`` of the
    recordings it saved. ``execute=False`` takes an already executed notebook as it is.

    Outputs are named ``<name>.*`` (default: the notebook's file name); a notebook whose parameters cell sets
    ``report_name`` gets it injected, so its findings and recordings carry the report's name too. A parameter
    the parameters cell does not set is refused. The HTML opens with the parameters the run used (also with
    ``hide_code``) and leaves out cells tagged ``template-instructions``.

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
    name = _report_name(name, src)
    out = Path(out_dir).resolve()
    executed = out / f"{name}.ipynb"
    html = out / f"{name}.html"
    error: str | None = None

    if execute:
        injected = _run_parameters(nb, src, name, out, parameters)
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        error = execute_notebook(src, executed, injected, progress=progress)
        reports_dir: Path | None = Path(injected["reports_dir"]).expanduser()
        if not reports_dir.is_absolute():
            reports_dir = (src.parent / reports_dir).resolve()
        since: float | None = started
    else:
        if parameters:
            raise ParityKitError("-p sets parameters for a run; with --no-execute nothing runs, so drop -p or --no-execute")
        out.mkdir(parents=True, exist_ok=True)
        if src.resolve() != executed:
            shutil.copyfile(src, executed)
        reports_dir = _notebook_reports_dir(nb, src.resolve())
        since = _run_started(nb)
    _export_report_html(executed, html, name, hide_code=hide_code)

    ran_as = notebook_parameters(nbformat.read(executed, as_version=4)).get(REPORT_NAME_PARAMETER)
    named = ran_as if isinstance(ran_as, str) and not isinstance(ran_as, _Source) else None
    findings, recordings = _artifacts(reports_dir, since, named) if reports_dir is not None else ([], [])
    copied = []
    for f in findings:
        target = out / f.name
        if f.resolve() != target:
            shutil.copyfile(f, target)
        copied.append(target)
    archive = None
    if recordings:
        archive = _zip_recordings(recordings, reports_dir, out / f"{name}{RECORDINGS_SUFFIX}.zip")
    return ReportFiles(executed, html, copied, archive, error)
