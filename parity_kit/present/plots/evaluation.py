"""Evaluation: perplexity with error bars, the per-position loss difference, an effect by context length."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ...errors import ParityKitError


def loss_difference_by_position(diff: pd.DataFrame, *, label_a: str = "a", label_b: str = "b",
                                title: str | None = None) -> Figure:
    """Mean per-token loss difference (NLL of b − NLL of a) by position, with a ±1.96 standard-error
    band: left by position from the start of the text, right relative to the target's first token.
    Takes the frame of :func:`parity_kit.analyses.evaluation.position_loss_difference`.

    >>> d = pd.DataFrame({"axis": ["from_start"] * 3 + ["from_target"] * 3, "position": [1, 2, 3, -1, 0, 1],
    ...                   "mean": [0.5, 0.2, 0.1, 0.1, 0.05, 0.0], "stderr": [0.1] * 6, "n_docs": [9] * 6})
    >>> type(loss_difference_by_position(d)).__name__
    'Figure'
    """
    missing = {"axis", "position", "mean", "stderr"} - set(diff.columns)
    if missing:
        raise ParityKitError(f"the frame lacks columns {sorted(missing)}; compute it with "
                             "parity_kit.analyses.evaluation.position_loss_difference")
    fig = Figure(figsize=(11.0, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    panels = (("from_start", "text token position (0 = first token after any BOS)"),
              ("from_target", "position relative to the target's first token (≥ 0: target)"))
    for ax, (axis, xlabel) in zip(axes, panels):
        part = diff[diff["axis"] == axis]
        if part.empty:
            raise ParityKitError(f"the frame has no rows for axis {axis!r}; compute it with position_loss_difference")
        x = part["position"].to_numpy(float)
        mean = part["mean"].to_numpy(float)
        band = 1.96 * np.nan_to_num(part["stderr"].to_numpy(float))
        ax.fill_between(x, mean - band, mean + band, alpha=0.25, color="tab:blue", label="±1.96 standard errors")
        ax.plot(x, mean, marker="o", ms=3, lw=1, color="tab:blue", label="mean over documents")
        ax.axhline(0.0, color="black", lw=0.8)
        if axis == "from_target":
            ax.axvspan(-0.5, x.max() + 0.5, color="tab:orange", alpha=0.08, label="target tokens")
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"NLL({label_b}) − NLL({label_a})  [nats]")
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(title or f"per-token loss difference, {label_b} vs {label_a}")
    return fig


def perplexity_with_errorbars(results: Sequence[Any], *, title: str | None = None) -> Figure:
    """Perplexity and greedy accuracy of several evaluation runs, each with its standard error
    (bootstrap for perplexity, sd/√n for accuracy) as an error bar. Takes ``LastWordResult`` objects;
    their ``label`` names the rows.

    >>> from parity_kit.analyses.evaluation import LastWordResult
    >>> r = LastWordResult.from_loglikelihoods([-1.0, -2.0, -0.5], acc=[1, 0, 1], n_bootstrap=100, label="fp32")
    >>> type(perplexity_with_errorbars([r])).__name__
    'Figure'
    """
    results = list(results)
    if not results:
        raise ParityKitError("no results to plot; pass LastWordResult objects from evaluate_lastword")
    labels = [getattr(r, "label", "") or f"run {i}" for i, r in enumerate(results)]
    y = np.arange(len(results))[::-1]
    fig = Figure(figsize=(11.0, 1.4 + 0.45 * len(results)), layout="constrained")
    ax_ppl, ax_acc = fig.subplots(1, 2, sharey=True)
    for ax, value, err, name in ((ax_ppl, "ppl", "ppl_stderr", "perplexity (lower is better)"),
                                 (ax_acc, "acc", "acc_stderr", "greedy accuracy (higher is better)")):
        vals = np.array([getattr(r, value) for r in results], dtype=float)
        errs = np.array([getattr(r, err) for r in results], dtype=float)
        ax.errorbar(vals, y, xerr=errs, fmt="o", capsize=4, color="tab:blue")
        for yi, v, e in zip(y, vals, errs):
            ax.annotate(f"{v:.4g} ± {e:.2g}", (v, yi), textcoords="offset points", xytext=(0, 7),
                        ha="center", fontsize=8)
        ax.set_xlabel(f"{name}\n± 1 standard error")
        ax.grid(True, axis="x", alpha=0.3)
        ax.margins(y=0.35)
    ax_ppl.set_yticks(y, labels)
    fig.suptitle(title or "last-word evaluation")
    return fig


def bos_effect_by_context_length(sweep: pd.DataFrame, *, title: str | None = None) -> Figure:
    """Perplexity change from dropping the BOS against the context length (in words), one line per
    model, with the paired bootstrap 95% interval as error bars. Expects columns ``model,
    context_words, ppl_diff, ci_low, ci_high`` (one row per model and length).

    >>> s = pd.DataFrame({"model": ["m", "m"], "context_words": [2, 8], "ppl_diff": [3.0, 0.1],
    ...                   "ci_low": [2.0, -0.2], "ci_high": [4.0, 0.4]})
    >>> type(bos_effect_by_context_length(s)).__name__
    'Figure'
    """
    missing = {"model", "context_words", "ppl_diff", "ci_low", "ci_high"} - set(sweep.columns)
    if missing or sweep.empty:
        raise ParityKitError(f"the sweep frame lacks columns {sorted(missing)} or rows; build one row per model "
                             "and context length from paired_comparison results")
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for name, part in sweep.groupby("model", sort=False):
        part = part.sort_values("context_words")
        x = part["context_words"].to_numpy(float)
        y = part["ppl_diff"].to_numpy(float)
        err = np.vstack([y - part["ci_low"].to_numpy(float), part["ci_high"].to_numpy(float) - y])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=4, label=str(name))
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ticks = sorted(sweep["context_words"].unique())
    ax.set_xticks(ticks, [str(int(t)) for t in ticks])
    ax.set_xlabel("context length (last words kept before the target)")
    ax.set_ylabel("perplexity without BOS − with BOS")
    ax.set_title(title or "BOS effect on the last word by context length (paired 95% interval)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig
