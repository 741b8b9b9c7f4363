"""Story 04 (``parity_kit/notebooks/04_bos_token.ipynb``): a model trained with a beginning-of-sequence token is evaluated
without it, and lambada-style perplexity gets worse by about 1.5 standard errors.

The plan: token provenance of the pipelines; last-word evaluation with and without BOS (lm-evaluation-harness
statistics, a paired test) against the effect of low precision; the per-position loss difference; a sweep over
context lengths; where in the network the missing BOS acts. The conclusion states which factor the paired
tests single out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from ..analyses.calibration import ModelComparison, compare_models
from ..analyses.evaluation import LastWordItem, LastWordResult, encode_text, evaluate_lastword, resolve_bos
from ..analyses.paired import PairedComparison, paired_comparison
from ..comparison.floor import describe_verdict
from ..errors import ParityKitError
from .wording import distinct


def reported_gap_in_stderr(reported: Mapping[str, float]) -> dict[str, float]:
    """The real case's perplexity gaps in units of the reference run's standard error (the unpaired figure).

    ``reported`` holds ``ppl_without_bos``, ``ppl_with_bos``, ``ppl_reference`` and ``stderr_reference``;
    returns ``real_case_in_stderr`` (without BOS) and ``real_case_fixed_in_stderr`` (with BOS).

    >>> gap = reported_gap_in_stderr({"ppl_without_bos": 4.3, "ppl_with_bos": 4.1, "ppl_reference": 4.1,
    ...                               "stderr_reference": 0.1})
    >>> round(gap["real_case_in_stderr"], 6), round(gap["real_case_fixed_in_stderr"], 6)
    (2.0, 0.0)
    """
    missing = [k for k in ("ppl_without_bos", "ppl_with_bos", "ppl_reference", "stderr_reference") if k not in reported]
    if missing:
        raise ParityKitError(f"reported figures lack {missing}; give ppl_without_bos, ppl_with_bos, ppl_reference "
                             "and stderr_reference as published")
    stderr = float(reported["stderr_reference"])
    if not stderr > 0:
        raise ParityKitError(f"stderr_reference={stderr} is not positive; give the reference run's standard error")
    reference = float(reported["ppl_reference"])
    return {"real_case_in_stderr": (float(reported["ppl_without_bos"]) - reference) / stderr,
            "real_case_fixed_in_stderr": (float(reported["ppl_with_bos"]) - reference) / stderr}


def compare_with_and_without_bos(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[LastWordItem],
    *,
    bos_token_id: int | None = None,
    n_bootstrap: int = 100_000,
    n_paired_bootstrap: int = 10_000,
    label: str = "",
    progress: bool = False,
) -> tuple[LastWordResult, LastWordResult, PairedComparison]:
    """Evaluate ``items`` with and without a prepended BOS and compare the two runs paired (without − with).

    The runs are labelled ``"<label> with BOS"`` and ``"<label> without BOS"``; ``n_bootstrap`` sets each
    run's perplexity standard error, ``n_paired_bootstrap`` the paired interval.

    >>> from parity_kit.models import load
    >>> model, tok = load("tiny-internlm2-llama")
    >>> items = [LastWordItem("The cat sat on the", " mat"), LastWordItem("A dog ran to the", " park")]
    >>> with_bos, without_bos, test = compare_with_and_without_bos(model, tok, items, n_bootstrap=10,
    ...                                                            n_paired_bootstrap=10)
    >>> with_bos.label, without_bos.config["prepend_bos"], test["n"]
    ('with BOS', False, 2.0)
    """
    runs = [evaluate_lastword(model, tokenizer, items, prepend_bos=flag, bos_token_id=bos_token_id,
                              n_bootstrap=n_bootstrap, progress=progress,
                              label=f"{label} {'with' if flag else 'without'} BOS".strip())
            for flag in (True, False)]
    return runs[0], runs[1], paired_comparison(runs[0], runs[1], n_bootstrap=n_paired_bootstrap)


def bos_factor_table(
    bos_tests: Mapping[str, PairedComparison],
    precision_tests: Mapping[str, PairedComparison],
    *,
    ref_dtype: str,
    cand_dtype: str,
) -> pd.DataFrame:
    """The two suspects side by side, one row per model and factor: the missing BOS (at ``ref_dtype``) and
    the low precision ``cand_dtype`` (BOS kept), each with its perplexity change, the unpaired
    "of one run's standard errors" figure, the paired z and interval, and whether it is flagged.

    >>> a = LastWordResult.from_loglikelihoods([-1.0, -2.0, -0.5, -1.5], n_bootstrap=10)
    >>> b = LastWordResult.from_loglikelihoods([-1.1, -2.1, -0.6, -1.6], n_bootstrap=10)
    >>> t = bos_factor_table({"m": paired_comparison(a, b, n_bootstrap=10)},
    ...                      {"m": paired_comparison(a, a, n_bootstrap=10)}, ref_dtype="fp32", cand_dtype="bf16")
    >>> t["factor"].tolist(), t["flagged"].tolist()
    (['no BOS (fp32)', 'bf16 (with BOS)'], [True, False])
    """
    missing = [name for name in bos_tests if name not in precision_tests]
    if missing:
        raise ParityKitError(f"no precision comparison for {missing}; run one per model that has a BOS comparison")
    return pd.DataFrame([
        {"model": name, "factor": factor, "ppl_diff": t["ppl_diff"], "in_one_run_stderr": t["ppl_diff_in_a_stderr"],
         "paired_z": t["z"], "ci_low": t["ppl_diff_ci_low"], "ci_high": t["ppl_diff_ci_high"], "flagged": t.flagged}
        for name in bos_tests
        for factor, t in ((f"no BOS ({ref_dtype})", bos_tests[name]),
                          (f"{cand_dtype} (with BOS)", precision_tests[name]))
    ])


def bos_position_effect(diff: pd.DataFrame) -> dict[str, float]:
    """Summarise a :func:`position_loss_difference` table (without − with BOS) in four numbers.

    ``first_position`` is the first text position both runs predict, ``first_position_nats`` the mean
    loss change there and ``first_position_z`` its z (0 when its standard error is 0 or unknown);
    ``target_nats_per_token`` is the change on the target tokens, weighted by how many documents have each.

    >>> diff = pd.DataFrame({"axis": ["from_start", "from_start", "from_target", "from_target"],
    ...                      "position": [1, 2, -1, 0], "mean": [0.5, 0.1, 0.2, 0.04],
    ...                      "stderr": [0.1, 0.1, 0.1, 0.02], "n_docs": [4, 4, 4, 4]})
    >>> bos_position_effect(diff)
    {'first_position': 1, 'first_position_nats': 0.5, 'first_position_z': 5.0, 'target_nats_per_token': 0.04}
    """
    start, around = diff[diff["axis"] == "from_start"], diff[diff["axis"] == "from_target"]
    on_target = around[around["position"] >= 0]
    if start.empty or on_target.empty:
        raise ParityKitError("the position table has no 'from_start' rows or no target positions; pass the table "
                             "position_loss_difference returns for two runs of the same documents")
    first = start.iloc[0]
    # a NaN standard error (a single document) gives no z, as a zero one does
    has_stderr = bool(first["stderr"] > 0)
    return {
        "first_position": int(first["position"]),
        "first_position_nats": float(first["mean"]),
        "first_position_z": float(first["mean"] / first["stderr"]) if has_stderr else 0.0,
        "target_nats_per_token": float((on_target["mean"] * on_target["n_docs"]).sum() / on_target["n_docs"].sum()),
    }


def bos_context_sweep(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[LastWordItem],
    context_words: Sequence[int],
    *,
    name: str = "",
    bos_token_id: int | None = None,
    n_bootstrap: int = 10_000,
) -> pd.DataFrame:
    """Cut every context to its last *k* words (target unchanged) and compare with vs without BOS per *k*.

    One row per *k*: ``model, context_words, ppl_with_bos, ppl_without_bos, ppl_diff, ci_low, ci_high, z,
    flagged`` (the paired statistics of without − with BOS; ``n_bootstrap`` is used for both the runs'
    and the paired bootstrap). The frame is what ``pk.plots.bos_effect_by_context_length`` draws.

    >>> from parity_kit.models import load
    >>> model, tok = load("tiny-internlm2-llama")
    >>> items = [LastWordItem("so the cat sat on the", " mat"), LastWordItem("and a dog ran to the", " park")]
    >>> bos_context_sweep(model, tok, items, [2, 4], name="m", n_bootstrap=10)["context_words"].tolist()
    [2, 4]
    """
    if not context_words or any(int(k) < 1 for k in context_words):
        raise ParityKitError(f"context_words={list(context_words)}; give one or more positive word counts")
    rows = []
    for k in context_words:
        short = [LastWordItem(" ".join(it.context.split()[-int(k):]), it.target) for it in items]
        with_bos, without_bos, t = compare_with_and_without_bos(model, tokenizer, short, bos_token_id=bos_token_id,
                                                                n_bootstrap=n_bootstrap, n_paired_bootstrap=n_bootstrap)
        rows.append({"model": name, "context_words": int(k), "ppl_with_bos": with_bos.ppl,
                     "ppl_without_bos": without_bos.ppl, "ppl_diff": t["ppl_diff"], "ci_low": t["ppl_diff_ci_low"],
                     "ci_high": t["ppl_diff_ci_high"], "z": t["z"], "flagged": t.flagged})
    return pd.DataFrame(rows)


def bos_activation_summary(views: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The last layer's row of each :func:`bos_activation_diff` table: its value at the first and the last
    text position and its median, one row per model.

    >>> view = pd.DataFrame([[0.5, 0.2, 0.1], [0.9, 0.3, 0.2]], index=["layers.0", "layers.1"])
    >>> bos_activation_summary({"m": view}).loc["m"].tolist()
    [0.9, 0.2, 0.3]
    """
    empty = [name for name, view in views.items() if view.empty]
    if empty:
        raise ParityKitError(f"activation tables of {empty} are empty; pass the tables bos_activation_diff returns")
    last = {name: view.iloc[-1] for name, view in views.items()}
    return pd.DataFrame({name: {"first position": row.iloc[0], "last position": row.iloc[-1], "median": row.median()}
                         for name, row in last.items()}).T


