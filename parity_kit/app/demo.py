"""Run every story notebook headless with papermill and collect executed copies, HTML and findings."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ParityKitError
from .._util.paths import notebooks_dir as packaged_notebooks
from ..present.progress_bars import settle_progress_bars
from ..present.report import export_html, read_findings
from .progress import CellProgress, clock, previous_durations, register_engine

# The kernel runs on this machine; IPC sockets (POSIX only) keep its traffic off the network, and
# ipykernel's warning about unencrypted TCP out of the terminal.
_KERNEL_OVER_IPC = {"KernelManager": {"transport": "ipc"}} if os.name == "posix" else {}


@dataclass
class NotebookResult:
    """Outcome of one notebook run by :func:`run_demo`."""

    name: str
    status: str               # "ok" | "failed" | "no findings"
    runtime_s: float
    headline: str             # the findings' conclusion, or the error
    executed: Path | None     # reports/<name>.ipynb
    html: Path | None         # reports/<name>.html
    findings: Path | None     # reports/<name>.findings.json


def _short_name(stem: str) -> str:
    return re.sub(r"^\d+_", "", stem)


def discover_notebooks(notebooks_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The notebooks ``parity-kit demo`` runs: ``<notebooks_dir>/[0-9]*.ipynb`` in name order (default: the
    notebooks shipped in the package, ``parity_kit/notebooks/``).

    >>> [p.name for p in discover_notebooks()][:1]
    ['00_quickstart.ipynb']
    """
    folder = Path(notebooks_dir) if notebooks_dir is not None else packaged_notebooks()
    if not folder.is_dir():
        raise ParityKitError(f"notebooks folder {folder} does not exist; pass --notebooks DIR")
    found = sorted(folder.glob("[0-9]*.ipynb"))
    if not found:
        raise ParityKitError(f"no notebooks matching [0-9]*.ipynb in {folder}; pass --notebooks DIR")
    return found


def select_notebooks(notebooks: Sequence[Path], only: Sequence[str] | None) -> list[Path]:
    """Keep the notebooks named in ``only`` (``"00_quickstart"``, ``"quickstart"`` or the file name).

    >>> select_notebooks([Path("00_quickstart.ipynb"), Path("04_bos_token.ipynb")], ["bos_token"])
    [PosixPath('04_bos_token.ipynb')]
    """
    if not only:
        return list(notebooks)
    chosen: list[Path] = []
    for wanted in only:
        key = wanted.removesuffix(".ipynb")
        matches = [p for p in notebooks if key in (p.stem, _short_name(p.stem))]
        if not matches:
            available = ", ".join(f"{p.stem} ({_short_name(p.stem)})" for p in notebooks)
            raise ParityKitError(f"no notebook named {wanted!r}; available: {available}")
        chosen += [p for p in matches if p not in chosen]
    return chosen


@contextlib.contextmanager
def _this_interpreter_as_python3() -> Iterator[None]:
    """Make the kernel named ``python3`` run this very interpreter.

    papermill asks for the kernelspec ``python3``; a user-level spec (``~/.local/share/jupyter``) could
    point at another Python without parity_kit. ``JUPYTER_PATH`` is searched first, so a spec placed
    there wins for the duration of the run.
    """
    with tempfile.TemporaryDirectory(prefix="parity-kit-kernel-") as tmp:
        spec_dir = Path(tmp) / "kernels" / "python3"
        spec_dir.mkdir(parents=True)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = os.pathsep.join([tmp, *([old] if old else [])])
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


def _error_summary(exc: BaseException) -> str:
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    return f"{ename}: {evalue}".strip().splitlines()[0]


