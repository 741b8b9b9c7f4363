"""Greedy-generation divergence between two runs: lockstep decoding and teacher forcing.

Two runs of "the same" model (two dtypes, two attention implementations, an original and its
conversion) often agree token for token for a while and then differ for good. This module answers
*where* they part, *why there* (the top-1/top-2 logit margin of the reference at that step against the
logit error between the runs), and *how often* over a prompt set:

- :func:`lockstep_greedy` decodes both runs greedily side by side with a KV cache, each following
  its own choices, and records per step the chosen tokens, top-k logits, margins and (while the two
  still share a prefix) the logit error between them.
- :func:`teacher_forced` runs one forward of both over the same token sequence: per position logit
  error, margins and argmax agreement. It separates "noise flipped a near-tie" from "the two models
  compute different things", because no earlier flip can hide behind it.

Over a prompt set, :func:`parity_kit.divergence_statistics` repeats the lockstep decoding for pairs of runs.

>>> import torch
>>> from parity_kit.testing import tiny_llama
>>> model = tiny_llama(layers=1)
>>> result = lockstep_greedy(model, model, [1, 5, 7], max_new_tokens=8, progress=False, stop_at_eos=False)
>>> result.first_divergent_step is None
True
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._util.calling import check_token_ids, model_device
from ..errors import ParityKitError
from .decoding import (GreedyTrace, PromptLike, check_context, check_max_new_tokens, check_vocabularies,
                       decode_text, encode_prompt, eos_ids, greedy_decode, logit_error, logits_comparable,
                       top_choices)

#: Markers put around the part of a continuation after the first divergent step.
DIVERGENCE_OPEN = "⟦"
DIVERGENCE_CLOSE = "⟧"


# --------------------------------------------------------------------------------------------
# lockstep greedy decoding
# --------------------------------------------------------------------------------------------

@dataclass
class LockstepResult:
    """Outcome of :func:`lockstep_greedy`.

    ``steps`` is one row per decoding step with the columns ``step, ref_token, cand_token,
    ref_piece, cand_piece, same, shared_prefix, ref_margin, cand_margin, ref_gap_to_cand_choice,
    logit_max_abs, logit_rel_rms, ref_topk_ids, ref_topk_logits, cand_topk_ids, cand_topk_logits``.
    ``shared_prefix`` is true while both runs were fed identical tokens (up to and including the first
    divergent step); the logit error is only defined there. Margins are top-1 − top-2 logits.

    >>> r = LockstepResult(steps=pd.DataFrame(), prompt_ids=[1], ref_tokens=[4, 5], cand_tokens=[4, 6],
    ...                    first_divergent_step=1)
    >>> r.marked_texts()
    ('4 ⟦5⟧', '4 ⟦6⟧')
    """

    steps: pd.DataFrame
    prompt_ids: list[int]
    ref_tokens: list[int]
    cand_tokens: list[int]
    first_divergent_step: int | None
    cand_prompt_ids: list[int] | None = None
    ref_tokenizer: Any = field(default=None, repr=False)
    cand_tokenizer: Any = field(default=None, repr=False)
    labels: tuple[str, str] = ("reference", "candidate")
    max_new_tokens: int = 0
    compare_by_text: bool = False

    @property
    def diverged(self) -> bool:
        """Whether the two continuations differ at some step."""
        return self.first_divergent_step is not None

    @property
    def ref_text(self) -> str:
        """The reference run's continuation, decoded."""
        return decode_text(self.ref_tokenizer, self.ref_tokens)

    @property
    def cand_text(self) -> str:
        """The candidate run's continuation, decoded."""
        return decode_text(self.cand_tokenizer or self.ref_tokenizer, self.cand_tokens)

    def reference_sequence(self) -> torch.Tensor:
        """Prompt + the reference's continuation, shape [1, T]: the input for :func:`teacher_forced`."""
        return torch.tensor([self.prompt_ids + self.ref_tokens])

    def _marked(self, tokenizer: Any | None, tokens: list[int], open_: str, close: str) -> str:
        d = self.first_divergent_step
        full = decode_text(tokenizer, tokens)
        if d is None:
            return full
        head = decode_text(tokenizer, tokens[:d])
        # Decoding the tail alone can drop a leading space, so split the full text where possible.
        tail = full[len(head):] if full.startswith(head) else decode_text(tokenizer, tokens[d:])
        if d > 0 and tokenizer is None:
            head += " "
            tail = tail.lstrip(" ")
        return f"{head}{open_}{tail}{close}"

    def marked_texts(self, open_: str = DIVERGENCE_OPEN, close: str = DIVERGENCE_CLOSE) -> tuple[str, str]:
        """Both continuations with everything from the first divergent step on wrapped in ⟦…⟧."""
        return (self._marked(self.ref_tokenizer, self.ref_tokens, open_, close),
                self._marked(self.cand_tokenizer or self.ref_tokenizer, self.cand_tokens, open_, close))

    def side_by_side(self) -> pd.DataFrame:
        """One row per run: label, number of generated tokens, the continuation with the divergence marked."""
        ref, cand = self.marked_texts()
        return pd.DataFrame({"run": list(self.labels), "tokens": [len(self.ref_tokens), len(self.cand_tokens)],
                             "continuation": [ref, cand]})

    def summary(self) -> dict[str, Any]:
        """The numbers a finding needs: divergence step, margins and logit error around it."""
        shared = self.steps[self.steps["shared_prefix"]] if len(self.steps) else self.steps
        before = shared[shared["step"] < (self.first_divergent_step if self.diverged else len(self.steps))]
        out: dict[str, Any] = {
            "first_divergent_step": self.first_divergent_step,
            "steps": len(self.steps),
            "min_ref_margin_before_divergence": float(before["ref_margin"].min()) if len(before) else None,
            "median_logit_rel_rms_before_divergence": float(before["logit_rel_rms"].median()) if len(before) else None,
            "median_logit_max_abs_before_divergence": float(before["logit_max_abs"].median()) if len(before) else None,
        }
        if self.diverged:
            row = self.steps.iloc[self.first_divergent_step]
            out.update(ref_margin_at_divergence=float(row["ref_margin"]),
                       cand_margin_at_divergence=float(row["cand_margin"]),
                       logit_max_abs_at_divergence=float(row["logit_max_abs"]),
                       ref_piece_at_divergence=str(row["ref_piece"]), cand_piece_at_divergence=str(row["cand_piece"]))
        return out

    def _repr_html_(self) -> str:
        ref, cand = self.marked_texts()
        where = (f"first divergent step: <b>{self.first_divergent_step}</b>" if self.diverged
                 else f"no divergence in {len(self.steps)} steps")
        cells = "".join(
            f"<td style='vertical-align:top;white-space:pre-wrap;font-family:monospace;text-align:left'>"
            f"{html.escape(text).replace(DIVERGENCE_OPEN, '<mark>').replace(DIVERGENCE_CLOSE, '</mark>')}</td>"
            for text in (ref, cand))
        heads = "".join(f"<th style='text-align:left'>{html.escape(label)}</th>" for label in self.labels)
        return f"<div><p>{where}</p><table><tr>{heads}</tr><tr>{cells}</tr></table></div>"


def lockstep_greedy(
    ref_model: nn.Module,
    cand_model: nn.Module,
    input_ids: PromptLike,
    *,
    max_new_tokens: int = 128,
    top_k: int = 5,
    ref_tokenizer: Any | None = None,
    cand_tokenizer: Any | None = None,
    compare_by_text: bool = False,
    progress: bool = True,
    stop_at_eos: bool = True,
    labels: tuple[str, str] = ("reference", "candidate"),
) -> LockstepResult:
    """Decode greedily with both models side by side and record where and why they part.

    Both start from the same prompt, decode with their own KV cache and follow their own choices
    (free-running; since neither run depends on the other, they are decoded one after the other and
    compared step by step). While they still share a prefix, the per-step logit error (max abs,
    rel_rms, in fp64) between them is recorded. A run stops at its end-of-sequence token when
    ``stop_at_eos``; its later rows are empty.

    ``input_ids``: a string (encoded by the tokenizer), a list of ids or a tensor of shape [T] or [1, T].
    With ``compare_by_text=True`` the models may have different vocabularies: each encodes the prompt
    (which must then be a string) with its own tokenizer, and steps are compared by the text each
    token adds. ``cand_tokenizer`` defaults to ``ref_tokenizer``.

    >>> import torch
    >>> from parity_kit.testing import tiny_llama
    >>> ref = tiny_llama(layers=1)
    >>> r = lockstep_greedy(ref, ref, [1, 2, 3], max_new_tokens=4, progress=False, stop_at_eos=False)
    >>> (r.first_divergent_step, len(r.steps), float(r.steps["logit_max_abs"].max()))
    (None, 4, 0.0)
    """
    check_max_new_tokens(max_new_tokens)
    if top_k < 1:
        raise ParityKitError(f"top_k must be at least 1, got {top_k}")
    if cand_tokenizer is None and not compare_by_text:
        cand_tokenizer = ref_tokenizer
    check_vocabularies(ref_model, cand_model, ref_tokenizer, cand_tokenizer, compare_by_text)

    if compare_by_text:
        if not isinstance(input_ids, str):
            raise ParityKitError(
                "compare_by_text=True needs the prompt as a string, so that each tokenizer encodes it itself")
        ref_prompt = encode_prompt(input_ids, ref_tokenizer, "the prompt")
        cand_prompt = encode_prompt(input_ids, cand_tokenizer, "the prompt")
    else:
        ref_prompt = encode_prompt(input_ids, ref_tokenizer, "the prompt")
        cand_prompt = ref_prompt
    check_token_ids([ref_model], ref_prompt, "the prompt")
    check_token_ids([cand_model], cand_prompt, "the prompt")
    check_context([ref_model], len(ref_prompt), max_new_tokens, "the prompt")
    check_context([cand_model], len(cand_prompt), max_new_tokens, "the prompt")

    # Logits are comparable id by id only when both runs index the same vocabulary.
    comparable_logits = not compare_by_text or logits_comparable(ref_model, cand_model, ref_tokenizer,
                                                                  cand_tokenizer)
    ref_eos = eos_ids(ref_model, ref_tokenizer) if stop_at_eos else set()
    cand_eos = eos_ids(cand_model, cand_tokenizer) if stop_at_eos else set()
    ref_trace = greedy_decode(ref_model, ref_prompt, max_new_tokens, top_k, ref_eos, progress)
    cand_trace = greedy_decode(cand_model, cand_prompt, max_new_tokens, top_k, cand_eos, progress)
    return compare_traces(ref_trace, cand_trace, ref_tokenizer=ref_tokenizer, cand_tokenizer=cand_tokenizer,
                           compare_by_text=compare_by_text, comparable_logits=comparable_logits, labels=labels,
                           max_new_tokens=max_new_tokens)


