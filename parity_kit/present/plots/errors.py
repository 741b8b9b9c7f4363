"""Errors of a comparison: by module, by token position, by layer and kind, own vs inherited."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from ...errors import ParityKitError
from .ticks import tick_step




def error_by_module(table: pd.DataFrame, metric: str = "rel_rms", *, title: str | None = None) -> Figure:
    """Log-scale error of every comparable row of a :func:`parity_kit.compare` table, in execution
    order, with the noise floor (rel_rms of rounding the reference to the candidate dtype) drawn
    when ``metric`` is rel_rms. Exact zeros cannot sit on a log axis; they are marked at the bottom.

    >>> t = pd.DataFrame({"module": ["a", "b"], "tensor": "output", "rel_rms": [1e-4, 1e-2],
    ...                   "floor": [1e-4, 1e-4], "status": "ok"})
    >>> type(error_by_module(t)).__name__
    'Figure'
    """
    if metric not in table.columns:
        raise ParityKitError(f"metric {metric!r} is not a column of the table; pass a column of compare()'s table")
    ok = table[table["status"] == "ok"] if "status" in table.columns else table
    values = ok[metric].astype(float).to_numpy()
    if len(values) == 0:
        raise ParityKitError("the table has no comparable ('ok') rows to plot; check the statuses of compare()")
    labels = [m if t in ("output", None) else f"{m}:{t}" for m, t in zip(ok["module"], ok.get("tensor", [None] * len(ok)))]
    x = np.arange(len(values))
    fig = Figure(figsize=(max(6.0, min(0.18 * len(values), 24.0)), 4.2), layout="constrained")
    ax = fig.add_subplot()
    positive = values[np.isfinite(values) & (values > 0)]
    bottom = positive.min() / 10 if positive.size else 1e-12
    shown = np.where(values > 0, values, np.nan)
    ax.plot(x, shown, marker="o", ms=3, lw=1, label=metric)
    zeros = values == 0
    if zeros.any():
        ax.plot(x[zeros], np.full(zeros.sum(), bottom), ls="none", marker="v", ms=4, color="tab:green",
                label=f"exactly 0 ({int(zeros.sum())})")
    if metric == "rel_rms" and "floor" in ok.columns:
        floor = ok["floor"].astype(float).to_numpy()
        ax.step(x, np.where(floor > 0, floor, np.nan), where="mid", color="tab:gray", lw=1.2,
                label="floor (rounding to the candidate dtype)")
    ax.set_yscale("log")
    ax.set_ylim(bottom=bottom / 2)
    step = tick_step(len(labels))
    ax.set_xticks(x[::step], labels[::step], rotation=90, fontsize=7)
    ax.set_xlabel("module (execution order)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} by module")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def token_heatmap(per_token: pd.DataFrame, *, title: str | None = None, metric: str = "rel_rms") -> Figure:
    """Module × token heatmap of a :func:`parity_kit.per_token_error` frame on a log colour scale
    (zeros and missing values are left blank).

    >>> df = pd.DataFrame([[1e-4, 1e-2], [1e-3, 1e-1]], index=["l0", "l1"])
    >>> type(token_heatmap(df)).__name__
    'Figure'
    """
    data = per_token.to_numpy(dtype=float)
    if data.size == 0:
        raise ParityKitError("the per-token frame is empty; compute it with parity_kit.per_token_error")
    masked = np.ma.masked_where(~np.isfinite(data) | (data <= 0), data)
    fig = Figure(figsize=(max(6.0, min(0.12 * data.shape[1] + 3, 20.0)), max(3.0, min(0.25 * data.shape[0] + 1.5, 14.0))),
                 layout="constrained")
    ax = fig.add_subplot()
    if masked.count():
        norm = LogNorm(vmin=float(masked.min()), vmax=max(float(masked.max()), float(masked.min()) * 10))
    else:
        norm = LogNorm(vmin=1e-12, vmax=1.0)
    image = ax.imshow(masked, aspect="auto", interpolation="nearest", norm=norm, cmap="viridis")
    fig.colorbar(image, ax=ax, label=metric)
    step = tick_step(data.shape[0])
    ax.set_yticks(np.arange(data.shape[0])[::step], [str(i) for i in per_token.index][::step], fontsize=7)
    ax.set_xlabel("token position")
    ax.set_ylabel("module")
    ax.set_title(title or f"per-token {metric}")
    return fig


_LAYER_RE = re.compile(r"^(?P<prefix>.*?)(?:^|\.)(?:layers|layer|h|blocks|block)\.(?P<i>\d+)(?:\.(?P<rest>.*))?$")


def _layer_and_kind(name: str) -> tuple[int | None, str]:
    """("model.layers.3.attn.g_norm") -> (3, "attn.g_norm"); a name outside the layers -> (None, name)."""
    m = _LAYER_RE.match(name)
    if m is None:
        return None, name
    return int(m.group("i")), m.group("rest") or "(block)"


def layer_error_growth(table: pd.DataFrame, metric: str = "rel_rms", *, kinds: Sequence[str] | None = None,
                       max_kinds: int = 8, title: str | None = None) -> Figure:
    """Error against layer index, one line per module kind (the name after ``layers.<i>.``, e.g.
    ``attn.g_norm``), log scale, with each kind's noise floor dashed. Takes a :func:`parity_kit.compare`
    table (``metric`` a column such as "rel_rms") or a local-vs-propagated table ("free_rel_rms",
    "local_rel_rms"). ``kinds`` picks the lines; by default the ``max_kinds`` kinds with the largest error.

    >>> t = pd.DataFrame({"module": [f"model.layers.{i}.attn.g_norm" for i in range(3)], "call": 0,
    ...                   "tensor": "output", "rel_rms": [1e-3, 2e-3, 4e-3], "floor": [1e-3] * 3, "status": "ok"})
    >>> type(layer_error_growth(t)).__name__
    'Figure'
    """
    if metric not in table.columns:
        raise ParityKitError(f"metric {metric!r} is not a column of the table; columns: {list(table.columns)}")
    ok = table[table["status"] == "ok"] if "status" in table.columns else table
    if "call" in ok.columns:
        ok = ok[ok["call"] == 0]
    if "tensor" in ok.columns:  # the primary output leaf of each module
        ok = ok[ok["tensor"].isin(["output", "output.0"])]
    parsed = [_layer_and_kind(n) for n in ok["module"]]
    frame = pd.DataFrame({"layer": [p[0] for p in parsed], "kind": [p[1] for p in parsed],
                          "value": ok[metric].astype(float).to_numpy(),
                          "floor": ok["floor"].astype(float).to_numpy() if "floor" in ok.columns else np.nan})
    frame = frame[frame["layer"].notna()]
    if frame.empty:
        raise ParityKitError("no row of the table names a module inside numbered layers ('layers.<i>.'); "
                             "record modules such as 'model.layers.*'")
    if kinds is None:
        kinds = list(frame.groupby("kind")["value"].max().sort_values(ascending=False).index[:max_kinds])
    else:
        missing = set(kinds) - set(frame["kind"])
        if missing:
            raise ParityKitError(f"kinds {sorted(missing)} not in the table; available: {sorted(set(frame['kind']))}")
    fig = Figure(figsize=(8.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(kinds))]
    for kind, color in zip(kinds, colors):
        part = frame[frame["kind"] == kind].sort_values("layer")
        values = part["value"].to_numpy()
        ax.plot(part["layer"], np.where(values > 0, values, np.nan), marker="o", ms=4, color=color, label=kind)
        floor = part["floor"].to_numpy()
        if np.isfinite(floor).any():
            ax.plot(part["layer"], np.where(floor > 0, floor, np.nan), ls="--", lw=0.9, color=color, alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(metric)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best", title="solid: error, dashed: floor", title_fontsize=8)
    ax.set_title(title or f"{metric} by layer")
    return fig


def local_vs_propagated_waterfall(table: pd.DataFrame, metric: str = "rel_rms", *, title: str | None = None) -> Figure:
    """For each module of a :func:`parity_kit.local_vs_propagated` table (execution order, grouped by
    layer): the free-run error as a light bar and the module's own (local) error as a dark bar in
    front of it, so the light part above the dark one is inherited; the noise floor as a gray step.

    >>> t = pd.DataFrame({"module": ["layers.0.n", "layers.1.n"], "call": 0, "tensor": "output", "status": "ok",
    ...                   "local_rel_rms": [1e-2, 1e-3], "free_rel_rms": [1e-2, 2e-2], "floor": [1e-3, 1e-3]})
    >>> type(local_vs_propagated_waterfall(t)).__name__
    'Figure'
    """
    local_col, free_col = f"local_{metric}", f"free_{metric}"
    missing = {local_col, free_col, "module"} - set(table.columns)
    if missing:
        raise ParityKitError(f"the table lacks columns {sorted(missing)}; compute it with "
                             f"parity_kit.local_vs_propagated (metric={metric!r})")
    ok = table[table["status"] == "ok"] if "status" in table.columns else table
    if "tensor" in ok.columns:
        ok = ok[ok["tensor"].isin(["output", "output.0"])]
    if ok.empty:
        raise ParityKitError("the table has no comparable ('ok') rows to plot")
    local = ok[local_col].astype(float).to_numpy()
    free = ok[free_col].astype(float).to_numpy()
    positive = np.concatenate([local[local > 0], free[free > 0]])
    bottom = positive.min() / 10 if positive.size else 1e-12
    x = np.arange(len(ok))
    fig = Figure(figsize=(max(7.0, min(0.35 * len(ok) + 2, 24.0)), 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(x, np.maximum(free, bottom) - bottom, bottom=bottom, color="tab:orange", alpha=0.45,
           label="free run (own + inherited)")
    ax.bar(x, np.maximum(local, bottom) - bottom, bottom=bottom, width=0.5, color="tab:blue",
           label="local (fed the reference inputs)")
    if "floor" in ok.columns:
        floor = ok["floor"].astype(float).to_numpy()
        ax.step(x, np.where(floor > 0, floor, np.nan), where="mid", color="tab:gray", lw=1.2, label="floor")
    parsed = [_layer_and_kind(str(name)) for name in ok["module"]]
    labels = []
    for i, (layer, kind) in enumerate(parsed):
        new_layer = i == 0 or layer != parsed[i - 1][0]
        labels.append(f"L{layer} {kind}" if layer is not None and new_layer else kind)
        if i > 0 and new_layer:  # a thin rule where a new layer starts
            ax.axvline(i - 0.5, color="black", lw=0.4, alpha=0.4)
    step = tick_step(len(labels))
    ax.set_xticks(x[::step], labels[::step], rotation=90, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(bottom=bottom)
    ax.set_ylabel(metric)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or f"local vs propagated {metric} (execution order)")
    return fig