def execute_notebook(
    notebook: Path, executed: Path, parameters: dict[str, object], *, progress: bool = True
) -> str | None:
    """Run ``notebook`` with papermill into ``executed``; return None, or a one-line summary of the error.

    The executed copy is written even when a cell fails (it shows the error) and appears only once
    the run has ended, so a reader never sees a half-run notebook. Runs in the notebook's folder with
    this interpreter as the ``python3`` kernel, talking to it over local IPC sockets (not TCP on localhost).
    ``progress`` prints each cell's start, elapsed time and an estimate to stderr
    (:class:`parity_kit.app.progress.CellProgress`); progress bars in the copy show how they ended
    (:func:`parity_kit.present.progress_bars.settle_progress_bars`).
    """
    import nbformat
    import papermill
    from traitlets.config import Config

    partial = executed.parent / f".{executed.stem}.running.ipynb"
    error: str | None = None
    reporter = CellProgress(executed.stem, previous_durations(executed, parameters)) if progress else None
    try:
        with _this_interpreter_as_python3():
            papermill.execute_notebook(str(notebook), str(partial), parameters=parameters,
                                       cwd=str(notebook.parent.resolve()), kernel_name="python3",
                                       engine_name=register_engine(reporter), progress_bar=False,
                                       config=Config(_KERNEL_OVER_IPC))
    except Exception as e:  # a failing cell, a dead kernel, a bad parameter: report it, keep what ran
        error = _error_summary(e)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if not partial.exists():
        raise ParityKitError(f"{notebook} could not be executed: {error}")
    ran = nbformat.read(partial, as_version=4)
    if settle_progress_bars(ran):
        nbformat.write(ran, partial)
    os.replace(partial, executed)
    return error


def run_notebook(
    notebook: Path, reports_dir: Path, *, smoke: bool = False, progress: bool = True
) -> NotebookResult:
    """Execute one notebook headless; write its executed copy, HTML and (from the notebook) findings.

    A failing notebook still gets its executed copy and HTML, which show the error.

    >>> r = run_notebook(Path("notebooks/00_quickstart.ipynb"), Path("reports"), smoke=True)  # doctest: +SKIP
    >>> r.status  # doctest: +SKIP
    'ok'
    """
    reports_dir.mkdir(parents=True, exist_ok=True)
    name = notebook.stem
    executed = reports_dir / f"{name}.ipynb"
    html = reports_dir / f"{name}.html"
    findings = reports_dir / f"{name}.findings.json"
    # A findings file left from an earlier run must not pass for this run's result.
    findings.unlink(missing_ok=True)
    start = time.perf_counter()
    parameters = {"interactive": False, "smoke": smoke, "reports_dir": str(reports_dir.resolve())}
    try:
        error = execute_notebook(notebook, executed, parameters, progress=progress)
    except ParityKitError as e:  # not even an executed copy: report it and go on with the others
        runtime = time.perf_counter() - start
        return NotebookResult(name, "failed", runtime, str(e), None, None, None)
    export_html(executed, html)
    runtime = time.perf_counter() - start
    if error is not None:
        return NotebookResult(name, "failed", runtime, error, executed, html, None)
    if not findings.exists():
        return NotebookResult(
            name, "no findings", runtime,
            f"the notebook ran but wrote no {findings.name}; its last cell must call pk.write_findings",
            executed, html, None,
        )
    return NotebookResult(name, "ok", runtime, read_findings(findings)["conclusion"], executed, html, findings)


def run_demo(
    notebooks_dir: str | os.PathLike[str] | None = None,
    reports_dir: str | os.PathLike[str] = "reports",
    *,
    only: Sequence[str] | None = None,
    smoke: bool = False,
    progress: bool = True,
) -> list[NotebookResult]:
    """Run the selected notebooks one after another (a failure does not stop the others).

    >>> results = run_demo(only=["quickstart"], smoke=True)  # doctest: +SKIP
    >>> [r.status for r in results]  # doctest: +SKIP
    ['ok']
    """
    notebooks = select_notebooks(discover_notebooks(notebooks_dir), only)
    out = Path(reports_dir)
    results = []
    started = time.perf_counter()
    for i, nb in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {nb.stem}  (demo elapsed {clock(time.perf_counter() - started)})",
              file=sys.stderr, flush=True)
        results.append(run_notebook(nb, out, smoke=smoke, progress=progress))
    return results


def summary_table(results: Sequence[NotebookResult], width: int = 90) -> str:
    """A plain-text table: notebook, status, runtime, headline finding (truncated to ``width``).

    >>> print(summary_table([NotebookResult("00_quickstart", "ok", 1.5, "bf16 stays close", None, None, None)]))
    notebook       status  runtime  headline
    00_quickstart  ok         1.5s  bf16 stays close
    """
    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 1] + "…"

    rows = [("notebook", "status", "runtime", "headline")]
    rows += [(r.name, r.status, f"{r.runtime_s:.1f}s", cut(r.headline)) for r in results]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c:>{w2}}  {d}".rstrip() for a, b, c, d in rows)