@dataclass(frozen=True)
class BosVerdict:
    """The judgements story 04's conclusion states for one model, as keywords; the prose is rendered from them.

    ``bos_effect``: "higher" or "lower" (the perplexity without BOS, when the paired test flags it) or "none";
    ``leading_factor``: "bos", "precision" or "neither" (which factor moves the last-word score more);
    ``bos_over_precision``: |BOS perplexity change| / |precision perplexity change| (inf when precision changes
    nothing); ``clearest_cut_words`` / ``clearest_cut_effect``: the flagged context cut with the largest |z| and
    whether its perplexity is "lower" or "higher" without BOS (None when no cut is flagged); ``bos_noticed``:
    "acts" (|z| > 3 at the first text position and the last-word score flagged), "early only" (|z| > 3 there,
    score not flagged) or "hardly"; ``flagged_cuts_agree``: every flagged cut changes the perplexity in the same
    direction (True when none is flagged).
    """

    bos_effect: str
    precision_flagged: bool
    leading_factor: str
    bos_over_precision: float
    clearest_cut_words: int | None
    clearest_cut_effect: str | None
    cuts_flagged: int
    cuts: int
    bos_noticed: str
    flagged_cuts_agree: bool = True


#: |z| of the loss change at the first text position above which the model is said to notice the BOS.
NOTICED_Z = 3


