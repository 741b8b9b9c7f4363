"""Chunked vs recurrent prefill: error by position, length and chunk size, and the state at chunk boundaries."""

from __future__ import annotations


import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ...errors import ParityKitError


_PREFILL_COLORS = {"recurrent_fp32_state": "tab:blue", "recurrent_low_state": "tab:cyan", "chunk_fp32": "tab:green",
                   "chunk_low": "tab:orange", "fla_chunk": "tab:red", "fla_fused_recurrent": "tab:purple",
                   "reference_rounded": "tab:gray"}


_PREFILL_STYLES = {"bf16": "-", "fp16": "--", "fp32": ":", "fp64": "-."}


def _prefill_select(frame: pd.DataFrame, reference: str, metric: str, **equal: object) -> pd.DataFrame:
    """Rows of a parity_kit.analyses.prefill table for one reference (and column values), with a usable metric."""
    needed = {"mode", "dtype", "reference", metric, *equal}
    missing = needed - set(frame.columns)
    if missing:
        raise ParityKitError(f"the table lacks columns {sorted(missing)}; pass a table from parity_kit.analyses.prefill "
                             "(compare_prefill(...).summary / .boundaries / .per_token, or sweep(...))")
    rows = frame[frame["reference"] == reference]
    for column, value in equal.items():
        rows = rows[rows[column] == value]
    if "status" in rows.columns:
        rows = rows[rows["status"] == "ok"]
    if rows.empty:
        raise ParityKitError(f"no measured rows for reference={reference!r} {equal or ''}; references in the table: "
                             f"{sorted(frame['reference'].unique())}")
    return rows


def _prefill_lines(ax: object, rows: pd.DataFrame, x: str, metric: str, marker: str | None = "o") -> None:
    """One line per (mode, dtype): colour by mode, line style by dtype; zeros are left off the log axis."""
    for (mode, dtype), group in rows.groupby(["mode", "dtype"], sort=False):
        group = group.sort_values(x)
        y = group[metric].astype(float).to_numpy()
        ax.plot(group[x].to_numpy(), np.where(y > 0, y, np.nan), marker=marker, ms=3, lw=1.2,  # type: ignore[attr-defined]
                color=_PREFILL_COLORS.get(str(mode), None), ls=_PREFILL_STYLES.get(str(dtype), "-"),
                label=f"{mode} ({dtype})")
    ax.set_yscale("log")  # type: ignore[attr-defined]
    ax.grid(True, which="both", alpha=0.25)  # type: ignore[attr-defined]


def prefill_error_vs_position(per_token: pd.DataFrame, *, metric: str = "max_abs", reference: str = "fp64",
                              title: str | None = None) -> Figure:
    """Output error of every token (``compare_prefill(...).per_token``) against ``reference``, one line per
    mode and dtype, with the chunk boundaries drawn as thin vertical rules.

    >>> t = pd.DataFrame({"mode": "chunk_low", "dtype": "bf16", "reference": "fp64", "chunk_size": 2,
    ...                   "position": [0, 1, 2, 3], "max_abs": [0.1, 0.2, 0.1, 0.3]})
    >>> type(prefill_error_vs_position(t)).__name__
    'Figure'
    """
    rows = _prefill_select(per_token, reference, metric)
    fig = Figure(figsize=(9.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    _prefill_lines(ax, rows, "position", metric, marker=None)
    if "chunk_size" in rows.columns:
        chunk = int(rows["chunk_size"].iloc[0])
        last = int(rows["position"].max()) + 1
        for pos in range(chunk, last, chunk):
            ax.axvline(pos, color="black", lw=0.4, alpha=0.25)
    ax.set_xlabel("token position (vertical rules: chunk boundaries)")
    ax.set_ylabel(f"output {metric} vs {reference}")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or f"output error by position (against {reference})")
    return fig


def prefill_error_vs_length(summary: pd.DataFrame, *, metric: str = "max_abs", reference: str = "fp64",
                            title: str | None = None) -> Figure:
    """Output and final-state error against the prefill length ``T`` (a :func:`parity_kit.analyses.prefill.sweep`
    table), two panels, one line per mode and dtype, log-log.

    >>> t = pd.DataFrame({"mode": "chunk_low", "dtype": "bf16", "reference": "fp64", "tensor": ["output", "state"] * 2,
    ...                   "T": [256, 256, 512, 512], "max_abs": [0.1, 0.01, 0.2, 0.02]})
    >>> len(prefill_error_vs_length(t).axes)
    2
    """
    return _prefill_two_panels(summary, "T", metric, reference, "prefill length T (tokens)",
                               title or f"error vs prefill length (against {reference})", log_x=True)


def prefill_error_vs_chunk_size(summary: pd.DataFrame, *, metric: str = "max_abs", reference: str = "fp64",
                                title: str | None = None) -> Figure:
    """Output and final-state error against the chunk size (a sweep over ``chunk_sizes``), one line per mode and dtype.

    >>> t = pd.DataFrame({"mode": "chunk_low", "dtype": "bf16", "reference": "fp64", "tensor": ["output", "state"] * 2,
    ...                   "chunk_size": [16, 16, 64, 64], "max_abs": [0.1, 0.01, 0.2, 0.02]})
    >>> len(prefill_error_vs_chunk_size(t).axes)
    2
    """
    return _prefill_two_panels(summary, "chunk_size", metric, reference, "chunk size L (tokens)",
                               title or f"error vs chunk size (against {reference})", log_x=True)


def _prefill_two_panels(summary: pd.DataFrame, x: str, metric: str, reference: str, xlabel: str, title: str,
                        log_x: bool) -> Figure:
    if x not in summary.columns or "tensor" not in summary.columns:
        raise ParityKitError(f"the table needs columns {x!r} and 'tensor'; pass parity_kit.analyses.prefill.sweep(...)")
    rows = _prefill_select(summary, reference, metric)
    fig = Figure(figsize=(11.0, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, tensor in zip(axes, ("output", "state")):
        part = rows[rows["tensor"] == tensor]
        if part.empty:
            ax.set_axis_off()
            continue
        _prefill_lines(ax, part, x, metric)
        if log_x:
            ax.set_xscale("log", base=2)
            ticks = sorted(part[x].unique())
            ax.set_xticks(ticks, [str(int(t)) for t in ticks])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{tensor} {metric}" + (" (final state)" if tensor == "state" else ""))
        ax.set_title(tensor)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    return fig


def prefill_state_at_boundaries(boundaries: pd.DataFrame, *, metric: str = "max_abs", reference: str = "fp64",
                                title: str | None = None) -> Figure:
    """State error at every chunk boundary (``compare_prefill(...).boundaries``), one line per mode and dtype.

    >>> t = pd.DataFrame({"mode": "chunk_low", "dtype": "bf16", "reference": "fp64", "tensor": "state",
    ...                   "position": [0, 64, 128], "max_abs": [0.0, 0.01, 0.02]})
    >>> type(prefill_state_at_boundaries(t)).__name__
    'Figure'
    """
    rows = _prefill_select(boundaries, reference, metric, tensor="state")
    fig = Figure(figsize=(9.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    _prefill_lines(ax, rows, "position", metric, marker=".")
    ax.set_xlabel("tokens consumed (chunk boundary)")
    ax.set_ylabel(f"state {metric} vs {reference}")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or f"state error at chunk boundaries (against {reference})")
    return fig
