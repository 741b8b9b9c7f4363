"""Greedy decoding of many prompts at once: left padding for attention models, stacked states for recurrent ones.

One prompt at a time leaves most of a GPU (and much of a CPU) idle; statistics over hundreds of prompts need
batches. :func:`greedy_decode_batch` decodes prompts together with the model's cache and returns one
:class:`~parity_kit.analyses.decoding.GreedyTrace` per prompt, as
:func:`~parity_kit.analyses.decoding.greedy_decode` would:

- a model that takes a padding mask (:func:`parity_kit._util.calling.takes_padding_mask`) gets the prompts
  left-padded, with the 2D attention mask and position ids that skip the padding, so every row's positions
  are those it would have alone;
- a recurrent model (a padding token would enter its state) prefills every prompt alone, then decodes all rows
  together from the stacked states when its cache type can stack them (``type(cache).stack(states)``, as
  :class:`parity_kit.models.rwkv7_state.RWKV7State` does); otherwise each prompt is decoded alone;
- each row stops at its own end-of-sequence token; a finished row keeps being fed (its outputs are dropped)
  until every row of its batch is done.

Batching changes the numerics (other matrix shapes, other reduction orders), so a batched trace need not be
bit-identical to the one decoded alone: that difference is *batch variance*, measured as a factor by
:func:`parity_kit.divergence_statistics` (``ModelPair(..., reference_batch=1, candidate_batch=8)``).

>>> from parity_kit.testing import tiny_llama
>>> model = tiny_llama(layers=1)
>>> traces = greedy_decode_batch(model, [[1, 5, 7], [2, 3]], max_new_tokens=3, top_k=2, eos=set())
>>> [len(t.tokens) for t in traces], traces[1].prompt
([3, 3], [2, 3])
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .._util.calling import model_device, takes_padding_mask
from ..errors import ParityKitError
from ..models.cache_compat import cache_argument, output_cache
from .decoding import GreedyTrace, greedy_decode, top_choices

__all__ = ["greedy_decode_batch"]

# Any id works: padded positions are masked out of every real token's attention.
_PAD_ID = 0


@torch.no_grad()
def greedy_decode_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    top_k: int,
    eos: set[int],
    *,
    batch_size: int | None = None,
    progress: bool = False,
) -> list[GreedyTrace]:
    """One greedy trace per prompt (in the order given), decoded ``batch_size`` consecutive prompts at a time.

    ``batch_size=None`` decodes all prompts in one batch; a batch of one prompt is
    :func:`~parity_kit.analyses.decoding.greedy_decode` itself.
    """
    if not prompts:
        raise ParityKitError("no prompts given; pass at least one prompt (a list of token ids)")
    if any(len(p) == 0 for p in prompts):
        raise ParityKitError("a prompt has no tokens; every prompt needs at least one token id")
    size = len(prompts) if batch_size is None else batch_size
    if size < 1:
        raise ParityKitError(f"batch_size must be at least 1 (or None for one batch), got {batch_size}")
    traces: list[GreedyTrace] = []
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(prompts), size), desc="batched greedy decoding", disable=not progress,
                          leave=False):
            batch = [list(p) for p in prompts[start:start + size]]
            if len(batch) == 1:
                traces.append(greedy_decode(model, batch[0], max_new_tokens, top_k, eos))
            elif takes_padding_mask(model):
                traces.extend(_decode_padded(model, batch, max_new_tokens, top_k, eos))
            else:
                traces.extend(_decode_stacked(model, batch, max_new_tokens, top_k, eos))
    finally:
        model.train(was_training)
    return traces


def _decode_padded(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, top_k: int,
                   eos: set[int]) -> list[GreedyTrace]:
    device = model_device(model)
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[_PAD_ID] * (longest - len(p)) + p for p in prompts], device=device)  # [batch, longest]
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [batch, longest]: each row counts from its first token
    padded = longest > min(len(p) for p in prompts)
    takes_positions = "position_ids" in _forward_parameters(model)
    traces = [GreedyTrace(prompt=list(p)) for p in prompts]
    done = [False] * len(prompts)
    cache_name = cache_argument(model)
    cache, step_ids, step_positions = None, ids, positions
    for _ in range(max_new_tokens):
        kwargs = {"input_ids": step_ids, "use_cache": True, cache_name: cache}
        if padded:
            kwargs["attention_mask"] = mask
            if takes_positions:
                kwargs["position_ids"] = step_positions
        out = model(**kwargs)
        choices = _record_step(traces, done, _last_logits(out), top_k, eos)
        if all(done):
            break
        new = torch.tensor(choices, device=device)[:, None]  # [batch, 1]
        ids = torch.cat([ids, new], dim=1)
        mask = torch.cat([mask, torch.ones_like(new)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        cache = output_cache(out)
        # Without a cache the whole sequence runs again, as greedy_decode does.
        step_ids, step_positions = (ids, positions) if cache is None else (new, positions[:, -1:])
    return traces


def _decode_stacked(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, top_k: int,
                    eos: set[int]) -> list[GreedyTrace]:
    device = model_device(model)
    cache_name = cache_argument(model)
    traces = [GreedyTrace(prompt=list(p)) for p in prompts]
    done = [False] * len(prompts)
    states, first_logits = [], []
    for prompt in prompts:  # prefill alone: a padding token would enter the state
        out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, **{cache_name: None})
        states.append(output_cache(out))
        first_logits.append(_last_logits(out))
    stack = getattr(type(states[0]), "stack", None)
    if states[0] is None or not callable(stack):
        return [greedy_decode(model, p, max_new_tokens, top_k, eos) for p in prompts]
    choices = _record_step(traces, done, torch.cat(first_logits), top_k, eos)
    cache = stack(states)
    for _ in range(max_new_tokens - 1):
        if all(done):
            break
        out = model(input_ids=torch.tensor(choices, device=device)[:, None], use_cache=True, **{cache_name: cache})
        cache = output_cache(out)
        choices = _record_step(traces, done, _last_logits(out), top_k, eos)
    return traces


def _last_logits(out: object) -> torch.Tensor:
    """``[batch, vocab]`` logits of the last position, on the CPU."""
    return (out.logits if hasattr(out, "logits") else out[0])[:, -1].detach().to("cpu")


def _record_step(traces: list[GreedyTrace], done: list[bool], logits: torch.Tensor, top_k: int,
                 eos: set[int]) -> list[int]:
    """Append this step's choice to every unfinished trace; the next input id of every row."""
    choices = []
    for row, trace in enumerate(traces):
        if done[row]:
            choices.append(trace.tokens[-1])
            continue
        choice, margin, top_ids, top_values = top_choices(logits[row].to(torch.float64), top_k)
        trace.tokens.append(choice)
        trace.margins.append(margin)
        trace.topk_ids.append(top_ids)
        trace.topk_logits.append(top_values)
        trace.logits.append(logits[row].clone())
        done[row] = choice in eos
        choices.append(choice)
    return choices


def _forward_parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()