def judge_bos_effect(b: PairedComparison, p: PairedComparison, effect: Mapping[str, float],
                     rows: pd.DataFrame) -> BosVerdict:
    """Story 04's judgements on one model: ``b`` the paired test without − with BOS, ``p`` the precision test
    (BOS kept), ``effect`` :func:`bos_position_effect`, ``rows`` the model's rows of :func:`bos_context_sweep`.

    >>> a = LastWordResult.from_loglikelihoods([-1.0, -2.0, -0.5, -1.5], n_bootstrap=10)
    >>> worse = LastWordResult.from_loglikelihoods([-1.5, -2.5, -1.0, -2.0], n_bootstrap=10)
    >>> rows = pd.DataFrame({"context_words": [2], "ppl_diff": [0.1], "z": [1.0], "flagged": [False]})
    >>> v = judge_bos_effect(paired_comparison(a, worse, n_bootstrap=10), paired_comparison(a, a, n_bootstrap=10),
    ...                      {"first_position_z": 5.0}, rows)
    >>> v.bos_effect, v.leading_factor, v.clearest_cut_words, v.bos_noticed
    ('higher', 'bos', None, 'acts')
    """
    ratio = abs(b["ppl_diff"]) / abs(p["ppl_diff"]) if p["ppl_diff"] else math.inf
    if b.flagged and (not p.flagged or ratio > 1):
        leading = "bos"
    elif p.flagged:
        leading = "precision"
    else:
        leading = "neither"
    detected = rows[rows["flagged"]]
    clearest = detected.loc[detected["z"].abs().idxmax()] if len(detected) else None
    noticed = abs(effect["first_position_z"]) > NOTICED_Z
    return BosVerdict(
        bos_effect=("lower" if b["ppl_diff"] < 0 else "higher") if b.flagged else "none",
        precision_flagged=bool(p.flagged), leading_factor=leading, bos_over_precision=ratio,
        clearest_cut_words=None if clearest is None else int(clearest["context_words"]),
        clearest_cut_effect=None if clearest is None else ("lower" if clearest["ppl_diff"] < 0 else "higher"),
        cuts_flagged=len(detected), cuts=len(rows),
        bos_noticed=("acts" if b.flagged else "early only") if noticed else "hardly",
        flagged_cuts_agree=bool((detected["ppl_diff"] < 0).all() or (detected["ppl_diff"] > 0).all())
        if len(detected) else True,
    )


