"""Generation divergence: lockstep margins, the first divergent step over prompts, the error along the layers."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ...errors import ParityKitError


def lockstep_margins(result: Any, *, title: str | None = None) -> Figure:
    """Top-1 − top-2 logit margin of both runs per step of a :func:`parity_kit.lockstep_greedy` result,
    with the logit error between them (max abs, same units) while they share a prefix, and the first
    divergent step marked. A step where the margin drops below the logit error is where noise can flip
    the greedy choice. Log scale; exact zeros are marked at the bottom.

    >>> import torch
    >>> from parity_kit.testing import tiny_llama
    >>> from parity_kit.analyses.generation import lockstep_greedy
    >>> m = tiny_llama(layers=1)
    >>> r = lockstep_greedy(m, m.to(torch.float16).float(), [1, 2], max_new_tokens=5, progress=False)
    >>> type(lockstep_margins(r)).__name__
    'Figure'
    """
    steps = getattr(result, "steps", None)
    if not isinstance(steps, pd.DataFrame) or "ref_margin" not in getattr(steps, "columns", []):
        raise ParityKitError("lockstep_margins needs the result of parity_kit.lockstep_greedy")
    if steps.empty:
        raise ParityKitError("the lockstep result has no steps to plot")
    labels = getattr(result, "labels", ("reference", "candidate"))
    x = steps["step"].to_numpy(int)
    series = {f"margin, {labels[0]}": (steps["ref_margin"].to_numpy(float), "tab:blue", "-"),
              f"margin, {labels[1]}": (steps["cand_margin"].to_numpy(float), "tab:orange", "--"),
              "logit error (max abs) while shared": (steps["logit_max_abs"].to_numpy(float), "tab:red", ":")}
    finite = np.concatenate([v[np.isfinite(v) & (v > 0)] for v, _, _ in series.values()])
    bottom = finite.min() / 10 if finite.size else 1e-6
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for name, (values, color, style) in series.items():
        ax.plot(x, np.where(values > 0, values, np.nan), color=color, ls=style, marker="o", ms=2.5, lw=1, label=name)
        zeros = values == 0
        if zeros.any():
            ax.plot(x[zeros], np.full(int(zeros.sum()), bottom), ls="none", marker="v", ms=4, color=color,
                    label=f"{name}: exactly 0 ({int(zeros.sum())})")
    divergent = getattr(result, "first_divergent_step", None)
    if divergent is not None:
        row = steps.iloc[int(divergent)]
        ax.axvline(divergent, color="black", lw=1)
        ax.annotate(f"first divergence, step {divergent}\n{row['ref_piece']!r} vs {row['cand_piece']!r}",
                    (divergent, 1.0), xycoords=("data", "axes fraction"), xytext=(4, -4),
                    textcoords="offset points", va="top", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(bottom=bottom / 2)
    ax.set_xlabel("generated token (step)")
    ax.set_ylabel("logits")
    suffix = f"diverges at step {divergent}" if divergent is not None else f"no divergence in {len(steps)} steps"
    ax.set_title(title or f"greedy margins, {labels[1]} vs {labels[0]}: {suffix}")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def divergence_histogram(stats: pd.DataFrame, max_new_tokens: int, *, bins: int = 16, columns: int = 3,
                         title: str | None = None) -> Figure:
    """Histogram of the first divergent step per pair of a :func:`parity_kit.divergence_statistics`
    table (one panel per pair, same bins); prompts that never diverged get their own bar ">max".

    >>> s = pd.DataFrame({"pair": ["a", "a", "b"], "first_divergent_step": pd.array([3, None, 10], dtype="Int64")})
    >>> type(divergence_histogram(s, 16)).__name__
    'Figure'
    """
    missing = {"pair", "first_divergent_step"} - set(stats.columns)
    if missing:
        raise ParityKitError(f"the table lacks columns {sorted(missing)}; pass the table of divergence_statistics")
    if stats.empty:
        raise ParityKitError("the statistics table is empty; run divergence_statistics on at least one prompt")
    if max_new_tokens <= 0:
        raise ParityKitError(f"max_new_tokens must be positive, got {max_new_tokens}")
    pairs = list(dict.fromkeys(stats["pair"]))
    edges = np.unique(np.linspace(0, max_new_tokens, min(bins, max_new_tokens) + 1).round().astype(int))
    width = edges[-1] - edges[-2]
    never_x = max_new_tokens + 1.5 * width
    cols = max(1, min(columns, len(pairs)))
    rows = math.ceil(len(pairs) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.3 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    for ax, pair in zip(axes, pairs):
        steps = stats.loc[stats["pair"] == pair, "first_divergent_step"]
        diverged = steps.dropna().to_numpy(float)
        never = int(steps.isna().sum())
        ax.hist(diverged, bins=edges, color="tab:blue", edgecolor="white")
        ax.bar(never_x, never, width=width * 0.9, color="tab:gray")
        ax.set_title(f"{pair}\n{len(diverged)}/{len(steps)} diverged", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    ticks = [float(t) for t in edges[:: max(1, len(edges) // 4)] if t <= max_new_tokens - width] + [never_x]
    for ax in axes[: len(pairs)]:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + [f">{max_new_tokens}"], fontsize=7)
    fig.supxlabel("first divergent step (gray: never diverged)")
    fig.supylabel("prompts")
    fig.suptitle(title or "where greedy generations part, per pair")
    return fig


def layer_error_profile(profiles: Mapping[str, pd.DataFrame], *, metric: str = "rel_rms",
                        title: str | None = None) -> Figure:
    """Error along the residual stream (embedding, decoder layers, final norm, logits) for one or more
    :func:`parity_kit.analyses.generation.layer_profile` frames, e.g. original vs converted in fp32 and in fp16;
    each line's floor is drawn dashed in the same colour. Exact zeros are marked at the bottom.

    >>> p = pd.DataFrame({"position": [0, 1], "label": ["0", "1"], "rel_rms": [0.0, 1e-7], "floor": [3e-8, 3e-8]})
    >>> type(layer_error_profile({"fp32": p})).__name__
    'Figure'
    """
    if not profiles:
        raise ParityKitError("no profiles to plot; pass {label: layer_profile(table)}")
    for name, profile in profiles.items():
        if not {"position", "label", metric, "floor"} <= set(profile.columns):
            raise ParityKitError(f"profile {name!r} is not a layer_profile frame (needs position, label, {metric}, floor)")
    values_all = np.concatenate([p[[metric, "floor"]].to_numpy(float).ravel() for p in profiles.values()])
    positive = values_all[np.isfinite(values_all) & (values_all > 0)]
    bottom = positive.min() / 10 if positive.size else 1e-12
    fig = Figure(figsize=(9.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    longest = max(profiles.values(), key=len)
    for i, (name, profile) in enumerate(profiles.items()):
        color = colors[i % len(colors)]
        x = profile["position"].to_numpy(int)
        values = profile[metric].to_numpy(float)
        ax.plot(x, np.where(values > 0, values, np.nan), marker="o", ms=3, lw=1.2, color=color, label=f"{name}: {metric}")
        zeros = values == 0
        if zeros.any():
            ax.plot(x[zeros], np.full(int(zeros.sum()), bottom), ls="none", marker="v", ms=5, color=color,
                    label=f"{name}: exactly 0 ({int(zeros.sum())})")
        ax.plot(x, profile["floor"].to_numpy(float), ls="--", lw=1, color=color, label=f"{name}: floor")
    ax.set_yscale("log")
    ax.set_ylim(bottom=bottom / 2)
    ax.set_xticks(longest["position"].to_numpy(int), longest["label"].astype(str).tolist(), fontsize=8)
    ax.set_xlabel("residual stream (decoder layer outputs)")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per layer")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig
