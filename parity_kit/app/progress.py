"""What a headless notebook run shows in the terminal: which notebook, which cell and step, time elapsed,
and an estimate of the time left (from the durations papermill stored in the previous executed copy).

papermill's own bar counts cells and nothing else, so a cell that runs for twenty minutes looks like a hang;
:class:`CellProgress` prints a line when each code cell starts, one every ``heartbeat_s`` while it runs,
and one when the notebook ends.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

ENGINE_NAME = "parity-kit"


def clock(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) of a duration.

    >>> clock(42.4), clock(754), clock(3725)
    ('0:42', '12:34', '1:02:05')
    """
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def previous_durations(executed: Path, parameters: dict[str, object]) -> dict[str, float]:
    """Seconds each code cell (keyed by its source) took in the previous run stored at ``executed``, if that
    run had the same ``smoke`` setting; empty when there is none to go by.

    >>> previous_durations(Path("no/such.ipynb"), {"smoke": True})
    {}
    """
    import nbformat

    try:
        nb = nbformat.read(executed, as_version=4)
    except Exception:  # missing or unreadable: no estimate, the run itself is unaffected
        return {}
    ran_with = nb.metadata.get("papermill", {}).get("parameters", {})
    if bool(ran_with.get("smoke", False)) != bool(parameters.get("smoke", False)):
        return {}
    durations = {}
    for cell in nb.cells:
        seconds = cell.metadata.get("papermill", {}).get("duration")
        if cell.cell_type == "code" and isinstance(seconds, (int, float)):
            durations[cell.source] = float(seconds)
    return durations


def _step(cells: list[Any], index: int) -> str:
    """The heading of the markdown cell above cell ``index`` (the notebook's section), "parameters", or ''."""
    tags = cells[index].metadata.get("tags", [])
    if "injected-parameters" in tags or "parameters" in tags:
        return "parameters" + (" (injected)" if "injected-parameters" in tags else "")
    for cell in reversed(cells[:index]):
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return ""


class CellProgress:
    """Prints the progress of one notebook run to ``stream`` (see the module docstring).

    >>> import io, nbformat
    >>> cells = [nbformat.v4.new_markdown_cell("## 1. Load"), nbformat.v4.new_code_cell("x = 1")]
    >>> out = io.StringIO()
    >>> p = CellProgress("00_quickstart", {"x = 1": 3.0}, stream=out, now=lambda: 0.0)
    >>> p.start(cells); p.cell_start(cells, 1); p.cell_complete(); p.finish()
    >>> print(out.getvalue().strip())
    00_quickstart  1 code cells, about 0:03 (the previous run)
    00_quickstart  cell 1/1  1. Load  elapsed 0:00  about 0:03 left (from the previous run)
    00_quickstart  finished in 0:00
    """

    def __init__(self, label: str, durations: dict[str, float] | None = None, *, stream: TextIO | None = None,
                 heartbeat_s: float = 60.0, now: Callable[[], float] = time.monotonic) -> None:
        self.label, self.durations = label, durations or {}
        self.stream = stream if stream is not None else sys.stderr
        self.heartbeat_s, self.now = heartbeat_s, now
        self.started = self.cell_started = now()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _print(self, text: str) -> None:
        print(f"{self.label}  {text}", file=self.stream, flush=True)

    def start(self, cells: list[Any]) -> None:
        self.started = self.now()
        known = [self.durations[c.source] for c in cells if c.cell_type == "code" and c.source in self.durations]
        n_code = sum(c.cell_type == "code" for c in cells)
        if known and len(known) == n_code:
            self._print(f"{n_code} code cells, about {clock(sum(known))} (the previous run)")

    def _estimate(self, cells: list[Any], index: int) -> str:
        rest = [c for c in cells[index:] if c.cell_type == "code"]
        known = [self.durations[c.source] for c in rest if c.source in self.durations]
        if not known:
            return "no estimate yet (the next run estimates from this one)"
        bound = "at least " if len(known) < len(rest) else ""
        return f"{bound}about {clock(sum(known))} left (from the previous run)"

    def cell_start(self, cells: list[Any], index: int) -> None:
        cell = cells[index]
        if cell.cell_type != "code":
            return
        code = [i for i, c in enumerate(cells) if c.cell_type == "code"]
        step = _step(cells, index)
        self._print(f"cell {code.index(index) + 1}/{len(code)}  {step + '  ' if step else ''}"
                    f"elapsed {clock(self.now() - self.started)}  {self._estimate(cells, index)}")
        self._stop_beat()
        self.cell_started = self.now()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, args=(self._stop, code.index(index) + 1, len(code)),
                                      daemon=True)
        self._beat.start()

    def _heartbeat(self, stop: threading.Event, number: int, total: int) -> None:
        while not stop.wait(self.heartbeat_s):
            self._print(f"  still in cell {number}/{total}: {clock(self.now() - self.cell_started)} in this cell, "
                        f"elapsed {clock(self.now() - self.started)}")

    def _stop_beat(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None

    def cell_complete(self) -> None:
        self._stop_beat()

    def finish(self) -> None:
        self._stop_beat()
        self._print(f"finished in {clock(self.now() - self.started)}")


def register_engine(progress: CellProgress | None) -> str:
    """Register the papermill engine that reports to ``progress`` (None: quiet); returns its name for
    ``papermill.execute_notebook(engine_name=...)``.

    >>> register_engine(None)
    'parity-kit'
    """
    from papermill.engines import papermill_engines

    engine = _engine_class()
    engine.progress = progress
    papermill_engines.register(ENGINE_NAME, engine)
    return ENGINE_NAME


@functools.cache
def _engine_class() -> Any:
    """papermill's nbclient engine, with an execution manager that tells :attr:`progress` about each cell."""
    from papermill.engines import NBClientEngine, NotebookExecutionManager

    class _Manager(NotebookExecutionManager):
        def notebook_start(self, **kwargs: Any) -> None:
            super().notebook_start(**kwargs)
            if _Engine.progress is not None:
                _Engine.progress.start(self.nb.cells)

        def cell_start(self, cell: Any, cell_index: int | None = None, **kwargs: Any) -> None:
            super().cell_start(cell, cell_index, **kwargs)
            if _Engine.progress is not None and cell_index is not None:
                _Engine.progress.cell_start(self.nb.cells, cell_index)

        def cell_complete(self, cell: Any, cell_index: int | None = None, **kwargs: Any) -> None:
            super().cell_complete(cell, cell_index, **kwargs)
            if _Engine.progress is not None:
                _Engine.progress.cell_complete()

    class _Engine(NBClientEngine):
        progress: CellProgress | None = None

        @classmethod
        def execute_notebook(cls, nb: Any, kernel_name: str, output_path: str | None = None,
                             progress_bar: bool = False, log_output: bool = False, autosave_cell_every: int = 30,
                             **kwargs: Any) -> Any:
            manager = _Manager(nb, output_path=output_path, progress_bar=False, log_output=log_output,
                               autosave_cell_every=autosave_cell_every)
            manager.notebook_start()
            try:
                cls.execute_managed_notebook(manager, kernel_name, log_output=log_output, **kwargs)
            finally:
                manager.notebook_complete()
                if cls.progress is not None:
                    cls.progress.finish()
            return manager.nb

    return _Engine
