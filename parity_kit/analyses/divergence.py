"""Divergence statistics over a prompt set: where and how often pairs of runs part, explained by margins.

One anecdote ("who are you" splits at token 37) says little; :func:`divergence_statistics` decodes every
pair of runs on every prompt in lockstep and tabulates the first divergent step, the reference's
top-1 − top-2 margin there (against its margins over the shared prefix) and whether the step follows a
newline; :func:`divergence_summary` and :func:`factor_summary` pool the table by pair and by the factor a
pair varies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from ..dtypes import DtypeLike
from ..errors import ParityKitError
from ..models import load
from .batch_decoding import greedy_decode_batch
from .decoding import (GreedyTrace, PromptLike, check_context, check_max_new_tokens, check_vocabularies,
                       decode_text, encode_prompt, eos_ids, is_newline)
from .generation import LockstepResult, compare_traces


@dataclass
class ModelPair:
    """Two runs to compare: ``reference`` is the trusted one; ``varies`` names the one factor that differs.

    ``reference_batch`` / ``candidate_batch`` override the batch size :func:`divergence_statistics` decodes that
    side with: the same model alone (1) and in a batch (8) is the pair that measures batch variance.

    >>> import torch.nn as nn
    >>> ModelPair("a vs b", nn.Linear(1, 1), nn.Linear(1, 1), varies="dtype").varies
    'dtype'
    """

    name: str
    reference: nn.Module
    candidate: nn.Module
    varies: str = ""
    setting: dict[str, str] = field(default_factory=dict)
    reference_batch: int | None = None
    candidate_batch: int | None = None


def model_variant(
    name_or_path: str,
    *,
    dtype: DtypeLike = "fp32",
    device: str = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """Load one run of a model (dtype × attention implementation) in eval mode: ``(model, tokenizer)``.

    A thin wrapper over ``parity_kit.models.load`` so that the second run of a comparison is one call.

    >>> model, tok = model_variant("tiny-internlm2", dtype="fp16", attn_implementation="sdpa")
    >>> next(model.parameters()).dtype, model.config._attn_implementation
    (torch.float16, 'sdpa')
    """
    model, tokenizer = load(name_or_path, dtype=dtype, device=device, attn_implementation=attn_implementation,
                            trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def divergence_statistics(
    pairs: Sequence[ModelPair] | Mapping[str, tuple[nn.Module, nn.Module]],
    prompts: Sequence[PromptLike],
    tokenizer: Any | None,
    *,
    max_new_tokens: int,
    progress: bool = True,
    stop_at_eos: bool = True,
    batch_size: int = 1,
) -> pd.DataFrame:
    """Lockstep-decode every pair on every prompt; one row per (pair, prompt).

    Every model decodes ``batch_size`` consecutive prompts together (:func:`greedy_decode_batch`; a pair's
    ``reference_batch`` / ``candidate_batch`` override it for that side). Batching is much faster, and it changes
    the numerics a little: compare batch sizes with a pair of the same model to see by how much.

    Columns: ``pair, varies`` (and the pair's ``setting``: ``model, attention, dtype``), ``prompt_index,
    prompt, prompt_tokens, steps, diverged, first_divergent_step``
    (``<NA>`` if never), ``ref_margin_at_divergence, cand_margin_at_divergence, margin_percentile``
    (share of the reference's earlier shared-prefix margins below the one at divergence: 0 = the
    smallest so far), ``median_ref_margin`` (over the shared steps), ``logit_rel_rms_median,
    logit_max_abs_median`` (over shared steps before the divergence), ``logit_max_abs_at_divergence,
    after_newline`` (the token before the divergent step contains a newline), ``newline_step_fraction``
    (share of shared steps that follow a newline: the base rate for ``after_newline``).
    Summarise with :func:`divergence_summary`.

    >>> import torch
    >>> from parity_kit.testing import tiny_llama
    >>> m = tiny_llama(layers=1)
    >>> stats = divergence_statistics({"self": (m, m)}, [[1, 2], [3, 4]], None, max_new_tokens=4,
    ...                               progress=False, stop_at_eos=False)
    >>> stats["diverged"].tolist()
    [False, False]
    """
    check_max_new_tokens(max_new_tokens)
    if isinstance(pairs, Mapping):
        pairs = [ModelPair(name, ref, cand) for name, (ref, cand) in pairs.items()]
    if not isinstance(pairs, Sequence) or not all(isinstance(p, ModelPair) for p in pairs):
        raise ParityKitError(f"pairs must be a list of ModelPair or a dict name -> (reference, candidate), got "
                             f"{type(pairs).__name__} {pairs!r:.60}")
    pairs = list(pairs)
    if not pairs:
        raise ParityKitError("no pairs given; build them with standard_pairs(...) or pass {name: (ref, cand)}")
    if not prompts:
        raise ParityKitError("no prompts given; pass at least one prompt")
    encoded = [encode_prompt(p, tokenizer, f"prompt {i}") for i, p in enumerate(prompts)]
    for pair in pairs:
        check_vocabularies(pair.reference, pair.candidate, tokenizer, tokenizer, compare_by_text=False)
    models = {id(m): m for pair in pairs for m in (pair.reference, pair.candidate)}
    for i, ids in enumerate(encoded):
        check_context(list(models.values()), len(ids), max_new_tokens, f"prompt {i}")
    eos = {key: eos_ids(m, tokenizer) if stop_at_eos else set() for key, m in models.items()}

    sides = [(pair.reference, pair.reference_batch or batch_size) for pair in pairs]
    sides += [(pair.candidate, pair.candidate_batch or batch_size) for pair in pairs]
    runs = {(id(m), size): (m, size) for m, size in sides}  # a model's greedy run does not depend on its partner
    if min(size for _, size in runs.values()) < 1:
        raise ParityKitError(f"batch sizes must be at least 1, got {sorted({s for _, s in runs.values()})}")
    chunk = max(size for _, size in runs.values())

    rows: list[tuple[int, int, dict[str, Any]]] = []
    bar = tqdm(total=len(runs) * len(encoded), desc="divergence statistics", unit="generation", disable=not progress)
    try:
        for start in range(0, len(encoded), chunk):
            ids_chunk = encoded[start:start + chunk]
            traces: dict[tuple[int, int], list[GreedyTrace]] = {}
            for key, (model, size) in runs.items():
                traces[key] = greedy_decode_batch(model, ids_chunk, max_new_tokens, 5, eos[id(model)], batch_size=size)
                bar.update(len(ids_chunk))
            for k, pair in enumerate(pairs):
                ref_key = (id(pair.reference), pair.reference_batch or batch_size)
                cand_key = (id(pair.candidate), pair.candidate_batch or batch_size)
                for j, ids in enumerate(ids_chunk):
                    i = start + j
                    result = compare_traces(traces[ref_key][j], traces[cand_key][j], ref_tokenizer=tokenizer,
                                             cand_tokenizer=tokenizer, compare_by_text=False, comparable_logits=True,
                                             labels=("reference", "candidate"), max_new_tokens=max_new_tokens)
                    prompt = prompts[i]
                    rows.append((k, i, {"pair": pair.name, "varies": pair.varies, **pair.setting, "prompt_index": i,
                                        "prompt": prompt if isinstance(prompt, str) else decode_text(tokenizer, ids),
                                        "prompt_tokens": len(ids), **_divergence_row(result, tokenizer)}))
    finally:
        bar.close()
    table = pd.DataFrame([row for _, _, row in sorted(rows, key=lambda r: (r[0], r[1]))])
    table["first_divergent_step"] = table["first_divergent_step"].astype("Int64")
    return table


def _divergence_row(result: LockstepResult, tokenizer: Any | None) -> dict[str, Any]:
    steps = result.steps
    d = result.first_divergent_step
    shared = steps[steps["shared_prefix"]]
    before = shared if d is None else shared[shared["step"] < d]
    previous = [result.prompt_ids[-1]] + result.ref_tokens  # token fed before step s is previous[s]
    newline_flags = [is_newline(tokenizer, previous[s]) for s in shared["step"]]
    row: dict[str, Any] = {
        "steps": len(result.ref_tokens),
        "diverged": d is not None,
        "first_divergent_step": d,
        "median_ref_margin": float(shared["ref_margin"].median()) if len(shared) else math.nan,
        "logit_rel_rms_median": float(before["logit_rel_rms"].median()) if len(before) else math.nan,
        "logit_max_abs_median": float(before["logit_max_abs"].median()) if len(before) else math.nan,
        "newline_step_fraction": float(np.mean(newline_flags)) if newline_flags else math.nan,
    }
    if d is None:
        row.update(ref_margin_at_divergence=math.nan, cand_margin_at_divergence=math.nan, margin_percentile=math.nan,
                   logit_max_abs_at_divergence=math.nan, after_newline=False)
    else:
        at = steps.iloc[d]
        earlier = before["ref_margin"].to_numpy(dtype=float)
        row.update(ref_margin_at_divergence=float(at["ref_margin"]), cand_margin_at_divergence=float(at["cand_margin"]),
                   margin_percentile=float((earlier < at["ref_margin"]).mean()) if len(earlier) else math.nan,
                   logit_max_abs_at_divergence=float(at["logit_max_abs"]),
                   after_newline=is_newline(tokenizer, previous[d]))
    return row


_SETTING_KEYS = ("model", "attention", "dtype")


def divergence_summary(stats: pd.DataFrame) -> pd.DataFrame:
    """One row per pair of a :func:`divergence_statistics` table.

    Columns: ``pair, varies`` (``model, attention, dtype`` when known), ``prompts, diverged,
    diverged_fraction, median_first_step, min_first_step,
    median_margin_at_divergence, median_margin_overall, median_margin_percentile, median_logit_rel_rms,
    median_logit_max_abs, after_newline_fraction`` (among diverged prompts), ``newline_base_rate``.

    >>> s = pd.DataFrame({"pair": ["p", "p"], "varies": ["dtype"] * 2, "diverged": [True, False],
    ...     "first_divergent_step": pd.array([7, None], dtype="Int64"), "ref_margin_at_divergence": [0.01, None],
    ...     "median_ref_margin": [1.0, 2.0], "margin_percentile": [0.0, None], "logit_rel_rms_median": [1e-3, 2e-3],
    ...     "logit_max_abs_median": [0.01, 0.02], "after_newline": [True, False], "newline_step_fraction": [0.1, 0.1]})
    >>> divergence_summary(s)[["pair", "diverged", "median_first_step"]].values.tolist()
    [['p', 1, 7.0]]
    """
    out = []
    for name, group in stats.groupby("pair", sort=False):
        div = group[group["diverged"]]
        steps = div["first_divergent_step"].astype(float)
        out.append({
            "pair": name, "varies": group["varies"].iloc[0],
            **{k: group[k].iloc[0] for k in _SETTING_KEYS if k in group.columns},
            "prompts": len(group), "diverged": len(div),
            "diverged_fraction": float(len(div) / len(group)),
            "median_first_step": float(steps.median()) if len(div) else math.nan,
            "min_first_step": float(steps.min()) if len(div) else math.nan,
            "median_margin_at_divergence": float(div["ref_margin_at_divergence"].median()) if len(div) else math.nan,
            "median_margin_overall": float(group["median_ref_margin"].median()),
            "median_margin_percentile": float(div["margin_percentile"].median()) if len(div) else math.nan,
            "median_logit_rel_rms": float(group["logit_rel_rms_median"].median()),
            "median_logit_max_abs": float(group["logit_max_abs_median"].median()),
            "after_newline_fraction": float(div["after_newline"].mean()) if len(div) else math.nan,
            "newline_base_rate": float(group["newline_step_fraction"].mean()),
        })
    return pd.DataFrame(out)


def factor_summary(stats: pd.DataFrame) -> pd.DataFrame:
    """Divergence by the one factor a pair varies, in each dtype setting, pooled over its pairs and prompts.

    Columns: ``factor, dtype, pairs, prompts, diverged_fraction, median_first_step``.

    >>> s = pd.DataFrame({"pair": ["a", "a", "b"], "varies": ["dtype"] * 3, "dtype": ["fp16 vs fp32"] * 3,
    ...                   "diverged": [True, False, True], "first_divergent_step": pd.array([4, None, 8], dtype="Int64")})
    >>> factor_summary(s)[["factor", "pairs", "diverged_fraction", "median_first_step"]].values.tolist()
    [['dtype', 2, 0.6666666666666666, 6.0]]
    """
    keys = ["varies", "dtype"] if "dtype" in stats.columns else ["varies"]
    out = []
    for key, group in stats.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        steps = group.loc[group["diverged"], "first_divergent_step"].astype(float)
        out.append({"factor": key[0], "dtype": key[1] if len(key) > 1 else "", "pairs": int(group["pair"].nunique()),
                    "prompts": len(group), "diverged_fraction": float(group["diverged"].mean()),
                    "median_first_step": float(steps.median()) if len(steps) else math.nan})
    return pd.DataFrame(out)
