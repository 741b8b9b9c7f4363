"""Measure an execution floor: one configuration run again, in batches, and under other kernel settings.

:func:`execution_floor` runs ``model`` on one input alone (the baseline, recorded in tensors mode), then

- ``run_to_run``: alone again, ``repeats - 1`` times;
- ``batch``: at the first and the last slot of batches of each size in ``batch_sizes``, among filler prompts of
  other lengths, padded on each side in ``padding`` (with the attention mask, and position ids that skip left
  padding); a model without a padding mask (a recurrent one) gets fillers of the input's own length, unpadded;
- ``kernel_settings`` (CUDA only): TF32 matrix products toggled, deterministic algorithms toggled,

and compares every module output of each run with the baseline's, on the input's own rows and positions. The
largest rel_rms per (module, call, tensor) and source is the :class:`~parity_kit.comparison.execution.ExecutionFloor`
that ``pk.compare(..., execution_floor=...)`` judges against. Only one run besides the baseline is held at a time.

>>> from parity_kit.testing import tiny_llama
>>> floor = execution_floor(tiny_llama(layers=1), [[5, 9, 2, 7]], repeats=2, batch_sizes=(2,), progress=False)
>>> sorted(floor.floors), floor.floors["run_to_run"][("lm_head", 0, "output")]
(['batch', 'run_to_run'], 0.0)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._util.calling import model_device, model_dtype, takes_padding_mask
from ..capture import record
from ..capture.selection import ModuleSpec
from ..comparison.compare import compare
from ..comparison.execution import ExecutionFloor
from ..dtypes import dtype_name
from ..errors import ParityKitError
from ..recording import Call, Recording

__all__ = ["execution_floor"]

_PAD_ID = 0  # masked out of every real token's attention, so any id works


def execution_floor(
    model: nn.Module,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    *,
    repeats: int = 3,
    batch_sizes: Sequence[int] = (2, 4),
    padding: Sequence[str] = ("left", "right"),
    modules: ModuleSpec = "*",
    keyed_by: str = "candidate",
    kernel_settings: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> ExecutionFloor:
    """The spread of ``model``'s module outputs on ``input_ids`` (``[1, T]``) over executions (module docstring).

    ``keyed_by`` says which side of later comparisons the model is ("candidate": tables are matched by their
    ``cand_module`` names); ``kernel_settings=False`` skips the CUDA toggles.
    """
    ids = _one_prompt(input_ids, model_device(model))
    if repeats < 1:
        raise ParityKitError(f"repeats={repeats}: pass at least 1 (the baseline run; 2 or more to measure "
                             "run-to-run noise)")
    if any(int(b) < 2 for b in batch_sizes):
        raise ParityKitError(f"batch_sizes={list(batch_sizes)}: every batch needs at least 2 rows (the input and "
                             "a filler); pass () to skip the batch variance")
    unknown = sorted(set(padding) - {"left", "right"})
    if unknown:
        raise ParityKitError(f"padding {unknown} is not understood; use 'left' and/or 'right'")
    plan = _plan(model, ids, repeats, [int(b) for b in batch_sizes], list(padding), kernel_settings, seed)
    floors: dict[str, dict[tuple[str, int, str], float]] = {}
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(plan.runs) + 1, desc="execution floor", disable=not progress)
        try:
            baseline = _recorded(model, modules, lambda: model(**plan.alone))
            bar.update()
            for source, description, run in plan.runs:
                bar.set_postfix_str(description)
                table = compare(baseline, run(modules), strict=False)
                ok = table[table["status"] == "ok"]
                worst = floors.setdefault(source, {})
                for module, call, tensor, value in zip(ok["module"], ok["call"], ok["tensor"], ok["rel_rms"]):
                    key = (module, int(call), tensor)
                    worst[key] = max(worst.get(key, 0.0), float(value))
                bar.update()
        finally:
            bar.close()
    finally:
        model.train(was_training)
    return ExecutionFloor(dtype=dtype_name(model_dtype(model)), device=str(model_device(model)), floors=floors,
                          keyed_by=keyed_by, contexts=tuple(d for _, d, _ in plan.runs), skipped=tuple(plan.skipped),
                          model=type(model).__name__, metadata={"tokens": int(ids.shape[1]), "repeats": repeats})


class _Plan:
    def __init__(self, alone: dict[str, Any]) -> None:
        self.alone = alone
        self.runs: list[tuple[str, str, Callable[[ModuleSpec], Recording]]] = []
        self.skipped: list[str] = []


def _plan(model: nn.Module, ids: torch.Tensor, repeats: int, batch_sizes: list[int], padding: list[str],
          kernel_settings: bool, seed: int) -> _Plan:
    parameters = _forward_parameters(model)
    extra = {"use_cache": False} if "use_cache" in parameters else {}
    plan = _Plan({"input_ids": ids, **extra})
    for r in range(1, repeats):
        plan.runs.append(("run_to_run", f"alone, repeat {r}", lambda mods: _recorded(model, mods,
                                                                                     lambda: model(**plan.alone))))
    padded = takes_padding_mask(model)
    sides = padding if padded else ["none"]
    if not padded and batch_sizes:
        plan.skipped.append(f"{type(model).__name__} takes no padding mask: batches of equal length only, unpadded")
    generator = torch.Generator().manual_seed(seed)
    for size in batch_sizes:
        for side in sides:
            for slot in sorted({0, size - 1}):
                batch = _batch(model, ids, size, slot, side, generator, "position_ids" in parameters, extra)
                plan.runs.append(("batch", f"slot {slot} of {size}, " + ("unpadded" if side == "none" else f"{side} padding"),
                                  lambda mods, b=batch: _recorded_slice(model, mods, *b)))
    if kernel_settings and ids.device.type == "cuda":
        for name, toggle in (("TF32 matmul", _toggled_tf32), ("deterministic algorithms", _toggled_deterministic)):
            plan.runs.append(("kernel_settings", f"{name} toggled",
                              lambda mods, t=toggle: t(lambda: _recorded(model, mods, lambda: model(**plan.alone)))))
    elif kernel_settings:
        plan.skipped.append("TF32 and deterministic-algorithm toggles: CUDA only")
    return plan


def _batch(model: nn.Module, ids: torch.Tensor, size: int, slot: int, side: str, generator: torch.Generator,
           takes_positions: bool, extra: dict[str, Any]) -> tuple[dict[str, Any], int, int, int, int, int]:
    """Keyword arguments of one batch holding ``ids`` at ``slot``, and where its tokens are: (kwargs, size, slot,
    offset, tokens, length of the padded rows)."""
    tokens = int(ids.shape[1])
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or int(ids.max()) + 1)
    if side == "none":
        lengths = [tokens] * size
    else:  # some fillers longer (the input gets padded), some shorter; never as long as the batch is wide
        lengths = [tokens + 3 if (row + slot) % 2 else max(1, tokens - 2) for row in range(size)]
        if size > 1 and max(lengths) <= tokens:
            lengths[(slot + 1) % size] = tokens + 3
    lengths[slot] = tokens
    width = max(lengths)
    rows, mask = [], []
    for row, length in enumerate(lengths):
        real = ids[0].tolist() if row == slot else torch.randint(min(3, vocab - 1), vocab, (length,),
                                                                   generator=generator).tolist()
        pad = [_PAD_ID] * (width - length)
        rows.append(pad + real if side == "left" else real + pad)
        mask.append(([0] * len(pad) + [1] * length) if side == "left" else ([1] * length + [0] * len(pad)))
    device = ids.device
    kwargs: dict[str, Any] = {"input_ids": torch.tensor(rows, device=device), **extra}
    if side != "none":
        attention = torch.tensor(mask, device=device)
        kwargs["attention_mask"] = attention
        if side == "left" and takes_positions:
            kwargs["position_ids"] = (attention.cumsum(-1) - 1).clamp(min=0)
    offset = width - tokens if side == "left" else 0
    return kwargs, size, slot, offset, tokens, width


def _recorded(model: nn.Module, modules: ModuleSpec, run: Callable[[], Any]) -> Recording:
    with torch.no_grad(), record(model, modules, mode="tensors", device=model_device(model)) as rec:
        run()
    return rec


def _recorded_slice(model: nn.Module, modules: ModuleSpec, kwargs: dict[str, Any], size: int, slot: int,
                    offset: int, tokens: int, width: int) -> Recording:
    full = _recorded(model, modules, lambda: model(**kwargs))
    calls = []
    for call in full.calls:
        leaves = {leaf: part for leaf, t in call.tensors.items()
                  if (part := _row_of(t, size, slot, offset, tokens, width)) is not None}
        calls.append(Call(call.module, call.index, call.order, leaves, dict(call.orig_dtypes)))
    return Recording("tensors", calls, dict(full.metadata))


def _row_of(t: Any, size: int, slot: int, offset: int, tokens: int, width: int) -> torch.Tensor | None:
    """The input's own row and positions of a batched output ``[size, ..., width, ...]``; None if it has none."""
    if not isinstance(t, torch.Tensor) or t.ndim < 2 or t.shape[0] != size:
        return None
    for dim in range(1, t.ndim):
        if t.shape[dim] == width:
            return t.narrow(0, slot, 1).narrow(dim, offset, tokens)
    return None


def _toggled_tf32(run: Callable[[], Recording]) -> Recording:
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not before
    try:
        return run()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _toggled_deterministic(run: Callable[[], Recording]) -> Recording:
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(not before, warn_only=True)
    try:
        return run()
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _one_prompt(input_ids: torch.Tensor | Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0 or ids.dtype not in (torch.int64, torch.int32):
        raise ParityKitError(f"input_ids has shape {tuple(ids.shape)} and dtype {ids.dtype}; pass one prompt of "
                             "token ids, shape [1, T] with T >= 1 (the execution floor batches it itself)")
    return ids.to(device)


def _forward_parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()

