"""Greedy-generation divergence between two runs: lockstep decoding, teacher forcing, statistics.

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
- :func:`divergence_statistics` repeats the lockstep decoding over pairs × prompts;
  :func:`standard_pairs` builds the pairs that isolate dtype, attention implementation and conversion.
- :func:`layer_comparison` records original and converted model module by module and compares them
  through a name mapping (the InternLM2 → Llama one by default).

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> _ = torch.manual_seed(0)
>>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
...                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
>>> model = LlamaForCausalLM(cfg).eval()
>>> result = lockstep_greedy(model, model, [1, 5, 7], max_new_tokens=8, progress=False, stop_at_eos=False)
>>> result.first_divergent_step is None
True
"""

from __future__ import annotations

import html
import json
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..dtypes import DtypeLike, dtype_name, parse_dtype
from ..errors import ParityKitError
from ..comparison.metrics import max_abs, nominal_floor, rel_rms
from ..models.cache_compat import cache_argument, output_cache

PromptLike = str | torch.Tensor | Sequence[int]

#: Markers put around the part of a continuation after the first divergent step.
DIVERGENCE_OPEN = "⟦"
DIVERGENCE_CLOSE = "⟧"


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------

def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _config_vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    return int(size) if size is not None else None


def _context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    size = getattr(config, "max_position_embeddings", None)
    return int(size) if size is not None else None


def _eos_ids(model: nn.Module, tokenizer: Any | None) -> set[int]:
    """Every id that ends greedy generation for this model (generation config, config, tokenizer)."""
    ids: set[int] = set()
    sources = [getattr(getattr(model, "generation_config", None), "eos_token_id", None),
               getattr(getattr(model, "config", None), "eos_token_id", None),
               getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None]
    for value in sources:
        if value is None:
            continue
        ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return ids