def _describe_bos_effect(
    name: str,
    with_bos: LastWordResult,
    without_bos: LastWordResult,
    b: PairedComparison,
    p: PairedComparison,
    effect: Mapping[str, float],
    rows: pd.DataFrame,
    verdict: BosVerdict,
    ref_dtype: str,
    cand_dtype: str,
) -> str:
    ppl_with, ppl_without = distinct(with_bos.ppl, without_bos.ppl)
    change = (f"goes from {ppl_with} ± {with_bos.ppl_stderr:.2g} to {ppl_without} ± {without_bos.ppl_stderr:.2g}"
              if ppl_with != ppl_without else f"stays at {ppl_with} ± {with_bos.ppl_stderr:.2g}")
    text = (f"{name}: with BOS it predicts {with_bos.acc:.0%} of the last words exactly; without BOS the last-word "
            f"perplexity {change} "
            f"({b['ppl_diff']:+.3g}, {b['ppl_diff_in_a_stderr']:+.2f} of one run's standard errors; paired "
            f"z = {b['z']:.1f}, 95% interval of the perplexity difference "
            f"[{b['ppl_diff_ci_low']:.3g}, {b['ppl_diff_ci_high']:.3g}]): "
            + (f"a real effect, {verdict.bos_effect} without BOS. " if verdict.bos_effect != "none"
               else "no detectable effect. ")
            + f"{cand_dtype} instead of {ref_dtype}, BOS kept, changes it by {p['ppl_diff']:+.3g} "
            f"(paired z = {p['z']:.1f}): "
            + ("a real effect" if verdict.precision_flagged else "not distinguishable from zero") + ". ")
    ratio = verdict.bos_over_precision
    if verdict.leading_factor == "bos":
        text += f"The missing BOS matters more than precision ({ratio:.3g}× its perplexity change). "
    elif verdict.leading_factor == "precision":
        text += (f"Precision moves the score more than the missing BOS ({1 / ratio if ratio else math.inf:.3g}× its "
                 "perplexity change). ")
    else:
        text += "Neither factor moves the last-word score on these documents. "
    where = (f"at text position {effect['first_position']} a missing BOS changes the loss by "
             f"{effect['first_position_nats']:+.3g} nats (z = {effect['first_position_z']:.1f}), "
             "on the target tokens by "
             f"{effect['target_nats_per_token']:+.3g} nats per token")
    if verdict.clearest_cut_words is not None:
        clearest = rows[rows["context_words"] == verdict.clearest_cut_words].iloc[0]
        if not verdict.flagged_cuts_agree:
            reading = "the flagged cuts point in opposite directions, so the cuts do not say which the model prefers"
        elif verdict.clearest_cut_effect == "lower":
            reading = ("by its sign, a BOS in front of a fragment that does not start a document is stranger to the "
                       "model than a missing one")
        else:
            reading = "by its sign, with this little context the model relies on the BOS"
        others = "; ".join(f"{int(r['context_words'])} words {r['ppl_diff']:+.4g} (z = {r['z']:.1f})"
                           for _, r in rows.iterrows() if int(r["context_words"]) != verdict.clearest_cut_words)
        text += (f"{verdict.cuts_flagged} of {verdict.cuts} context cuts {'is' if verdict.cuts_flagged == 1 else 'are'} "
                 "flagged; the one with the largest |z| is "
                 f"the last {verdict.clearest_cut_words} words, where the last-word perplexity is "
                 f"{verdict.clearest_cut_effect} without BOS ({clearest['ppl_diff']:+.4g}, paired z = "
                 f"{clearest['z']:.1f}, 95% interval [{clearest['ci_low']:.4g}, {clearest['ci_high']:.4g}]): "
                 f"{reading}" + (f" (the other cuts: {others})" if others else "") + ". ")
    else:
        text += (f"Even with contexts cut to {int(rows['context_words'].min())} words the missing BOS does not change "
                 "the last word's perplexity detectably. ")
    text += {"early only": f"The model does notice the missing BOS, but only early: {where}, so it recovers before "
                           "the last word. ",
             "acts": f"Where it acts: {where}. ",
             "hardly": f"The model hardly uses the BOS at all: {where}. "}[verdict.bos_noticed]
    return text


