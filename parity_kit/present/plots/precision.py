"""Precision: what each module class removes, and the error/cost curve of a precision bisection."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ...errors import ParityKitError
from .ticks import tick_step


def class_sweep(table: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Bar chart of a :func:`parity_kit.sweep_by_class` table: the fraction of the output error each
    module class removes when kept in high precision (labelled with its instance count and parameter
    share), with the context rows (every listed class, the whole model) as reference bars.

    >>> t = pd.DataFrame({"kind": ["context", "class"], "class": ["whole model in fp32", "GroupNorm"],
    ...                   "n_modules": [1, 4], "param_fraction": [1.0, 0.01], "error_removed_fraction": [0.9, 0.5]})
    >>> type(class_sweep(t)).__name__
    'Figure'
    """
    missing = {"kind", "class", "n_modules", "param_fraction", "error_removed_fraction"} - set(table.columns)
    if missing:
        raise ParityKitError(f"the table lacks columns {sorted(missing)}; compute it with parity_kit.sweep_by_class")
    rows = pd.concat([table[table["kind"] == "class"],
                      table[(table["kind"] == "context") & (table["n_modules"] > 0)]])
    fig = Figure(figsize=(8.0, 1.2 + 0.38 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    removed = rows["error_removed_fraction"].astype(float).to_numpy()
    colors = ["tab:blue" if k == "class" else "tab:gray" for k in rows["kind"]]
    ax.barh(y, removed, color=colors)
    for yi, value, n, share in zip(y, removed, rows["n_modules"], rows["param_fraction"]):
        ax.annotate(f"{value:.1%}  ({n} modules, {share:.1%} of params)", (max(value, 0.0), yi),
                    textcoords="offset points", xytext=(4, -3), fontsize=8)
    ax.set_yticks(y, list(rows["class"]))
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlim(min(0.0, float(np.nanmin(removed)) * 1.1), 1.45)
    ax.set_xlabel("fraction of the output error removed (blue: one class in high precision; gray: context)")
    ax.set_title(title or "which module class causes the error")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def bisection_curve(result: Any, *, title: str | None = None) -> Figure:
    """Error/cost curve of a :func:`parity_kit.bisect_precision` result: the output error as the chosen
    modules are kept in high precision one by one (most important first), against the step (labelled
    with the module) and against the fraction of parameters kept, with target, floor and the
    all-candidates error drawn.

    >>> from parity_kit.analyses.precision import BisectionResult
    >>> c = pd.DataFrame({"step": [0, 1], "module": ["(none)", "a"], "error": [0.1, 0.01],
    ...                   "param_fraction": [0.0, 0.02], "linear_flop_fraction": [0.0, 0.0]})
    >>> r = BisectionResult(["a"], 4, 6, 3, 0.1, 0.005, 0.01, 0.05, 0.002, "rel_rms", "bf16", "fp32", c)
    >>> type(bisection_curve(r)).__name__
    'Figure'
    """
    curve = getattr(result, "curve", None)
    if not isinstance(curve, pd.DataFrame) or curve.empty:
        raise ParityKitError("pass the BisectionResult of parity_kit.bisect_precision (it carries .curve)")
    fig = Figure(figsize=(11.0, 4.2), layout="constrained")
    ax_step, ax_cost = fig.subplots(1, 2, sharey=True)
    error = curve["error"].astype(float).to_numpy()
    for ax, x, xlabel in ((ax_step, curve["step"].to_numpy(), "modules kept in high precision (in order)"),
                          (ax_cost, curve["param_fraction"].astype(float).to_numpy(),
                           "fraction of parameters kept in high precision")):
        ax.plot(x, np.where(error > 0, error, np.nan), marker="o", drawstyle="steps-post", color="tab:blue",
                label=f"{result.metric} of the output")
        ax.axhline(result.target_error, color="tab:red", ls="--", lw=1, label=f"target {result.target_error:.3g}")
        ax.axhline(result.error_all_high, color="tab:green", ls=":", lw=1,
                   label=f"all candidates in {result.high_dtype} {result.error_all_high:.3g}")
        if result.floor > 0:
            ax.axhline(result.floor, color="tab:gray", lw=1, label=f"{result.low_dtype} floor {result.floor:.3g}")
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    labels = [str(m) for m in curve["module"]]
    step = tick_step(len(labels))
    ax_step.set_xticks(curve["step"].to_numpy()[::step], labels[::step], rotation=60, ha="right", fontsize=7)
    ax_step.set_ylabel(result.metric)
    ax_cost.legend(fontsize=8, loc="best")
    fig.suptitle(title or f"precision bisection: {len(result.chosen)} of {result.n_candidates} modules, "
                          f"{result.passes} forward passes")
    return fig
