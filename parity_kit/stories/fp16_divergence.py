"""Story 01 (``parity_kit/notebooks/01_fp16_fp32_divergence.ipynb``): a checkpoint converted from InternLM2 to the Llama
layout; greedy outputs agree for a while, then differ; the original is said to be fp16-sensitive, the
converted one much less.

The plan: the pairs of runs that each vary one factor (dtype, attention implementation, conversion, and the
two models as shipped); the reported case ("who are you") decoded in lockstep with margins; teacher-forced
logits over one token sequence; divergence statistics over a prompt set; the layer-by-layer comparison of
original and converted model. The conclusion names the factor the measured fractions point at.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from torch import nn

from .._util.paths import data_dir
from ..analyses.decoding import is_newline
from ..analyses.divergence import ModelPair, divergence_summary, factor_summary, model_variant
from ..analyses.calibration import ModelComparison, compare_models
from ..analyses.generation import LockstepResult, lockstep_greedy
from ..analyses.runs import auto_mapping
from ..builtins.corpus import chat_prompt
from ..dtypes import DtypeLike, dtype_name, parse_dtype
from ..errors import ParityKitError
from ..models.cache import MODELS


def case_study(
    model: str,
    *,
    dtype: DtypeLike = "fp16",
    reference_dtype: DtypeLike = "fp32",
    device: str = "cpu",
    attn_implementation: str | None = None,
    prompt: str = "who are you",
    max_new_tokens: int = 128,
    trust_remote_code: bool = False,
) -> LockstepResult:
    """One model in ``dtype`` against itself in ``reference_dtype``, greedy, on one chat prompt.

    The story-01 panel's analysis: models come from the shared cache (``pk.ui.MODELS``), so changing
    only the prompt or the token budget does not reload weights.

    >>> r = case_study("tiny-internlm2", dtype="fp16", max_new_tokens=4)
    >>> r.labels
    ('tiny-internlm2 fp32', 'tiny-internlm2 fp16')
    """

    low, high = dtype_name(parse_dtype(dtype)), dtype_name(parse_dtype(reference_dtype))
    reference, tokenizer = MODELS.load(model, high, device, attn_implementation, trust_remote_code=trust_remote_code)
    candidate, _ = MODELS.load(model, low, device, attn_implementation, trust_remote_code=trust_remote_code)
    chat = chat_prompt_for(prompt, tokenizer)
    return lockstep_greedy(reference.eval(), candidate.eval(), chat, max_new_tokens=max_new_tokens,
                           ref_tokenizer=tokenizer, labels=(f"{model} {high}", f"{model} {low}"), progress=False)


def standard_pairs(
    original: str,
    converted: str,
    *,
    dtype: DtypeLike = "fp16",
    reference_dtype: DtypeLike = "fp32",
    device: str = "cpu",
    attn_implementations: Sequence[str] = ("eager", "sdpa"),
    trust_remote_code: bool = False,
    shipped: Mapping[str, str] | None = None,
    loader: Callable[..., tuple[nn.Module, Any]] | None = None,
    batch_size: int | None = None,
) -> tuple[list[ModelPair], Any]:
    """The pairs that isolate one factor each, and the (original's) tokenizer.

    For each attention implementation: original ``dtype`` vs ``reference_dtype`` and converted likewise
    (``varies="dtype"``, names like ``"original fp16 vs fp32 (eager)"``); original vs converted in each
    dtype (``"conversion"``, ``"original vs converted fp32 (sdpa)"``). For each dtype and model: the first
    attention implementation vs each other one (``"attention"``, ``"converted fp16 eager vs sdpa"``).
    With ``shipped`` ({"original": attention, "converted": attention}, see :func:`shipped_attention`)
    and two different defaults, also original vs converted as each runs out of the box, in each dtype
    (``"as shipped"``, ``"original vs converted fp16 (as shipped: eager vs sdpa)"``): the comparison
    users actually make, where conversion and attention implementation change together.
    The reference of every pair is the higher-precision / original / first-attention run. Each variant
    is loaded once (2 models × 2 dtypes × attention implementations: for a large checkpoint pass one
    attention implementation). A variant that cannot be loaded (e.g. remote code without SDPA) is
    skipped with a warning, and so are the pairs that need it. ``loader`` defaults to :func:`model_variant`.
    With ``batch_size`` > 1, also each model in ``dtype`` decoded one prompt at a time vs in batches of that size
    (``"batch composition"``, ``"original fp16 alone vs in batches of 8 (eager)"``): batching changes the numerics
    too; pass the same ``batch_size`` to :func:`parity_kit.divergence_statistics`.

    >>> pairs, tok = standard_pairs("tiny-internlm2", "tiny-internlm2-llama", attn_implementations=("eager",))
    >>> [p.name for p in pairs][:3]
    ['original fp16 vs fp32 (eager)', 'converted fp16 vs fp32 (eager)', 'original vs converted fp32 (eager)']
    """
    low, high = dtype_name(parse_dtype(dtype)), dtype_name(parse_dtype(reference_dtype))
    if low == high:
        raise ParityKitError(f"dtype and reference_dtype are both {low}; pick two different dtypes (e.g. fp16 and fp32)")
    if not attn_implementations:
        raise ParityKitError("attn_implementations is empty; pass at least one, e.g. ('eager', 'sdpa')")
    load = loader or (lambda src, **kw: model_variant(src, trust_remote_code=trust_remote_code, **kw))
    cache: dict[tuple[str, str, str], nn.Module | None] = {}
    tokenizers: dict[str, Any] = {}

    def get(source: str, dt: str, attn: str) -> nn.Module | None:
        key = (source, dt, attn)
        if key not in cache:
            try:
                cache[key], tokenizers[source] = load(source, dtype=dt, device=device, attn_implementation=attn)
            except ParityKitError as e:
                if len(attn_implementations) == 1:
                    raise
                warnings.warn(f"skipping pairs with {source} {dt} {attn}: {e}", stacklevel=3)
                cache[key] = None
        return cache[key]

    def add(name: str, ref: tuple[str, str, str], cand: tuple[str, str, str], varies: str, setting: dict,
            **batches: int) -> None:
        ref_model, cand_model = get(*ref), get(*cand)
        if ref_model is not None and cand_model is not None:
            pairs.append(ModelPair(name, ref_model, cand_model, varies=varies, setting=setting, **batches))

    models = {"original": original, "converted": converted}
    pairs: list[ModelPair] = []
    for attn in attn_implementations:
        for label, source in models.items():
            add(f"{label} {low} vs {high} ({attn})", (source, high, attn), (source, low, attn), "dtype",
                {"model": label, "attention": attn, "dtype": f"{low} vs {high}"})
        for dt in (high, low):
            add(f"original vs converted {dt} ({attn})", (original, dt, attn), (converted, dt, attn), "conversion",
                {"model": "original vs converted", "attention": attn, "dtype": dt})
    if shipped is not None and shipped["original"] != shipped["converted"]:
        for dt in (high, low):
            add(f"original vs converted {dt} (as shipped: {shipped['original']} vs {shipped['converted']})",
                (original, dt, shipped["original"]), (converted, dt, shipped["converted"]), "as shipped",
                {"model": "original vs converted", "attention": f"{shipped['original']} vs {shipped['converted']}",
                 "dtype": dt})
    first_attn = attn_implementations[0]
    for attn in attn_implementations[1:]:
        for dt in (high, low):
            for label, source in models.items():
                add(f"{label} {dt} {first_attn} vs {attn}", (source, dt, first_attn), (source, dt, attn), "attention",
                    {"model": label, "attention": f"{first_attn} vs {attn}", "dtype": dt})
    if batch_size is not None and batch_size > 1:
        for label, source in models.items():
            add(f"{label} {low} alone vs in batches of {batch_size} ({first_attn})", (source, low, first_attn),
                (source, low, first_attn), "batch composition",
                {"model": label, "attention": first_attn, "dtype": low}, reference_batch=1, candidate_batch=batch_size)
    if not pairs:
        raise ParityKitError(f"no pair could be loaded for {original!r} and {converted!r}; see the warnings above")
    return pairs, tokenizers[original]


def load_prompts(n: int | None = None) -> list[str]:
    """The first ``n`` chat prompts of ``parity_kit/data/prompts.json`` (all when ``n`` is None); the first asks "who are you".

    >>> load_prompts(2)[0]
    'User: who are you\\nAssistant:'
    """

    path = data_dir() / "prompts.json"
    if not path.is_file():
        raise ParityKitError(f"{path} does not exist; create it with `parity-kit train` (it writes the corpus files)")
    prompts = json.loads(path.read_text(encoding="utf-8"))
    if n is not None and (n <= 0 or n > len(prompts)):
        raise ParityKitError(f"n={n} prompts requested but {path} holds {len(prompts)}; pass 1 … {len(prompts)}")
    return list(prompts[:n])


def chat_prompt_for(question: str, tokenizer: Any) -> str:
    """``question`` in the model's chat format: its tokenizer's chat template, else the built-in models'
    ``User: …\\nAssistant:`` format. Text that already holds an ``Assistant:`` cue is returned as is.

    >>> chat_prompt_for("who are you", None)
    'User: who are you\\nAssistant:'
    """
    if not question.strip():
        raise ParityKitError("the prompt is empty; pass a question such as 'who are you'")
    if "Assistant:" in question:
        return question
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        bos = getattr(tokenizer, "bos_token", None)
        # the tokenizer adds BOS itself when it encodes the text
        return text[len(bos):] if bos and text.startswith(bos) else text

    return chat_prompt(question)


#: Two implementations in one dtype are "at the rounding floor" when their rel_rms stays within this
#: many single roundings (:func:`parity_kit.comparison.metrics.nominal_floor`): a few layers of long dot products each add several.
SAME_DTYPE_TOLERANCE = 30.0


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}"


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.0f}%"


def _case_sentence(what: str, result: LockstepResult) -> str:
    info = result.summary()
    if not result.diverged:
        return f"{what}: the same {info['steps']} tokens"
    step = info["first_divergent_step"]
    previous = ([result.prompt_ids[-1]] + result.ref_tokens)[step]
    newline = is_newline(result.ref_tokenizer, previous)
    return (f"{what}: they part at generated token {step}{' (right after a newline)' if newline else ''}, where "
            f"the reference's top-1 − top-2 margin is {_fmt(info['ref_margin_at_divergence'])} logits against a "
            f"logit error of {_fmt(info['logit_max_abs_at_divergence'])}")


def _factor_fraction(factors: pd.DataFrame, factor: str, dtype_setting: str) -> float:
    row = factors[(factors["factor"] == factor) & (factors["dtype"] == dtype_setting)]
    return float(row["diverged_fraction"].iloc[0]) if len(row) else math.nan


def _factor_candidates(factors: pd.DataFrame, low: str, high: str) -> dict[str, float]:
    """The share of diverging generations of each factor a conclusion may name (NaN: not measured)."""
    candidates = {
        f"{low} vs {high} (dtype)": _factor_fraction(factors, "dtype", f"{low} vs {high}"),
        f"attention implementation in {low}": _factor_fraction(factors, "attention", low),
        f"attention implementation in {high}": _factor_fraction(factors, "attention", high),
        f"conversion in {low}": _factor_fraction(factors, "conversion", low),
        f"conversion in {high}": _factor_fraction(factors, "conversion", high),
    }
    batched = _factor_fraction(factors, "batch composition", low)
    if not math.isnan(batched):  # measured only when the notebook decodes in batches
        candidates[f"batch composition in {low}"] = batched
    return candidates


@dataclass(frozen=True)
class DivergenceVerdict:
    """The judgements story 01's conclusion states, as keywords; the prose is rendered from them.

    ``main_factor``: the factor (a key of the ``diverged_fraction_by_factor`` figure) whose pairs diverge most
    often, None when no generation of any single-factor pair diverges; ``main_fraction``: its share (the largest
    measured share, NaN when no factor was measured). ``more_sensitive``: "original", "converted", "equal",
    "neither" (no generation of either diverges) or "not measured": whose shipped low-vs-reference pair diverges
    more often. ``conversion``: "bit-exact",
    "within rounding" (every layer within :data:`SAME_DTYPE_TOLERANCE` roundings of the reference dtype),
    "beyond rounding" or "not measured". ``margin_ratio``: the median top-1 − top-2 margin over all shared steps
    over the median margin at the divergent step (NaN when nothing diverged or that margin is 0).
    """

    main_factor: str | None
    main_fraction: float
    more_sensitive: str
    conversion: str
    margin_ratio: float


def judge_divergence(stats: pd.DataFrame, profiles: Mapping[str, pd.DataFrame], *, dtype: DtypeLike,
                     reference_dtype: DtypeLike, shipped: Mapping[str, str]) -> DivergenceVerdict:
    """Story 01's judgements from its measurements (the arguments of :func:`conclude_divergence` of those names).

    >>> stats = pd.DataFrame({"pair": ["original fp16 vs fp32 (eager)"] * 2, "varies": "dtype",
    ...     "dtype": "fp16 vs fp32", "diverged": [True, False], "first_divergent_step": [3, None],
    ...     "ref_margin_at_divergence": [0.1, float("nan")], "median_ref_margin": [2.0, 2.0]})
    >>> v = judge_divergence(stats, {"fp32": pd.DataFrame({"floor_ratio": [0.0]})}, dtype="fp16",
    ...                      reference_dtype="fp32", shipped={"original": "eager", "converted": "sdpa"})
    >>> v.main_factor, v.main_fraction, v.more_sensitive, v.conversion, v.margin_ratio
    ('fp16 vs fp32 (dtype)', 0.5, 'not measured', 'bit-exact', 20.0)
    """
    low, high = dtype_name(parse_dtype(dtype)), dtype_name(parse_dtype(reference_dtype))
    measured = {k: v for k, v in _factor_candidates(factor_summary(stats), low, high).items() if not math.isnan(v)}
    main, main_fraction = max(measured.items(), key=lambda kv: kv[1]) if measured else (None, math.nan)
    per_pair = stats.groupby("pair")["diverged"].mean()  # divergence_summary's diverged_fraction
    orig, conv = (float(per_pair.get(f"{who} {low} vs {high} ({shipped[who]})", math.nan))
                  for who in ("original", "converted"))
    if math.isnan(orig) or math.isnan(conv):
        more_sensitive = "not measured"
    else:
        more_sensitive = ("original" if orig > conv else "converted" if conv > orig else
                          "neither" if orig == 0 else "equal")
    high_ratio = float(profiles[high]["floor_ratio"].max()) if high in profiles else math.nan
    conversion = ("not measured" if math.isnan(high_ratio) else "bit-exact" if high_ratio == 0 else
                  "within rounding" if high_ratio <= SAME_DTYPE_TOLERANCE else "beyond rounding")
    diverged = stats[stats["diverged"]]
    margin_at = float(diverged["ref_margin_at_divergence"].median()) if len(diverged) else math.nan
    margin_ratio = float(stats["median_ref_margin"].median()) / margin_at if margin_at > 0 else math.nan
    return DivergenceVerdict(main_factor=main if main_fraction > 0 else None, main_fraction=main_fraction,
                             more_sensitive=more_sensitive, conversion=conversion, margin_ratio=margin_ratio)


def conclude_divergence(
    *,
    prompt: str,
    case: Mapping[str, LockstepResult],
    teacher: Mapping[str, Mapping[str, Any]],
    stats: pd.DataFrame,
    profiles: Mapping[str, pd.DataFrame],
    dtype: DtypeLike,
    reference_dtype: DtypeLike,
    shipped: Mapping[str, str],
    max_new_tokens: int,
    verdicts: Mapping[str, ModelComparison] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Story 01's conclusion and every number it relies on, from the notebook's measurements.

    ``case``: {"original": …, "converted": …} lockstep results, low vs reference dtype, each model in
    its shipped attention, optionally "as shipped": original vs converted in the low dtype. ``teacher``: :func:`summarize_teacher_forced` dicts keyed "dtype (original)",
    "conversion (<reference dtype>)", "conversion (<dtype>)". ``stats``: :func:`divergence_statistics`
    over :func:`standard_pairs`. ``profiles``: {dtype name: :func:`layer_profile`} original vs converted.
    ``verdicts``: :func:`module_verdicts` (every module judged by the calibrated floor).
    Returns ``(conclusion, figures)``; which factor is named depends only on the measured fractions.

    >>> text, figures = conclude_divergence(prompt="who are you", case=case, teacher=tf, stats=stats,
    ...     profiles=profiles, dtype="fp16", reference_dtype="fp32", shipped=shipped,
    ...     max_new_tokens=128)  # doctest: +SKIP
    """
    low, high = dtype_name(parse_dtype(dtype)), dtype_name(parse_dtype(reference_dtype))
    factors = factor_summary(stats)
    per_pair = divergence_summary(stats)

    def fraction(factor: str, dtype_setting: str) -> float:
        return _factor_fraction(factors, factor, dtype_setting)

    def pair_value(name: str, column: str) -> float:
        row = per_pair[per_pair["pair"] == name]
        return float(row[column].iloc[0]) if len(row) else math.nan

    candidates = _factor_candidates(factors, low, high)
    measured = {k: v for k, v in candidates.items() if not math.isnan(v)}
    ranked = sorted(measured.items(), key=lambda kv: kv[1], reverse=True)
    verdict = judge_divergence(stats, profiles, dtype=low, reference_dtype=high, shipped=shipped)
    main_fraction = verdict.main_fraction

    orig_dtype_pair = f"original {low} vs {high} ({shipped['original']})"
    conv_dtype_pair = f"converted {low} vs {high} ({shipped['converted']})"
    orig_fraction, conv_fraction = pair_value(orig_dtype_pair, "diverged_fraction"), pair_value(conv_dtype_pair, "diverged_fraction")
    diverged = stats[stats["diverged"]]
    margin_at = float(diverged["ref_margin_at_divergence"].median()) if len(diverged) else math.nan
    margin_all = float(stats["median_ref_margin"].median())
    percentile = float(diverged["margin_percentile"].median()) if len(diverged) else math.nan
    newline_share = float(diverged["after_newline"].mean()) if len(diverged) else math.nan
    newline_base = float(stats["newline_step_fraction"].mean())

    fp32_profile, low_profile = profiles.get(high), profiles.get(low)
    high_ratio = float(fp32_profile["floor_ratio"].max()) if fp32_profile is not None else math.nan
    low_max = float(low_profile["rel_rms"].max()) if low_profile is not None else math.nan
    low_ratio = float(low_profile["floor_ratio"].max()) if low_profile is not None else math.nan

    n_prompts, n_pairs = int(stats["prompt_index"].nunique()), int(stats["pair"].nunique())
    n_single = int(stats.loc[stats["varies"].isin(["dtype", "attention", "conversion", "batch composition"]), "pair"].nunique())

    shipped_fraction = {dt: fraction("as shipped", dt) for dt in (low, high)}
    sentences = [
        f"Reproduction on {prompt!r} ({max_new_tokens} new tokens, greedy): "
        + (f"{_case_sentence(f'original vs converted in {low}, as shipped', case['as shipped'])}; "
           if "as shipped" in case else "")
        + f"{_case_sentence(f'original in {low} vs {high}', case['original'])}; "
        f"{_case_sentence(f'converted in {low} vs {high}', case['converted'])}.",
        f"Over {n_prompts} prompts and {n_pairs} pairs of runs ({n_single} of them differing in one factor only), "
        f"the share of generations that diverge within {max_new_tokens} tokens, by factor, is: "
        + "; ".join(f"{name} {_pct(v)}" for name, v in ranked) + ".",
        _shipped_sentence(shipped, shipped_fraction, low, high, verdict.more_sensitive, orig_fraction, conv_fraction,
                          pair_value(orig_dtype_pair, "median_first_step"),
                          pair_value(conv_dtype_pair, "median_first_step")),
        _layer_sentence(high, low, verdict.conversion, high_ratio, low_max, low_ratio),
        _teacher_sentence(teacher, low, high),
        *(_verdict_sentences(verdicts) if verdicts else []),
    ]
    sentences.append(_margin_sentence(diverged, max_new_tokens, verdict.margin_ratio, margin_at, margin_all,
                                      percentile, newline_share, newline_base))
    sentences.append(_advice_sentence(verdict, measured, high))

    figures = _divergence_figures(
        case=case, teacher=teacher, per_pair=per_pair, candidates=candidates, low=low, high=high,
        n_prompts=n_prompts, n_pairs=n_pairs, max_new_tokens=max_new_tokens, main_fraction=main_fraction,
        shipped_fraction=shipped_fraction, orig_fraction=orig_fraction, conv_fraction=conv_fraction,
        margin_at=margin_at, margin_all=margin_all, percentile=percentile, newline_share=newline_share,
        newline_base=newline_base, high_ratio=high_ratio, low_max=low_max, low_ratio=low_ratio)
    for key, result in (verdicts or {}).items():
        figures.update(result.figures(f"verdict_{_slug(key)}_"))
    return " ".join(sentences), figures


def _divergence_figures(*, case: Mapping[str, LockstepResult], teacher: Mapping[str, Mapping[str, Any]],
                        per_pair: pd.DataFrame, candidates: Mapping[str, float], low: str, high: str,
                        n_prompts: int, n_pairs: int, max_new_tokens: int, main_fraction: float,
                        shipped_fraction: Mapping[str, float], orig_fraction: float, conv_fraction: float,
                        margin_at: float, margin_all: float, percentile: float, newline_share: float,
                        newline_base: float, high_ratio: float, low_max: float, low_ratio: float) -> dict[str, Any]:
    """Every number :func:`conclude_divergence` states, under the findings file's names."""
    figures: dict[str, Any] = {
        "case_first_divergent_step_original": case["original"].first_divergent_step,
        "case_first_divergent_step_converted": case["converted"].first_divergent_step,
        "case_first_divergent_step_as_shipped": case["as shipped"].first_divergent_step if "as shipped" in case else None,
        "case_ref_margin_at_divergence_original": case["original"].summary().get("ref_margin_at_divergence"),
        "case_ref_margin_at_divergence_converted": case["converted"].summary().get("ref_margin_at_divergence"),
        "case_logit_max_abs_at_divergence_original": case["original"].summary().get("logit_max_abs_at_divergence"),
        "case_logit_max_abs_at_divergence_converted": case["converted"].summary().get("logit_max_abs_at_divergence"),
        "prompts": n_prompts, "pairs": n_pairs, "max_new_tokens": max_new_tokens,
        "diverged_fraction_by_factor": {name: v for name, v in candidates.items()},
        "main_factor_diverged_fraction": main_fraction,
        "diverged_fraction_by_pair": dict(zip(per_pair["pair"], per_pair["diverged_fraction"].astype(float))),
        "median_first_step_by_pair": dict(zip(per_pair["pair"], per_pair["median_first_step"].astype(float))),
        "diverged_fraction_as_shipped": shipped_fraction,
        "diverged_fraction_original_shipped": orig_fraction,
        "diverged_fraction_converted_shipped": conv_fraction,
        "median_margin_at_divergence": margin_at, "median_margin_overall": margin_all,
        "median_margin_percentile_at_divergence": percentile,
        "after_newline_fraction": newline_share, "newline_base_rate": newline_base,
        f"layer_max_floor_ratio_{high}": high_ratio, f"layer_max_rel_rms_{low}": low_max,
        f"layer_max_floor_ratio_{low}": low_ratio, "same_dtype_tolerance": SAME_DTYPE_TOLERANCE,
    }
    for key, tf in teacher.items():
        slug = _slug(key)
        for field_name in ("median_logit_rel_rms", "max_logit_rel_rms", "argmax_disagreements",
                           "disagreements_below_error", "positions"):
            figures[f"teacher_forced_{slug}_{field_name}"] = tf.get(field_name)
    return figures


def _slug(key: str) -> str:
    return re.sub(r"\W+", "_", key).strip("_")


def module_verdicts(by_name: Mapping[str, ModelPair], input_ids: Any, *, dtype: DtypeLike,
                    reference_dtype: DtypeLike, attention: str) -> dict[str, ModelComparison]:
    """Every module of four pairs (one attention implementation) judged by the calibrated floor
    (:func:`parity_kit.compare_models`): each model in ``dtype`` vs ``reference_dtype`` ("original in fp16 vs
    fp32", "converted in ...") and original vs converted in each dtype ("converted vs original in fp32", ...), the conversion
    through the InternLM2 → Llama mapping where the original is an InternLM2 model. ``by_name``: the pairs of
    :func:`standard_pairs` by name; a pair it lacks is left out.

    >>> pairs, tok = standard_pairs("tiny-internlm2", "tiny-internlm2-llama", attn_implementations=("eager",))
    >>> import torch
    >>> v = module_verdicts({p.name: p for p in pairs}, torch.tensor([[1, 5, 9]]), dtype="fp16",
    ...                     reference_dtype="fp32", attention="eager")
    >>> list(v)[2], v["converted vs original in fp32"].verdict["verdict"]
    ('converted vs original in fp32', 'healthy')
    """
    low, high = dtype_name(parse_dtype(dtype)), dtype_name(parse_dtype(reference_dtype))
    wanted = {f"original in {low} vs {high}": f"original {low} vs {high} ({attention})",
              f"converted in {low} vs {high}": f"converted {low} vs {high} ({attention})",
              f"converted vs original in {high}": f"original vs converted {high} ({attention})",
              f"converted vs original in {low}": f"original vs converted {low} ({attention})"}
    if not any(name in by_name for name in wanted.values()):
        raise ParityKitError(f"none of the pairs {list(wanted.values())} is among {sorted(by_name)[:6]}; pass "
                             "standard_pairs' pairs by name and the attention implementation they were built with")
    out = {}
    for key, name in wanted.items():
        if name in by_name:
            pair = by_name[name]
            out[key] = compare_models(pair.reference, pair.candidate, input_ids,
                                      mapping=auto_mapping(pair.reference, pair.candidate)[0], show_progress=False)
    return out


def _verdict_sentences(verdicts: Mapping[str, ModelComparison]) -> list[str]:
    return ["Module by module against the calibrated floor (what rounding alone produces there): "
            + " ".join(r.describe(key[0].upper() + key[1:]) for key, r in verdicts.items())]


def _layer_sentence(high: str, low: str, conversion: str, high_ratio: float, low_max: float,
                    low_ratio: float) -> str:
    if conversion == "bit-exact":
        first = (f"Layer by layer in {high}, the converted model reproduces the original bit for bit, so the "
                 "conversion itself is exact")
    elif conversion == "not measured":
        first = f"The two models were not compared layer by layer in {high}, so the conversion itself is not checked"
    elif conversion == "within rounding":
        first = (f"Layer by layer in {high}, the converted model reproduces the original within "
                 f"{_fmt(high_ratio, 2)}× one {high} rounding (at most), so the conversion itself is exact up to "
                 "rounding")
    else:
        first = (f"Layer by layer in {high}, the converted model differs from the original by up to "
                 f"{_fmt(high_ratio, 2)}× one {high} rounding: more than rounding explains, so check the conversion")
    if low_max == 0:
        return first + f"; in {low} they are bit for bit identical{' too' if high_ratio == 0 else ''}."
    return first + f"; in {low} the two differ by up to rel_rms {_fmt(low_max)} ({_fmt(low_ratio, 2)}× one {low} rounding)."


def _teacher_sentence(teacher: Mapping[str, Mapping[str, Any]], low: str, high: str) -> str:
    tf_dtype = teacher.get("dtype (original)", {})
    tf_conv_high = teacher.get(f"conversion ({high})", {})
    tf_conv_low = teacher.get(f"conversion ({low})", {})
    return (f"Teacher-forced over the {high} continuation, the original's {low} and {high} logits differ by median "
            f"rel_rms {_fmt(tf_dtype.get('median_logit_rel_rms'))} with {tf_dtype.get('argmax_disagreements', 'n/a')} "
            f"argmax disagreements in {tf_dtype.get('positions', 'n/a')} positions "
            f"({tf_dtype.get('disagreements_below_error', 'n/a')} of them where the margin is below the logit error); "
            f"original vs converted differ by median rel_rms {_fmt(tf_conv_high.get('median_logit_rel_rms'))} in "
            f"{high} ({tf_conv_high.get('argmax_disagreements', 'n/a')} disagreements) and "
            f"{_fmt(tf_conv_low.get('median_logit_rel_rms'))} in {low} "
            f"({tf_conv_low.get('argmax_disagreements', 'n/a')}).")


def _margin_sentence(diverged: pd.DataFrame, max_new_tokens: int, margin_ratio: float, margin_at: float,
                     margin_all: float, percentile: float, newline_share: float, newline_base: float) -> str:
    if not len(diverged):
        return f"No generation diverged in any pair within {max_new_tokens} tokens on this model."
    comparison = (f"{margin_ratio:.0f}× smaller than" if margin_ratio > 1 else
                  "not smaller than" if margin_ratio <= 1 else "against")
    return (f"At the divergent step the reference's top-1 − top-2 margin has median {_fmt(margin_at)} logits, "
            f"{comparison} the median {_fmt(margin_all)} over all shared steps (median share of the same "
            f"generation's earlier margins below it: {_fmt(percentile, 2)}); {_pct(newline_share)} of divergences "
            f"come right after a newline token, whose base rate is {_pct(newline_base)} of steps.")


def _advice_sentence(verdict: DivergenceVerdict, measured: Mapping[str, float], high: str) -> str:
    if verdict.main_factor is None:
        return ("No factor made any generation diverge here, so this model and prompt set do not show the effect; "
                "teacher-forced logits still measure the numeric differences above.")
    return (f"Of the factors above, the one whose pairs diverge most often is {verdict.main_factor} "
            f"({_pct(verdict.main_fraction)} of generations diverge). "
            f"Advice: compare a conversion in {high}"
            + (f", where it diverges in {_pct(measured.get(f'conversion in {high}', math.nan))} of generations"
               if f"conversion in {high}" in measured else "")
            + ", and compare teacher-forced logits over one token sequence rather than free-running generations: "
              "a single near-tie flipped by rounding noise changes every later token without any bug.")


def _shipped_sentence(shipped: Mapping[str, str], shipped_fraction: Mapping[str, float], low: str, high: str,
                      more_sensitive: str, orig_fraction: float, conv_fraction: float, orig_median: float,
                      conv_median: float) -> str:
    start = (f"Original vs converted as shipped (original with {shipped['original']} attention, converted with "
             f"{shipped['converted']}) diverge in {_pct(shipped_fraction[low])} of generations in {low} and "
             f"{_pct(shipped_fraction[high])} in {high}. " if not math.isnan(shipped_fraction[low]) else "")
    verdict = {"original": ": the original is the more sensitive one.",
               "converted": ": the original is not more sensitive than the converted model here.",
               "equal": ": both are equally sensitive here.",
               "neither": ": neither diverges, so this run does not tell which is more sensitive."}.get(more_sensitive, ".")
    return (start + f"Shipped as they are, {low} vs {high} makes {_pct(orig_fraction)} of the original's generations "
            f"diverge (median first divergent step {_fmt(orig_median)}) and {_pct(conv_fraction)} of the converted "
            f"model's (median {_fmt(conv_median)})" + verdict)