def compare_traces(ref: GreedyTrace, cand: GreedyTrace, *, ref_tokenizer: Any, cand_tokenizer: Any, compare_by_text: bool,
                    comparable_logits: bool, labels: tuple[str, str], max_new_tokens: int) -> LockstepResult:
    ref_pieces, cand_pieces = ref.pieces(ref_tokenizer), cand.pieces(cand_tokenizer)
    rows: list[dict[str, Any]] = []
    first: int | None = None
    for step in range(max(len(ref.tokens), len(cand.tokens))):
        row: dict[str, Any] = {"step": step}
        for side, trace, pieces in (("ref", ref, ref_pieces), ("cand", cand, cand_pieces)):
            if step < len(trace.tokens):
                row.update({f"{side}_token": trace.tokens[step], f"{side}_piece": pieces[step],
                            f"{side}_margin": trace.margins[step], f"{side}_topk_ids": trace.topk_ids[step],
                            f"{side}_topk_logits": trace.topk_logits[step]})
            else:  # this run ended at its end-of-sequence token
                row.update({f"{side}_token": pd.NA, f"{side}_piece": None, f"{side}_margin": math.nan,
                            f"{side}_topk_ids": [], f"{side}_topk_logits": []})
        both = step < len(ref.tokens) and step < len(cand.tokens)
        row["shared_prefix"] = first is None
        if first is None and both and comparable_logits:
            ref_logits, cand_logits = ref.logits[step].to(torch.float64), cand.logits[step].to(torch.float64)
            if ref_logits.shape != cand_logits.shape:
                raise ParityKitError(
                    f"the models return logits of different sizes ({ref_logits.numel()} vs {cand_logits.numel()}) "
                    "although their configs agree; pass compare_by_text=True with both tokenizers")
            row["logit_max_abs"], row["logit_rel_rms"] = logit_error(ref_logits, cand_logits)
            row["ref_gap_to_cand_choice"] = float(ref_logits[ref.tokens[step]] - ref_logits[cand.tokens[step]])
        else:
            row["logit_max_abs"] = row["logit_rel_rms"] = row["ref_gap_to_cand_choice"] = math.nan
        if compare_by_text:
            same = both and row["ref_piece"] == row["cand_piece"]
        else:
            same = both and row["ref_token"] == row["cand_token"]
        row["same"] = same
        if first is None and not same:
            first = step
        rows.append(row)

    steps = pd.DataFrame(rows, columns=_STEP_COLUMNS)
    for col in ("ref_token", "cand_token"):
        steps[col] = steps[col].astype("Int64")
    steps["same"] = steps["same"].astype(bool)
    steps["shared_prefix"] = steps["shared_prefix"].astype(bool)
    return LockstepResult(
        steps=steps, prompt_ids=ref.prompt, ref_tokens=list(ref.tokens), cand_tokens=list(cand.tokens),
        first_divergent_step=first, cand_prompt_ids=cand.prompt if compare_by_text else None,
        ref_tokenizer=ref_tokenizer, cand_tokenizer=cand_tokenizer, labels=labels,
        max_new_tokens=max_new_tokens, compare_by_text=compare_by_text)