def _as_id_list(input_ids: torch.Tensor | Sequence[int], what: str) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise ParityKitError(
                    f"{what} has batch size {input_ids.shape[0]}; pass one prompt at a time "
                    "(shape [T] or [1, T]) and loop, or use divergence_statistics for many prompts")
            input_ids = input_ids[0]
        if input_ids.dim() != 1:
            raise ParityKitError(f"{what} must have shape [T] or [1, T], got {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ParityKitError(f"{what} must hold integer token ids, got dtype {input_ids.dtype}")
        return [int(t) for t in input_ids.tolist()]
    try:
        return [int(t) for t in input_ids]
    except (TypeError, ValueError):
        raise ParityKitError(
            f"{what} must be a string, a list of token ids or an integer tensor, got {type(input_ids).__name__}"
        ) from None


def _encode(prompt: PromptLike, tokenizer: Any | None, what: str) -> list[int]:
    """Token ids of a prompt; raises for an empty prompt."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ParityKitError(f"{what} is an empty string; pass a prompt with at least one non-space character")
        if tokenizer is None:
            raise ParityKitError(f"{what} is a string but no tokenizer was given; pass the tokenizer or token ids")
        ids = _as_id_list(tokenizer(prompt, return_tensors="pt")["input_ids"], what)
    else:
        ids = _as_id_list(prompt, what)
    if not ids:
        raise ParityKitError(f"{what} holds no tokens; pass a prompt with at least one token")
    return ids


def _tokenizer_vocab(tokenizer: Any) -> dict[str, int] | None:
    get_vocab = getattr(tokenizer, "get_vocab", None)
    return dict(get_vocab()) if callable(get_vocab) else None


def _same_vocabulary(ref_tok: Any | None, cand_tok: Any | None) -> bool:
    if ref_tok is None or cand_tok is None or ref_tok is cand_tok:
        return True
    return _tokenizer_vocab(ref_tok) == _tokenizer_vocab(cand_tok)


def _check_vocabularies(ref_model: nn.Module, cand_model: nn.Module, ref_tok: Any | None,
                        cand_tok: Any | None, compare_by_text: bool) -> None:
    if compare_by_text:
        if ref_tok is None or cand_tok is None:
            raise ParityKitError(
                "compare_by_text=True needs both ref_tokenizer and cand_tokenizer, since each model "
                "encodes the prompt and decodes its tokens with its own tokenizer")
        return
    ref_size, cand_size = _config_vocab_size(ref_model), _config_vocab_size(cand_model)
    if ref_size is not None and cand_size is not None and ref_size != cand_size:
        raise ParityKitError(
            f"the two models have different vocabularies (config.vocab_size {ref_size} vs {cand_size}), so "
            "token ids and logits cannot be compared; pass compare_by_text=True with both tokenizers to "
            "compare the decoded text step by step instead")
    if not _same_vocabulary(ref_tok, cand_tok):
        raise ParityKitError(
            "ref_tokenizer and cand_tokenizer have different vocabularies, so the same id means different "
            "text; use one tokenizer for both runs, or pass compare_by_text=True to compare decoded text")


def _check_context(models: Sequence[nn.Module], prompt_len: int, max_new_tokens: int, what: str) -> None:
    limits = [n for n in (_context_length(m) for m in models) if n is not None]
    if not limits:
        return
    limit = min(limits)
    if prompt_len > limit - max_new_tokens:
        raise ParityKitError(
            f"{what} has {prompt_len} tokens, more than the context allows: max_position_embeddings {limit} − "
            f"max_new_tokens {max_new_tokens} = {limit - max_new_tokens}; shorten the prompt or lower max_new_tokens")


def _check_max_new_tokens(max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ParityKitError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")


def _logit_error(ref: torch.Tensor, cand: torch.Tensor) -> tuple[float, float]:
    """(max abs, rel_rms) of two logit vectors, with the kit's metrics (fp64; inf when one side overflows)."""
    return max_abs(ref, cand), rel_rms(ref, cand)


def _top(logits: torch.Tensor, k: int) -> tuple[int, float, list[int], list[float]]:
    """Greedy choice (argmax, as transformers' greedy search picks it), top1−top2 margin, top-k."""
    choice = int(torch.argmax(logits))
    values, ids = torch.topk(logits, min(max(k, 2), logits.numel()))
    margin = float(values[0] - values[1]) if values.numel() > 1 else math.inf
    return choice, margin, [int(i) for i in ids[:k]], [float(v) for v in values[:k]]


def _decode(tokenizer: Any | None, ids: Sequence[int]) -> str:
    if tokenizer is None:
        return " ".join(str(i) for i in ids)
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def _pieces(tokenizer: Any | None, ids: Sequence[int]) -> list[str]:
    """Text each token adds to the decoded continuation (incremental decoding keeps leading spaces)."""
    if tokenizer is None:
        return [str(i) for i in ids]
    pieces, previous = [], ""
    for n in range(1, len(ids) + 1):
        text = _decode(tokenizer, ids[:n])
        pieces.append(text[len(previous):] if text.startswith(previous) else _decode(tokenizer, ids[n - 1:n]))
        previous = text
    return pieces


@dataclass
class _Trace:
    """One free-running greedy decode: per step the choice, its margin, the top-k and the logits."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_logits: list[list[float]] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # [vocab] each, the model's dtype, CPU
    _pieces: dict[int, list[str]] = field(default_factory=dict, repr=False)  # id(tokenizer) -> pieces

    def pieces(self, tokenizer: Any | None) -> list[str]:
        """The text each generated token adds, decoded once per tokenizer."""
        if id(tokenizer) not in self._pieces:
            self._pieces[id(tokenizer)] = _pieces(tokenizer, self.tokens)
        return self._pieces[id(tokenizer)]


@torch.no_grad()
def _greedy_decode(model: nn.Module, prompt: list[int], max_new_tokens: int, top_k: int, eos: set[int],
                   progress: bool = False) -> _Trace:
    """Greedy decoding with the model's KV cache (re-run over the whole sequence if it returns none).

    A run does not depend on any other run, so two runs decoded one after the other are the same as
    two decoded in lockstep; keeping them apart lets one run serve several comparisons.
    """
    device = _model_device(model)
    was_training = model.training
    model.eval()
    trace = _Trace(prompt=list(prompt))
    sequence, cache, new = list(prompt), None, list(prompt)
    cache_name = cache_argument(model)
    try:
        for _ in tqdm(range(max_new_tokens), desc="greedy decoding", disable=not progress, leave=False):
            ids = torch.tensor([sequence if cache is None else new], device=device)
            out = model(input_ids=ids, use_cache=True, **{cache_name: cache})
            cache = output_cache(out)
            logits = (out.logits if hasattr(out, "logits") else out[0])[0, -1].detach().to("cpu")
            choice, margin, top_ids, top_values = _top(logits.to(torch.float64), top_k)
            trace.tokens.append(choice)
            trace.margins.append(margin)
            trace.topk_ids.append(top_ids)
            trace.topk_logits.append(top_values)
            trace.logits.append(logits)
            if choice in eos:
                break
            sequence.append(choice)
            new = [choice]
    finally:
        model.train(was_training)
    return trace


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
        return _decode(self.ref_tokenizer, self.ref_tokens)

    @property
    def cand_text(self) -> str:
        """The candidate run's continuation, decoded."""
        return _decode(self.cand_tokenizer or self.ref_tokenizer, self.cand_tokens)

    def reference_sequence(self) -> torch.Tensor:
        """Prompt + the reference's continuation, shape [1, T]: the input for :func:`teacher_forced`."""
        return torch.tensor([self.prompt_ids + self.ref_tokens])

    def _marked(self, tokenizer: Any | None, tokens: list[int], open_: str, close: str) -> str:
        d = self.first_divergent_step
        full = _decode(tokenizer, tokens)
        if d is None:
            return full
        head = _decode(tokenizer, tokens[:d])
        # Decoding the tail alone can drop a leading space, so split the full text where possible.
        tail = full[len(head):] if full.startswith(head) else _decode(tokenizer, tokens[d:])
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
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    >>> ref = LlamaForCausalLM(cfg).eval()
    >>> r = lockstep_greedy(ref, ref, [1, 2, 3], max_new_tokens=4, progress=False, stop_at_eos=False)
    >>> (r.first_divergent_step, len(r.steps), float(r.steps["logit_max_abs"].max()))
    (None, 4, 0.0)
    """
    _check_max_new_tokens(max_new_tokens)
    if top_k < 1:
        raise ParityKitError(f"top_k must be at least 1, got {top_k}")
    if cand_tokenizer is None and not compare_by_text:
        cand_tokenizer = ref_tokenizer
    _check_vocabularies(ref_model, cand_model, ref_tokenizer, cand_tokenizer, compare_by_text)

    if compare_by_text:
        if not isinstance(input_ids, str):
            raise ParityKitError(
                "compare_by_text=True needs the prompt as a string, so that each tokenizer encodes it itself")
        ref_prompt = _encode(input_ids, ref_tokenizer, "the prompt")
        cand_prompt = _encode(input_ids, cand_tokenizer, "the prompt")
    else:
        ref_prompt = _encode(input_ids, ref_tokenizer, "the prompt")
        cand_prompt = ref_prompt
    _check_context([ref_model], len(ref_prompt), max_new_tokens, "the prompt")
    _check_context([cand_model], len(cand_prompt), max_new_tokens, "the prompt")

    # Logits are comparable id by id only when both runs index the same vocabulary.
    comparable_logits = not compare_by_text or (
        _config_vocab_size(ref_model) == _config_vocab_size(cand_model)
        and _tokenizer_vocab(ref_tokenizer) == _tokenizer_vocab(cand_tokenizer))
    ref_eos = _eos_ids(ref_model, ref_tokenizer) if stop_at_eos else set()
    cand_eos = _eos_ids(cand_model, cand_tokenizer) if stop_at_eos else set()
    ref_trace = _greedy_decode(ref_model, ref_prompt, max_new_tokens, top_k, ref_eos, progress)
    cand_trace = _greedy_decode(cand_model, cand_prompt, max_new_tokens, top_k, cand_eos, progress)
    return _compare_traces(ref_trace, cand_trace, ref_tokenizer=ref_tokenizer, cand_tokenizer=cand_tokenizer,
                           compare_by_text=compare_by_text, comparable_logits=comparable_logits, labels=labels,
                           max_new_tokens=max_new_tokens)


def _compare_traces(ref: _Trace, cand: _Trace, *, ref_tokenizer: Any, cand_tokenizer: Any, compare_by_text: bool,
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
            row["logit_max_abs"], row["logit_rel_rms"] = _logit_error(ref_logits, cand_logits)
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
    out = model(input_ids=torch.tensor([ids], device=_model_device(model)), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[0].detach().to("cpu", torch.float64)  # [T, vocab]


def teacher_forced(
    ref_model: nn.Module,
    cand_model: nn.Module,
    input_ids: PromptLike,
    *,
    prompt_length: int | None = None,
    tokenizer: Any | None = None,
) -> pd.DataFrame:
    """One forward of both models over the same tokens; per position logit error, margins, argmax agreement.

    Row ``position`` holds the logits that predict token ``position + 1``. Columns: ``position,
    input_token, next_token, generated`` (the next token lies beyond ``prompt_length``), ``logit_max_abs,
    logit_rel_rms`` (fp64), ``ref_margin, cand_margin`` (top-1 − top-2), ``ref_argmax, cand_argmax,
    argmax_agree``, ``ref_gap_to_cand_argmax`` (how much the reference prefers its own argmax over the
    candidate's: a flip by noise needs this to be smaller than the logit error).

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    >>> m = LlamaForCausalLM(cfg).eval()
    >>> t = teacher_forced(m, m, [1, 2, 3, 4])
    >>> (len(t), bool(t["argmax_agree"].all()), float(t["logit_rel_rms"].max()))
    (4, True, 0.0)
    """
    _check_vocabularies(ref_model, cand_model, tokenizer, tokenizer, compare_by_text=False)
    ids = _encode(input_ids, tokenizer, "input_ids")
    _check_context([ref_model, cand_model], len(ids), 0, "input_ids")
    ref_logits, cand_logits = _full_logits(ref_model, ids), _full_logits(cand_model, ids)
    if ref_logits.shape != cand_logits.shape:
        raise ParityKitError(
            f"the models return logits of different shapes {tuple(ref_logits.shape)} vs {tuple(cand_logits.shape)}; "
            "teacher forcing needs one vocabulary")
    rows = []
    for pos in range(len(ids)):
        r, c = ref_logits[pos], cand_logits[pos]
        max_abs, rel = _logit_error(r, c)
        ref_choice, ref_margin, _, _ = _top(r, 2)
        cand_choice, cand_margin, _, _ = _top(c, 2)
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


# --------------------------------------------------------------------------------------------
# pairs of runs and statistics over a prompt set
# --------------------------------------------------------------------------------------------

@dataclass
class ModelPair:
    """Two runs to compare: ``reference`` is the trusted one; ``varies`` names the one factor that differs.

    >>> import torch.nn as nn
    >>> ModelPair("a vs b", nn.Linear(1, 1), nn.Linear(1, 1), varies="dtype").varies
    'dtype'
    """

    name: str
    reference: nn.Module
    candidate: nn.Module
    varies: str = ""
    setting: dict[str, str] = field(default_factory=dict)


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
    from ..models import load

    model, tokenizer = load(name_or_path, dtype=dtype, device=device, attn_implementation=attn_implementation,
                            trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


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
    from ..present.panels import MODELS

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

    def add(name: str, ref: tuple[str, str, str], cand: tuple[str, str, str], varies: str, setting: dict) -> None:
        ref_model, cand_model = get(*ref), get(*cand)
        if ref_model is not None and cand_model is not None:
            pairs.append(ModelPair(name, ref_model, cand_model, varies=varies, setting=setting))

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
    if not pairs:
        raise ParityKitError(f"no pair could be loaded for {original!r} and {converted!r}; see the warnings above")
    return pairs, tokenizers[original]


def shipped_attention(name_or_path: str, *, trust_remote_code: bool = False) -> str:
    """The attention implementation a model runs when none is requested: its config's
    ``attn_implementation`` (InternLM2: "eager"), else transformers' default, "sdpa".

    >>> shipped_attention("tiny-internlm2"), shipped_attention("tiny-internlm2-llama")
    ('eager', 'sdpa')
    """
    from transformers import AutoConfig

    from ..models import _resolve, register_architectures

    _, location = _resolve(name_or_path)
    register_architectures()
    config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    return getattr(config, "attn_implementation", None) or "sdpa"


def load_prompts(n: int | None = None) -> list[str]:
    """The first ``n`` chat prompts of ``data/prompts.json`` (all when ``n`` is None); the first asks "who are you".

    >>> load_prompts(2)[0]
    'User: who are you\\nAssistant:'
    """
    from .._util.paths import data_dir

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
    from ..builtins.corpus import chat_prompt

    return chat_prompt(question)


def _is_newline(tokenizer: Any | None, token: int) -> bool:
    return tokenizer is not None and "\n" in _decode(tokenizer, [token])


def divergence_statistics(
    pairs: Sequence[ModelPair] | Mapping[str, tuple[nn.Module, nn.Module]],
    prompts: Sequence[PromptLike],
    tokenizer: Any | None,
    *,
    max_new_tokens: int,
    progress: bool = True,
    stop_at_eos: bool = True,
) -> pd.DataFrame:
    """Lockstep-decode every pair on every prompt; one row per (pair, prompt).

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
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    >>> m = LlamaForCausalLM(cfg).eval()
    >>> stats = divergence_statistics({"self": (m, m)}, [[1, 2], [3, 4]], None, max_new_tokens=4,
    ...                               progress=False, stop_at_eos=False)
    >>> stats["diverged"].tolist()
    [False, False]
    """
    _check_max_new_tokens(max_new_tokens)
    if isinstance(pairs, Mapping):
        pairs = [ModelPair(name, ref, cand) for name, (ref, cand) in pairs.items()]
    pairs = list(pairs)
    if not pairs:
        raise ParityKitError("no pairs given; build them with standard_pairs(...) or pass {name: (ref, cand)}")
    if not prompts:
        raise ParityKitError("no prompts given; pass at least one prompt")
    encoded = [_encode(p, tokenizer, f"prompt {i}") for i, p in enumerate(prompts)]
    for pair in pairs:
        _check_vocabularies(pair.reference, pair.candidate, tokenizer, tokenizer, compare_by_text=False)
    models = {id(m): m for pair in pairs for m in (pair.reference, pair.candidate)}
    for i, ids in enumerate(encoded):
        _check_context(list(models.values()), len(ids), max_new_tokens, f"prompt {i}")
    eos = {key: _eos_ids(m, tokenizer) if stop_at_eos else set() for key, m in models.items()}

    rows: list[tuple[int, int, dict[str, Any]]] = []
    bar = tqdm(total=len(pairs) * len(encoded), desc="divergence statistics", disable=not progress)
    try:
        for i, (prompt, ids) in enumerate(zip(prompts, encoded)):
            # A model's greedy run does not depend on its partner: decode each model once per prompt.
            traces: dict[int, _Trace] = {}
            for k, pair in enumerate(pairs):
                for m in (pair.reference, pair.candidate):
                    if id(m) not in traces:
                        traces[id(m)] = _greedy_decode(m, ids, max_new_tokens, 5, eos[id(m)])
                result = _compare_traces(traces[id(pair.reference)], traces[id(pair.candidate)], ref_tokenizer=tokenizer,
                                         cand_tokenizer=tokenizer, compare_by_text=False, comparable_logits=True,
                                         labels=("reference", "candidate"), max_new_tokens=max_new_tokens)
                rows.append((k, i, {"pair": pair.name, "varies": pair.varies, **pair.setting, "prompt_index": i,
                                    "prompt": prompt if isinstance(prompt, str) else _decode(tokenizer, ids),
                                    "prompt_tokens": len(ids), **_divergence_row(result, tokenizer)}))
                bar.update()
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
    newline_flags = [_is_newline(tokenizer, previous[s]) for s in shared["step"]]
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
                   after_newline=_is_newline(tokenizer, previous[d]))
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


# --------------------------------------------------------------------------------------------
# layer-by-layer comparison of original and converted model
# --------------------------------------------------------------------------------------------

def layer_comparison(
    original: nn.Module,
    converted: nn.Module,
    input_ids: PromptLike,
    *,
    mapping: Any | None = None,
    tokenizer: Any | None = None,
    modules: Any = "*",
) -> pd.DataFrame:
    """Record both models module by module on one prompt and compare them (``pk.compare``'s table).

    ``mapping`` defaults to ``parity_kit.comparison.mapping.internlm2_to_llama(original.config)`` when the original
    is an InternLM2 model (fused ``wqkv`` split into q/k/v, modules renamed), else to identical names.
    The table's ``floor``/``verdict`` columns tell whether each difference stays at the rounding floor.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    >>> m = LlamaForCausalLM(cfg).eval()
    >>> table = layer_comparison(m, m, [1, 2, 3])
    >>> float(table.loc[table["status"] == "ok", "rel_rms"].max())
    0.0
    """
    from ..capture.recorder import record
    from ..comparison.compare import compare

    ids = _encode(input_ids, tokenizer, "input_ids")
    _check_context([original, converted], len(ids), 0, "input_ids")
    if mapping is None and getattr(getattr(original, "config", None), "model_type", None) == "internlm2":
        from ..comparison.mapping import internlm2_to_llama

        mapping = internlm2_to_llama(original.config)
    with torch.no_grad():
        with record(original, modules=modules) as ref_rec:
            original(input_ids=torch.tensor([ids], device=_model_device(original)), use_cache=False)
        with record(converted, modules=modules) as cand_rec:
            converted(input_ids=torch.tensor([ids], device=_model_device(converted)), use_cache=False)
    return compare(ref_rec, cand_rec, mapping=mapping)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")
_EMBEDDINGS = ("model.tok_embeddings", "model.embed_tokens", "model.embeddings", "transformer.wte")
_FINAL_NORMS = ("model.norm", "transformer.ln_f")
_HEADS = ("output", "lm_head")


def layer_profile(table: pd.DataFrame, *, metric: str = "rel_rms") -> pd.DataFrame:
    """The residual stream of a :func:`layer_comparison` table: embedding, each decoder layer, final norm, logits.

    Columns ``position`` (0, 1, …), ``label`` ("embed", "0" … "L−1", "norm", "logits"), ``module``,
    ``<metric>``, ``floor`` (``compare``'s floor where it is positive, else :func:`parity_kit.comparison.metrics.nominal_floor` of the
    candidate dtype) and ``floor_ratio``.

    >>> t = pd.DataFrame({"module": ["model.layers.0", "model.layers.0.mlp", "model.layers.1"], "call": [0, 0, 0],
    ...                   "tensor": ["output"] * 3, "rel_rms": [0.0, 1e-3, 2e-7], "floor": [0.0] * 3,
    ...                   "cand_dtype": ["fp32"] * 3, "status": ["ok"] * 3})
    >>> layer_profile(t)["label"].tolist()
    ['0', '1']
    """
    picked: dict[tuple[int, int], dict[str, Any]] = {}
    for _, row in table.iterrows():
        if row.get("status", "ok") != "ok" or int(row.get("call", 0)) != 0:
            continue
        if str(row.get("tensor", "output")) not in ("output", "output.0", "output.logits", "output.last_hidden_state"):
            continue
        module = str(row["module"])
        match = _LAYER.search(module)
        if match is not None:
            key, label = (1, int(match.group(1))), match.group(1)
        elif module in _EMBEDDINGS:
            key, label = (0, 0), "embed"
        elif module in _FINAL_NORMS:
            key, label = (2, 0), "norm"
        elif module in _HEADS:
            key, label = (3, 0), "logits"
        else:
            continue
        floor = float(row["floor"]) if "floor" in row and pd.notna(row["floor"]) else 0.0
        if floor <= 0 and pd.notna(row.get("cand_dtype")):
            floor = nominal_floor(str(row["cand_dtype"]))
        picked.setdefault(key, {"label": label, "module": module, metric: float(row[metric]), "floor": floor})
    if not any(key[0] == 1 for key in picked):
        raise ParityKitError(
            "the comparison table has no decoder-layer outputs (modules named '…layers.<i>'); record with "
            "modules='*' or include 'model.layers.*'")
    profile = pd.DataFrame([picked[k] for k in sorted(picked)])
    profile.insert(0, "position", range(len(profile)))
    profile["floor_ratio"] = profile[metric] / profile["floor"]
    return profile


# --------------------------------------------------------------------------------------------
# from measurements to a conclusion (story 01)
# --------------------------------------------------------------------------------------------

#: Two implementations in one dtype are "at the rounding floor" when their rel_rms stays within this
#: many single roundings (:func:`parity_kit.comparison.metrics.nominal_floor`): a few layers of long dot products each add several.
SAME_DTYPE_TOLERANCE = 30.0


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
    newline = _is_newline(result.ref_tokenizer, previous)
    return (f"{what}: they part at generated token {step}{' (right after a newline)' if newline else ''}, where "
            f"the reference's top-1 − top-2 margin is {_fmt(info['ref_margin_at_divergence'])} logits against a "
            f"logit error of {_fmt(info['logit_max_abs_at_divergence'])}")


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
) -> tuple[str, dict[str, Any]]:
    """Story 01's conclusion and every number it relies on, from the notebook's measurements.

    ``case``: {"original": …, "converted": …} lockstep results, low vs reference dtype, each model in
    its shipped attention, optionally "as shipped": original vs converted in the low dtype. ``teacher``: :func:`summarize_teacher_forced` dicts keyed "dtype (original)",
    "conversion (<reference dtype>)", "conversion (<dtype>)". ``stats``: :func:`divergence_statistics`
    over :func:`standard_pairs`. ``profiles``: {dtype name: :func:`layer_profile`} original vs converted.
    Returns ``(conclusion, figures)``; which factor is named depends only on the measured fractions.

    >>> text, figures = conclude_divergence(prompt="who are you", case=case, teacher=tf, stats=stats,
    ...     profiles=profiles, dtype="fp16", reference_dtype="fp32", shipped=shipped,
    ...     max_new_tokens=128)  # doctest: +SKIP
    """
    low, high = dtype_name(parse_dtype(dtype)), dtype_name(parse_dtype(reference_dtype))
    factors = factor_summary(stats)
    per_pair = divergence_summary(stats)

    def fraction(factor: str, dtype_setting: str) -> float:
        row = factors[(factors["factor"] == factor) & (factors["dtype"] == dtype_setting)]
        return float(row["diverged_fraction"].iloc[0]) if len(row) else math.nan

    def pair_value(name: str, column: str) -> float:
        row = per_pair[per_pair["pair"] == name]
        return float(row[column].iloc[0]) if len(row) else math.nan

    candidates = {
        f"{low} vs {high} (dtype)": fraction("dtype", f"{low} vs {high}"),
        f"attention implementation in {low}": fraction("attention", low),
        f"attention implementation in {high}": fraction("attention", high),
        f"conversion in {low}": fraction("conversion", low),
        f"conversion in {high}": fraction("conversion", high),
    }
    measured = {k: v for k, v in candidates.items() if not math.isnan(v)}
    ranked = sorted(measured.items(), key=lambda kv: kv[1], reverse=True)
    main, main_fraction = ranked[0] if ranked else ("none", math.nan)

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
    exact_conversion = not math.isnan(high_ratio) and high_ratio <= SAME_DTYPE_TOLERANCE

    tf_dtype = teacher.get("dtype (original)", {})
    tf_conv_high = teacher.get(f"conversion ({high})", {})
    tf_conv_low = teacher.get(f"conversion ({low})", {})
    n_prompts, n_pairs = int(stats["prompt_index"].nunique()), int(stats["pair"].nunique())
    n_single = int(stats.loc[stats["varies"].isin(["dtype", "attention", "conversion"]), "pair"].nunique())

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
        (f"Original vs converted as shipped (original with {shipped['original']} attention, converted with "
         f"{shipped['converted']}) diverge in {_pct(shipped_fraction[low])} of generations in {low} and "
         f"{_pct(shipped_fraction[high])} in {high}. "
         if not math.isnan(shipped_fraction[low]) else "")
        + f"Shipped as they are, {low} vs {high} makes {_pct(orig_fraction)} of the original's generations "
        f"diverge (median first divergent step {_fmt(pair_value(orig_dtype_pair, 'median_first_step'))}) and "
        f"{_pct(conv_fraction)} of the converted model's (median {_fmt(pair_value(conv_dtype_pair, 'median_first_step'))})"
        + (": the original is the more sensitive one." if orig_fraction > conv_fraction else
           ": the original is not more sensitive than the converted model here." if orig_fraction < conv_fraction
           else ": both are equally sensitive here."),
        (f"Layer by layer in {high}, the converted model reproduces the original bit for bit, so the conversion "
         "itself is exact" if high_ratio == 0 else
         f"Layer by layer in {high}, the converted model reproduces the original within "
         f"{_fmt(high_ratio, 2)}× one {high} rounding (at most), so the conversion itself is exact up to rounding"
         if exact_conversion else
         f"Layer by layer in {high}, the converted model differs from the original by up to {_fmt(high_ratio, 2)}× "
         f"one {high} rounding: more than rounding explains, so check the conversion")
        + (f"; in {low} they are bit for bit identical too." if low_max == 0 else
           f"; in {low} the two differ by up to rel_rms {_fmt(low_max)} ({_fmt(low_ratio, 2)}× one {low} rounding)."),
        (f"Teacher-forced over the {high} continuation, the original's {low} and {high} logits differ by median "
         f"rel_rms {_fmt(tf_dtype.get('median_logit_rel_rms'))} with {tf_dtype.get('argmax_disagreements', 'n/a')} "
         f"argmax disagreements in {tf_dtype.get('positions', 'n/a')} positions "
         f"({tf_dtype.get('disagreements_below_error', 'n/a')} of them where the margin is below the logit error); "
         f"original vs converted differ by median rel_rms {_fmt(tf_conv_high.get('median_logit_rel_rms'))} in {high} "
         f"({tf_conv_high.get('argmax_disagreements', 'n/a')} disagreements) and "
         f"{_fmt(tf_conv_low.get('median_logit_rel_rms'))} in {low} ({tf_conv_low.get('argmax_disagreements', 'n/a')})."),
    ]
    if len(diverged):
        comparison = (f"{margin_all / margin_at:.0f}× smaller than" if 0 < margin_at < margin_all else
                      "not smaller than" if margin_at >= margin_all else "against")
        sentences.append(
            f"At the divergent step the reference's top-1 − top-2 margin has median {_fmt(margin_at)} logits, "
            f"{comparison} the median {_fmt(margin_all)} over all shared steps (median share of the same "
            f"generation's earlier margins below it: {_fmt(percentile, 2)}); {_pct(newline_share)} of divergences "
            f"come right after a newline token, whose base rate is {_pct(newline_base)} of steps.")
    else:
        sentences.append(f"No generation diverged in any pair within {max_new_tokens} tokens on this model.")
    if ranked and main_fraction > 0:
        sentences.append(
            f"The factor that explains the divergence: {main} ({_pct(main_fraction)} of generations diverge). "
            f"Advice: compare a conversion in {high}"
            + (f", where it diverges in {_pct(measured.get(f'conversion in {high}', math.nan))} of generations"
               if f"conversion in {high}" in measured else "")
            + ", and compare teacher-forced logits over one token sequence rather than free-running generations: "
              "a single near-tie flipped by rounding noise changes every later token without any bug.")
    else:
        sentences.append(
            "No factor made any generation diverge here, so the tiny model does not show the effect; "
            "teacher-forced logits still measure the numeric differences above.")

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
        slug = re.sub(r"\W+", "_", key).strip("_")
        for field_name in ("median_logit_rel_rms", "max_logit_rel_rms", "argmax_disagreements",
                           "disagreements_below_error", "positions"):
            figures[f"teacher_forced_{slug}_{field_name}"] = tf.get(field_name)
    return " ".join(sentences), figures
