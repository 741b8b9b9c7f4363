"""Greedy decoding as the generation analyses run it: prompts to ids, checks, one free-running greedy trace.

A :class:`GreedyTrace` holds, per generated step, the greedy choice (argmax, as transformers' greedy search
picks it), the top-1 − top-2 margin, the top-k and the logits. Two traces of two runs, compared step by
step, are a lockstep comparison (:func:`parity_kit.lockstep_greedy`).

>>> from parity_kit.testing import tiny_llama
>>> trace = greedy_decode(tiny_llama(layers=1), [1, 5, 7], max_new_tokens=3, top_k=2, eos=set())
>>> len(trace.tokens), len(trace.topk_ids[0])
(3, 2)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._util.calling import model_device
from ..comparison.metrics import max_abs, rel_rms
from ..errors import ParityKitError
from ..models.cache_compat import cache_argument, output_cache


PromptLike = str | torch.Tensor | Sequence[int]


def _config_vocab_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    return int(size) if size is not None else None


def _context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    size = getattr(config, "max_position_embeddings", None)
    return int(size) if size is not None else None


def eos_ids(model: nn.Module, tokenizer: Any | None) -> set[int]:
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


def encode_prompt(prompt: PromptLike, tokenizer: Any | None, what: str) -> list[int]:
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


def logits_comparable(ref_model: nn.Module, cand_model: nn.Module, ref_tok: Any | None, cand_tok: Any | None) -> bool:
    """True when both runs index one vocabulary, so their logits can be compared id by id."""
    return (_config_vocab_size(ref_model) == _config_vocab_size(cand_model)
            and _tokenizer_vocab(ref_tok) == _tokenizer_vocab(cand_tok))


def check_vocabularies(ref_model: nn.Module, cand_model: nn.Module, ref_tok: Any | None,
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


def check_context(models: Sequence[nn.Module], prompt_len: int, max_new_tokens: int, what: str) -> None:
    limits = [n for n in (_context_length(m) for m in models) if n is not None]
    if not limits:
        return
    limit = min(limits)
    if prompt_len > limit - max_new_tokens:
        raise ParityKitError(
            f"{what} has {prompt_len} tokens, more than the context allows: max_position_embeddings {limit} − "
            f"max_new_tokens {max_new_tokens} = {limit - max_new_tokens}; shorten the prompt or lower max_new_tokens")


def check_max_new_tokens(max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ParityKitError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")


def logit_error(ref: torch.Tensor, cand: torch.Tensor) -> tuple[float, float]:
    """(max abs, rel_rms) of two logit vectors, with the kit's metrics (fp64; inf when one side overflows)."""
    return max_abs(ref, cand), rel_rms(ref, cand)


def top_choices(logits: torch.Tensor, k: int) -> tuple[int, float, list[int], list[float]]:
    """Greedy choice (argmax, as transformers' greedy search picks it), top1−top2 margin, top-k."""
    choice = int(torch.argmax(logits))
    values, ids = torch.topk(logits, min(max(k, 2), logits.numel()))
    margin = float(values[0] - values[1]) if values.numel() > 1 else math.inf
    return choice, margin, [int(i) for i in ids[:k]], [float(v) for v in values[:k]]


def decode_text(tokenizer: Any | None, ids: Sequence[int]) -> str:
    if tokenizer is None:
        return " ".join(str(i) for i in ids)
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def token_pieces(tokenizer: Any | None, ids: Sequence[int]) -> list[str]:
    """Text each token adds to the decoded continuation (incremental decoding keeps leading spaces)."""
    if tokenizer is None:
        return [str(i) for i in ids]
    pieces, previous = [], ""
    for n in range(1, len(ids) + 1):
        text = decode_text(tokenizer, ids[:n])
        pieces.append(text[len(previous):] if text.startswith(previous) else decode_text(tokenizer, ids[n - 1:n]))
        previous = text
    return pieces


@dataclass
class GreedyTrace:
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
            self._pieces[id(tokenizer)] = token_pieces(tokenizer, self.tokens)
        return self._pieces[id(tokenizer)]


@torch.no_grad()
def greedy_decode(model: nn.Module, prompt: list[int], max_new_tokens: int, top_k: int, eos: set[int],
                   progress: bool = False) -> GreedyTrace:
    """Greedy decoding with the model's KV cache (re-run over the whole sequence if it returns none).

    A run does not depend on any other run, so two runs decoded one after the other are the same as
    two decoded in lockstep; keeping them apart lets one run serve several comparisons.
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    trace = GreedyTrace(prompt=list(prompt))
    sequence, cache, new = list(prompt), None, list(prompt)
    cache_name = cache_argument(model)
    try:
        for _ in tqdm(range(max_new_tokens), desc="greedy decoding", disable=not progress, leave=False):
            ids = torch.tensor([sequence if cache is None else new], device=device)
            out = model(input_ids=ids, use_cache=True, **{cache_name: cache})
            cache = output_cache(out)
            logits = (out.logits if hasattr(out, "logits") else out[0])[0, -1].detach().to("cpu")
            choice, margin, top_ids, top_values = top_choices(logits.to(torch.float64), top_k)
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


def is_newline(tokenizer: Any | None, token: int) -> bool:
    return tokenizer is not None and "\n" in decode_text(tokenizer, [token])