_STEP_COLUMNS = ["step", "ref_token", "cand_token", "ref_piece", "cand_piece", "same", "shared_prefix",
                 "ref_margin", "cand_margin", "ref_gap_to_cand_choice", "logit_max_abs", "logit_rel_rms",
                 "ref_topk_ids", "ref_topk_logits", "cand_topk_ids", "cand_topk_logits"]


# --------------------------------------------------------------------------------------------
# teacher forcing
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def _full_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    out = model(input_ids=torch.tensor([ids], device=model_device(model)), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[0].detach().to("cpu", torch.float64)  # [T, vocab]


def _given_logits(logits: torch.Tensor, n_tokens: int) -> torch.Tensor:
    t = logits[0] if logits.dim() == 3 and logits.shape[0] == 1 else logits
    if t.dim() != 2 or t.shape[0] != n_tokens:
        raise ParityKitError(f"logits= must be [T, vocab] (or [1, T, vocab]) for the {n_tokens} tokens given; got "
                             f"{tuple(logits.shape)}")
    return t.detach().to("cpu", torch.float64)


def teacher_forced(
    ref_model: nn.Module,
    cand_model: nn.Module,
    input_ids: PromptLike,
    *,
    prompt_length: int | None = None,
    tokenizer: Any | None = None,
    logits: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """One forward of both models over the same tokens; per position logit error, margins, argmax agreement.

    ``logits``: both models' logits over exactly these tokens (``[T, vocab]`` or ``[1, T, vocab]``, reference
    first) from a forward already run, e.g. by :func:`parity_kit.triage`'s precision step; the models are then
    not run again.

    Row ``position`` holds the logits that predict token ``position + 1``. Columns: ``position,
    input_token, next_token, generated`` (the next token lies beyond ``prompt_length``), ``logit_max_abs,
    logit_rel_rms`` (fp64), ``ref_margin, cand_margin`` (top-1 − top-2), ``ref_argmax, cand_argmax,
    argmax_agree``, ``ref_gap_to_cand_argmax`` (how much the reference prefers its own argmax over the
    candidate's: a flip by noise needs this to be smaller than the logit error).

    >>> import torch
    >>> from parity_kit.testing import tiny_llama
    >>> m = tiny_llama(layers=1)
    >>> t = teacher_forced(m, m, [1, 2, 3, 4])
    >>> (len(t), bool(t["argmax_agree"].all()), float(t["logit_rel_rms"].max()))
    (4, True, 0.0)
    """
    check_vocabularies(ref_model, cand_model, tokenizer, tokenizer, compare_by_text=False)
    ids = encode_prompt(input_ids, tokenizer, "input_ids")
    check_token_ids([ref_model, cand_model], ids, "input_ids")
    check_context([ref_model, cand_model], len(ids), 0, "input_ids")
    if logits is None:
        ref_logits, cand_logits = _full_logits(ref_model, ids), _full_logits(cand_model, ids)
    else:
        ref_logits, cand_logits = (_given_logits(t, len(ids)) for t in logits)
    if ref_logits.shape != cand_logits.shape:
        raise ParityKitError(
            f"the models return logits of different shapes {tuple(ref_logits.shape)} vs {tuple(cand_logits.shape)}; "
            "teacher forcing needs one vocabulary")
    rows = []
    for pos in range(len(ids)):
        r, c = ref_logits[pos], cand_logits[pos]
        max_abs, rel = logit_error(r, c)
        ref_choice, ref_margin, _, _ = top_choices(r, 2)
        cand_choice, cand_margin, _, _ = top_choices(c, 2)
        rows.append({
            "position": pos, "input_token": ids[pos],
            "next_token": ids[pos + 1] if pos + 1 < len(ids) else pd.NA,
            "generated": prompt_length is not None and pos + 1 >= prompt_length,
            "logit_max_abs": max_abs, "logit_rel_rms": rel, "ref_margin": ref_margin, "cand_margin": cand_margin,
            "ref_argmax": ref_choice, "cand_argmax": cand_choice, "argmax_agree": ref_choice == cand_choice,
            "ref_gap_to_cand_argmax": float(r[ref_choice] - r[cand_choice]),
        })
    table = pd.DataFrame(rows)
    table["next_token"] = table["next_token"].astype("Int64")
    return table


def summarize_teacher_forced(table: pd.DataFrame) -> dict[str, Any]:
    """Headline numbers of a :func:`teacher_forced` table.

    ``disagreements_below_error``: argmax disagreements where the reference's preference for its own
    token (``ref_gap_to_cand_argmax``) is below the largest logit error at that position, i.e. the
    kind of flip rounding noise produces; ``ref_margin_percentile_at_disagreements``: where those
    margins sit among all the reference's margins (0 = the smallest), low for near-ties.

    >>> t = pd.DataFrame({"logit_max_abs": [0.1, 0.2], "logit_rel_rms": [1e-3, 2e-3], "ref_margin": [3.0, 0.05],
    ...                   "argmax_agree": [True, False], "ref_gap_to_cand_argmax": [0.0, 0.05]})
    >>> summarize_teacher_forced(t)["disagreements_below_error"]
    1
    """
    disagree = table[~table["argmax_agree"]]
    margins = table["ref_margin"].to_numpy(dtype=float)
    percentiles = [float((margins < m).mean()) for m in disagree["ref_margin"].to_numpy(dtype=float)]
    return {
        "positions": len(table),
        "argmax_disagreements": len(disagree),
        "disagreements_below_error": int((disagree["ref_gap_to_cand_argmax"] <= disagree["logit_max_abs"]).sum()),
        "median_logit_rel_rms": float(table["logit_rel_rms"].median()),
        "max_logit_rel_rms": float(table["logit_rel_rms"].max()),
        "median_logit_max_abs": float(table["logit_max_abs"].median()),
        "max_logit_max_abs": float(table["logit_max_abs"].max()),
        "median_ref_margin": float(np.median(margins)) if len(margins) else math.nan,
        "ref_margins_at_disagreements": [float(m) for m in disagree["ref_margin"]],
        "ref_margin_percentile_at_disagreements": percentiles,
    }