def _bos_story_figures(
    key: str,
    runs: Mapping[tuple[str, str, bool], LastWordResult],
    tests: Mapping[str, PairedComparison],
    effect: Mapping[str, float],
    rows: pd.DataFrame,
    activation: pd.Series,
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for (_, run_dtype, prepend), r in runs.items():
        tag = f"{key}_{run_dtype}_{'bos' if prepend else 'nobos'}"
        figures.update({f"{tag}_ppl": r.ppl, f"{tag}_ppl_stderr": r.ppl_stderr,
                        f"{tag}_acc": r.acc, f"{tag}_acc_stderr": r.acc_stderr})
    for factor, test in tests.items():
        for stat in ("ppl_diff", "ppl_diff_in_a_stderr", "mean_nll_diff", "mean_nll_diff_stderr", "z",
                     "ppl_diff_ci_low", "ppl_diff_ci_high", "acc_diff", "acc_diff_stderr"):
            figures[f"{key}_{factor}_{stat}"] = test[stat]
        figures[f"{key}_{factor}_flagged"] = int(test.flagged)
    figures.update({f"{key}_{k}": v for k, v in effect.items()})
    for _, srow in rows.iterrows():
        tag = f"{key}_ctx{int(srow['context_words'])}"
        figures.update({f"{tag}_ppl_diff": srow["ppl_diff"], f"{tag}_ci_low": srow["ci_low"],
                        f"{tag}_ci_high": srow["ci_high"], f"{tag}_z": srow["z"],
                        f"{tag}_flagged": int(srow["flagged"])})
    figures.update({f"{key}_act_last_layer_first_position": activation["first position"],
                    f"{key}_act_last_layer_last_position": activation["last position"]})
    return figures


def precision_verdict(reference: torch.nn.Module, candidate: torch.nn.Module, tokenizer: Any, text: str, *,
                      bos_token_id: int | None = None, max_tokens: int = 128) -> ModelComparison:
    """The competing explanation module by module: the same model in two dtypes on ``text`` (BOS prepended, at most
    ``max_tokens`` tokens), every module judged by the calibrated floor (:func:`parity_kit.compare_models`). If
    precision made the score worse, some module would compute differently or lose more than rounding explains.

    >>> from parity_kit.models import load
    >>> model, tok = load("tiny-rwkv7")
    >>> precision_verdict(model, load("tiny-rwkv7", dtype="bf16")[0], tok, "The cat sat").verdict["verdict"]
    'healthy'
    """
    bos = resolve_bos(tokenizer, True, bos_token_id)
    content = [int(t) for t in encode_text(tokenizer, text, False)]
    ids = ([bos] if content[:1] != [bos] else []) + content
    if len(ids) < 2:
        raise ParityKitError(f"text {text!r} produced no token after the BOS; give a non-empty text")
    device = next(reference.parameters()).device
    return compare_models(reference, candidate, torch.tensor([ids[:max_tokens]], device=device), show_progress=False)


def conclude_bos_story(
    results: Mapping[tuple[str, str, bool], LastWordResult],
    bos_tests: Mapping[str, PairedComparison],
    precision_tests: Mapping[str, PairedComparison],
    position_effects: Mapping[str, Mapping[str, float]],
    sweep: pd.DataFrame,
    activation_summary: pd.DataFrame,
    *,
    ref_dtype: str,
    cand_dtype: str,
    leading_figures: Mapping[str, float] | None = None,
    verdicts: Mapping[str, ModelComparison] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The BOS story's conclusion and the findings figures it relies on, built from the measured tables.

    Per model (the keys of ``bos_tests``, in order), the text states the BOS effect at ``ref_dtype`` and the
    precision effect (``cand_dtype``, BOS kept), which of the two moves the score more, the clearest flagged
    context cut of ``sweep`` (or that none is flagged), and where the model notices the BOS
    (``position_effects``: :func:`bos_position_effect`). ``results`` is keyed ``(model, dtype, prepend_bos)``;
    ``activation_summary`` is :func:`bos_activation_summary`'s table. ``figures`` starts with
    ``leading_figures`` and holds every number the text quotes, with keys ``<model>_...`` (dashes → ``_``).
    ``verdicts``: :func:`precision_verdict` per model (``cand_dtype`` vs ``ref_dtype`` module by module).

    >>> a = LastWordResult.from_loglikelihoods([-1.0, -2.0, -0.5, -1.5], n_bootstrap=10, label="with")
    >>> b = LastWordResult.from_loglikelihoods([-1.5, -2.5, -1.0, -2.0], n_bootstrap=10, label="without")
    >>> effect = {"first_position": 1, "first_position_nats": 0.5, "first_position_z": 5.0,
    ...           "target_nats_per_token": 0.5}
    >>> sweep = pd.DataFrame({"model": ["m"], "context_words": [2], "ppl_diff": [0.1], "ci_low": [-0.1],
    ...                       "ci_high": [0.3], "z": [1.0], "flagged": [False]})
    >>> acts = pd.DataFrame({"first position": [0.3], "last position": [0.1], "median": [0.2]}, index=["m"])
    >>> text, figures = conclude_bos_story({("m", "fp32", True): a, ("m", "fp32", False): b},
    ...     {"m": paired_comparison(a, b, n_bootstrap=10)}, {"m": paired_comparison(a, a, n_bootstrap=10)},
    ...     {"m": effect}, sweep, acts, ref_dtype="fp32", cand_dtype="bf16")
    >>> "The missing BOS matters more than precision" in text, figures["m_bos_flagged"]
    (True, 1)
    """
    figures: dict[str, Any] = dict(leading_figures or {})
    texts = []
    for name, b in bos_tests.items():
        needed = {"precision comparison": name in precision_tests, "position effect": name in position_effects,
                  f"run at {ref_dtype} with BOS": (name, ref_dtype, True) in results,
                  f"run at {ref_dtype} without BOS": (name, ref_dtype, False) in results,
                  "activation summary row": name in activation_summary.index}
        rows = sweep[sweep["model"] == name]
        needed["context-length sweep rows"] = not rows.empty
        lacking = [what for what, present in needed.items() if not present]
        if lacking:
            raise ParityKitError(f"model {name!r} has no {', no '.join(lacking)}; measure every part of the story for "
                                 "each model before concluding")
        p, effect = precision_tests[name], position_effects[name]
        texts.append(_describe_bos_effect(name, results[(name, ref_dtype, True)], results[(name, ref_dtype, False)],
                                          b, p, effect, rows, judge_bos_effect(b, p, effect, rows), ref_dtype,
                                          cand_dtype).strip())
        runs = {k: r for k, r in results.items() if k[0] == name}
        figures.update(_bos_story_figures(name.replace("-", "_"), runs, {"bos": b, "precision": p}, effect, rows,
                                          activation_summary.loc[name]))
        if verdicts and name in verdicts:
            texts.append("Module by module, " + describe_verdict(verdicts[name].verdict, f"{name} in {cand_dtype}"))
            figures.update(verdicts[name].figures(f"{name.replace('-', '_')}_precision_verdict_"))
    return " ".join(texts), figures
