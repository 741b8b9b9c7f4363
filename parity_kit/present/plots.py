"""Figure builders. Each returns a ``matplotlib.figure.Figure`` built without pyplot's global state
(display it in a notebook by leaving it as a cell's last value, or ``fig.savefig(path)``).

Sections: comparison plots (error by module, token heatmap). Story plots go in their own section below.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from ..errors import ParityKitError

_MAX_TICK_LABELS = 60


# ---------------------------------------------------------------------------------------- comparison plots
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
    step = max(1, math.ceil(len(labels) / _MAX_TICK_LABELS))
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
    step = max(1, math.ceil(data.shape[0] / _MAX_TICK_LABELS))
    ax.set_yticks(np.arange(data.shape[0])[::step], [str(i) for i in per_token.index][::step], fontsize=7)
    ax.set_xlabel("token position")
    ax.set_ylabel("module")
    ax.set_title(title or f"per-token {metric}")
    return fig


# --- evaluation (story 04) ---
# (imports local to this section so the sections above stay untouched)
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402


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


# --- end evaluation (story 04) ---


# --- generation (story 01) ---
# (figures for parity_kit.analyses.generation; names local to this section start with _gen_)
from collections.abc import Mapping as _GenMapping  # noqa: E402
from typing import Any  # noqa: E402, F811


def lockstep_margins(result: Any, *, title: str | None = None) -> Figure:
    """Top-1 − top-2 logit margin of both runs per step of a :func:`parity_kit.lockstep_greedy` result,
    with the logit error between them (max abs, same units) while they share a prefix, and the first
    divergent step marked. A step where the margin drops below the logit error is where noise can flip
    the greedy choice. Log scale; exact zeros are marked at the bottom.

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from parity_kit.analyses.generation import lockstep_greedy
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    >>> m = LlamaForCausalLM(cfg).eval()
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


def layer_error_profile(profiles: _GenMapping[str, pd.DataFrame], *, metric: str = "rel_rms",
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
# --- end generation (story 01) ---


# --- precision (story 02) ---
# (imports local to this section so the sections above stay untouched)
import re as _re  # noqa: E402
from collections.abc import Sequence  # noqa: E402, F811
from typing import Any  # noqa: E402, F811

_LAYER_RE = _re.compile(r"^(?P<prefix>.*?)(?:^|\.)(?:layers|layer|h|blocks|block)\.(?P<i>\d+)(?:\.(?P<rest>.*))?$")


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
    step = max(1, math.ceil(len(labels) / _MAX_TICK_LABELS))
    ax_step.set_xticks(curve["step"].to_numpy()[::step], labels[::step], rotation=60, ha="right", fontsize=7)
    ax_step.set_ylabel(result.metric)
    ax_cost.legend(fontsize=8, loc="best")
    fig.suptitle(title or f"precision bisection: {len(result.chosen)} of {result.n_candidates} modules, "
                          f"{result.passes} forward passes")
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
    step = max(1, math.ceil(len(labels) / _MAX_TICK_LABELS))
    ax.set_xticks(x[::step], labels[::step], rotation=90, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(bottom=bottom)
    ax.set_ylabel(metric)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or f"local vs propagated {metric} (execution order)")
    return fig
# --- end precision (story 02) ---


# --- prefill (story 03) ---

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

# --- end prefill (story 03) ---
