"""A calibrated comparison at a glance: each module's free-run and own error against their floors, coloured by
the judgement (:func:`parity_kit.comparison.floor.apply_floor`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ...errors import ParityKitError
from .ticks import tick_step

#: diagnosis -> marker colour
DIAGNOSIS_COLOURS = {"consistent with rounding": "tab:green", "inherited": "tab:orange",
                     "own error above floor": "tab:red", "above floor": "tab:purple", "not finite": "black"}


def _log_values(values: pd.Series) -> np.ndarray:
    v = values.astype(float).to_numpy()
    return np.where(v > 0, v, np.nan)


def verdicts_by_module(table: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Two panels over the judged rows in execution order (log scale): the free-run rel_rms with the calibrated
    floor above it, and each module's own error with its own floor; markers are coloured by the diagnosis, so
    a module that computes differently stands out in red while the error it passes on reads orange downstream.

    >>> t = pd.DataFrame({"module": ["a", "b"], "tensor": "output", "status": "ok", "rel_rms": [2e-3, 9e-2],
    ...                   "floor": [3e-3, 4e-3], "own_rel_rms": [2e-3, 8e-2], "own_floor": [3e-3, 3e-3],
    ...                   "diagnosis": ["consistent with rounding", "own error above floor"]})
    >>> len(verdicts_by_module(t).axes)
    2
    """
    needed = {"rel_rms", "floor", "own_rel_rms", "own_floor", "diagnosis", "module"}
    if not needed <= set(table.columns):
        raise ParityKitError(f"the table lacks {sorted(needed - set(table.columns))}; pass a judged table "
                             "(pk.compare_models or pk.apply_floor on a compare table)")
    ok = table[(table["status"] == "ok") & table["diagnosis"].notna()] if "status" in table.columns else table
    if ok.empty:
        raise ParityKitError("the table has no judged rows to plot; judge it with pk.compare_models or pk.apply_floor")
    labels = [m if t in ("output", None) else f"{m}:{t}" for m, t in zip(ok["module"], ok.get("tensor", [None] * len(ok)))]
    x = np.arange(len(ok))
    colours = [DIAGNOSIS_COLOURS.get(d, "tab:gray") for d in ok["diagnosis"]]
    fig = Figure(figsize=(max(6.0, min(0.18 * len(ok), 24.0)), 6.4), layout="constrained")
    free_ax, own_ax = fig.subplots(2, 1, sharex=True)
    for ax, error, floor, name in ((free_ax, "rel_rms", "floor", "free-run error"),
                                   (own_ax, "own_rel_rms", "own_floor", "own error (reference inputs)")):
        ax.step(x, _log_values(ok[floor]), where="mid", color="tab:gray", lw=1.2, label="calibrated floor")
        ax.plot(x, _log_values(ok[error]), color="tab:blue", lw=0.8, alpha=0.6)
        ax.scatter(x, _log_values(ok[error]), c=colours, s=14, zorder=3)
        ax.set_yscale("log")
        ax.set_ylabel(f"{name}\n(rel_rms)")
        ax.grid(True, which="major", axis="y", alpha=0.3)
    for diagnosis, colour in DIAGNOSIS_COLOURS.items():
        if (ok["diagnosis"] == diagnosis).any():
            free_ax.scatter([], [], c=colour, s=14, label=f"{diagnosis} ({int((ok['diagnosis'] == diagnosis).sum())})")
    free_ax.legend(fontsize=7, loc="upper left", ncols=2)
    step = tick_step(len(labels))
    own_ax.set_xticks(x[::step], labels[::step], rotation=90, fontsize=7)
    own_ax.set_xlabel("module (execution order)")
    free_ax.set_title(title or "errors against the calibrated floor")
    return fig


#: execution-floor verdict -> marker colour (anything "above every floor" is red)
EXECUTION_COLOURS = {"within rounding floor": "tab:green", "within run-to-run noise": "tab:cyan",
                     "within batch variance": "tab:blue", "within kernel-setting variance": "tab:purple"}
_FLOOR_LINES = (("floor", "rounding floor", "tab:gray"), ("run_to_run_floor", "run-to-run", "tab:cyan"),
                ("batch_floor", "batch variance", "tab:blue"), ("kernel_settings_floor", "kernel settings", "tab:purple"))


def execution_floors(table: pd.DataFrame, *, tolerance: float = 2.0, title: str | None = None) -> Figure:
    """Each module's observed rel_rms (markers coloured by which floor explains it) against the rounding floor and
    the measured execution floors (lines, ×``tolerance``), rows in execution order, log scale.

    >>> t = pd.DataFrame({"module": ["a", "b"], "tensor": "output", "status": "ok", "rel_rms": [2e-3, 9e-2],
    ...                   "floor": [1e-3, 1e-3], "run_to_run_floor": [0.0, 0.0], "batch_floor": [3e-3, 3e-3],
    ...                   "execution_floor": [3e-3, 3e-3], "verdict": ["within batch variance", "above every floor ×28"]})
    >>> len(execution_floors(t).axes[0].lines)
    3
    """
    if "execution_floor" not in table.columns:
        raise ParityKitError("the table has no execution floor: compare with pk.compare(ref, cand, "
                             "execution_floor=pk.execution_floor(...))")
    ok = table[table["status"] == "ok"] if "status" in table.columns else table
    if ok.empty:
        raise ParityKitError("the table has no comparable rows to plot")
    labels = [m if t in ("output", None) else f"{m}:{t}" for m, t in zip(ok["module"], ok.get("tensor", [None] * len(ok)))]
    x = np.arange(len(ok))
    fig = Figure(figsize=(max(6.0, min(0.18 * len(ok), 24.0)), 4.2), layout="constrained")
    ax = fig.subplots()
    for column, name, colour in _FLOOR_LINES:
        if column in ok.columns:
            ax.step(x, _log_values(tolerance * ok[column]), where="mid", color=colour, lw=1.1,
                    label=f"{name} ×{tolerance:g}")
    colours = [EXECUTION_COLOURS.get(v, "tab:red") for v in ok["verdict"].astype(str)]
    ax.scatter(x, _log_values(ok["rel_rms"]), c=colours, s=14, zorder=3)
    for verdict, colour in EXECUTION_COLOURS.items():
        n = int((ok["verdict"] == verdict).sum())
        if n:
            ax.scatter([], [], c=colour, s=14, label=f"{verdict} ({n})")
    above = int(ok["verdict"].astype(str).str.startswith("above every floor").sum())
    if above:
        ax.scatter([], [], c="tab:red", s=14, label=f"above every floor ({above})")
    ax.set_yscale("log")
    ax.set_ylabel("rel_rms")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", ncols=2)
    step = tick_step(len(labels))
    ax.set_xticks(x[::step], labels[::step], rotation=90, fontsize=7)
    ax.set_xlabel("module (execution order)")
    ax.set_title(title or "observed difference against the rounding and execution floors")
    return fig
