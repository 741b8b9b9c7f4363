"""Local vs propagated error: is a module's error its own, or did it inherit it?

In a low-precision run every module's output differs from the reference for two reasons: the module
computes imprecisely (*local* error) and its inputs already differ (*propagated* error). Comparing
free-run outputs mixes both, so the first large difference often sits downstream of the culprit.

:func:`local_vs_propagated` separates them in one pass of the candidate model: a forward hook on
each chosen module, after the module ran normally (the free run), calls it a second time on the
reference run's inputs cast to the candidate's dtypes, and compares both outputs to the reference
output. A module whose local error is near the rounding floor but whose free-run error is large is
only passing on what it received; a module with a large local error is a culprit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..dtypes import dtype_name
from ..errors import ParityKitError
from ..recording.model import Recording

ModuleSpec = Any  # whatever parity_kit.capture.recorder.select_modules accepts


def _flatten(obj: Any, prefix: str) -> dict[str, torch.Tensor]:
    """Tensor leaves named as a recording names them ("input.0", "input.hidden_states", "output.1")."""
    found: dict[str, torch.Tensor] = {}

    def visit(value: Any, name: str) -> None:
        if isinstance(value, torch.Tensor):
            found[name] = value
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(item, f"{name}.{key}")
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                visit(item, f"{name}.{i}")

    visit(obj, prefix)
    return found


def _substitute(obj: Any, prefix: str, source: Callable[[str, torch.Tensor], torch.Tensor]) -> Any:
    """Rebuild ``obj`` with every tensor leaf replaced by ``source(leaf name, live tensor)``."""
    if isinstance(obj, torch.Tensor):
        return source(prefix, obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_substitute(v, f"{prefix}.{i}", source) for i, v in enumerate(obj)))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_substitute(v, f"{prefix}.{i}", source) for i, v in enumerate(obj))
    if isinstance(obj, dict):
        mapped = {k: _substitute(v, f"{prefix}.{k}", source) for k, v in obj.items()}
        if hasattr(obj, "to_tuple"):  # transformers ModelOutput
            return type(obj)(**mapped)
        return mapped
    return obj


def _reference_recording(reference: nn.Module | Recording, inputs: Any, modules: ModuleSpec,
                         memory_budget: int | str | None) -> Recording:
    from ..capture.recorder import record
    from .precision import _call, _prepare_inputs

    if isinstance(reference, Recording):
        if reference.mode != "tensors" or not any(call.inputs for call in reference.calls):
            raise ParityKitError(
                "the reference recording holds no input tensors; record it with "
                "pk.record(model, modules=..., mode='tensors', inputs=True)"
            )
        return reference
    if not isinstance(reference, nn.Module):
        raise ParityKitError(
            f"reference must be a model or a Recording, not {type(reference).__name__}"
        )
    with torch.no_grad(), record(reference, modules, mode="tensors", inputs=True, memory_budget=memory_budget) as rec:
        _call(reference, _prepare_inputs(reference, inputs))
    return rec


def _selected_reference_names(rec: Recording, reference: nn.Module | Recording, modules: ModuleSpec) -> list[str]:
    if isinstance(reference, nn.Module):
        return list(rec.names)
    from ..capture.recorder import select_modules

    # A recording has no module tree; match the pattern against its names through a stand-in tree.
    stand_in = nn.Module()
    for name in rec.names:
        _attach(stand_in, name)
    chosen = {n for n, _ in select_modules(stand_in, modules)}
    return [n for n in rec.names if n in chosen]


def _attach(root: nn.Module, name: str) -> None:
    node = root
    for part in name.split("."):
        if part not in node._modules:
            node._modules[part] = nn.Module()
        node = node._modules[part]


def local_vs_propagated(
    reference: nn.Module | Recording,
    candidate_model: nn.Module,
    inputs: Any,
    *,
    modules: ModuleSpec = "*",
    mapping: Any = None,
    metric: str | Callable[[torch.Tensor, torch.Tensor], float] = "rel_rms",
    floor_tolerance: float = 2.0,
    memory_budget: int | str | None = "4GiB",
) -> pd.DataFrame:
    """Each chosen module's own (local) error next to the error it shows in the free run.

    ``reference`` is the reference model (run here on ``inputs``, capturing the chosen modules with
    their inputs) or a :class:`Recording` made with ``mode="tensors", inputs=True``. ``modules``
    selects reference module names (as :func:`parity_kit.capture.recorder.select_modules`); ``mapping`` maps
    them to candidate names (None = same names, a dict, a callable, or a ModuleMapping, whose output
    transforms are applied to the reference outputs). Floating ``inputs`` are cast to each model's dtype.
    ``memory_budget`` caps the reference tensors kept in memory (as in :func:`parity_kit.record`).

    One forward pass of ``candidate_model``: a forward hook on each mapped candidate module calls it a
    second time on the reference call's inputs — every tensor leaf the reference recorded, cloned and
    cast to the dtype of the live leaf it replaces; leaves the reference lacks (and non-tensor
    arguments) are the live ones — with this function's hooks switched off for that call. Other hooks
    (e.g. :func:`parity_kit.analyses.precision.run_in_dtype`) stay active. A module that mutates state passed to
    it (a KV cache) would see it mutated twice: run with caching off.

    One row per (module, call, floating output leaf), in the candidate's completion order. Columns:
    ``order, module, cand_module, call, tensor, shape, ref_dtype, cand_dtype``, ``input_<metric>``
    (of the module's first input: the error it inherited), ``local_<metric>`` (its output on the
    reference inputs), ``free_<metric>`` (its output in the free run), ``floor`` (the metric of the
    reference output rounded to the candidate's output dtype), ``local_verdict``, ``free_verdict``,
    ``free_over_local`` (NaN when both are 0), ``inputs_from_reference`` ("replaced/total" tensor
    leaves), ``status`` ("ok" | "missing in candidate"). With the candidate being the same model in the
    same dtype, the local error is exactly 0.

    >>> import copy, torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> ref = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).eval()
    >>> table = local_vs_propagated(ref, copy.deepcopy(ref), torch.randn(2, 4))
    >>> table["local_rel_rms"].tolist()
    [0.0, 0.0]
    """
    from ..comparison import metrics
    from ..comparison.mapping import ModuleMapping
    from .precision import _call, _metric_fn, _prepare_inputs

    metric_name, metric_fn = _metric_fn(metric)
    rec = _reference_recording(reference, inputs, modules, memory_budget)
    ref_names = _selected_reference_names(rec, reference, modules)
    coerced = ModuleMapping.coerce(mapping)
    cand_modules = dict(candidate_model.named_modules())
    # candidate name -> list of (reference name, output transform)
    plan: dict[str, list[tuple[str, Any]]] = {}
    unmapped = []
    for ref_name in ref_names:
        targets = coerced.targets(ref_name)
        for t in targets:
            if t.cand in cand_modules:
                plan.setdefault(t.cand, []).append((ref_name, t.transform))
            else:
                unmapped.append(f"{ref_name} -> {t.cand}")
    if not plan:
        sample = ", ".join(unmapped[:3]) or ", ".join(ref_names[:3])
        raise ParityKitError(
            f"no chosen reference module has a counterpart in {type(candidate_model).__name__} "
            f"(e.g. {sample}); pass mapping= from reference to candidate names"
        )

    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    replaying = [False]

    def compare_row(ref_name: str, cand_name: str, index: int, leaf: str, ref_t: torch.Tensor,
                    free_t: torch.Tensor | None, local_t: torch.Tensor | None, input_error: float,
                    replaced: str, order: int) -> dict[str, Any]:
        ok = free_t is not None and local_t is not None
        cand_dtype = free_t.dtype if free_t is not None else None
        floor = float(metric_fn(ref_t, ref_t.to(cand_dtype))) if ok and cand_dtype.is_floating_point else math.nan
        local = float(metric_fn(ref_t, local_t)) if ok else math.nan
        free = float(metric_fn(ref_t, free_t)) if ok else math.nan
        ratio = free / local if local > 0 else (math.inf if free > 0 else math.nan)
        return {
            "order": order, "module": ref_name, "cand_module": cand_name, "call": index, "tensor": leaf,
            "shape": tuple(ref_t.shape), "ref_dtype": dtype_name(ref_t.dtype),
            "cand_dtype": dtype_name(cand_dtype) if cand_dtype is not None else None,
            f"input_{metric_name}": input_error, f"local_{metric_name}": local, f"free_{metric_name}": free,
            "floor": floor,
            "local_verdict": metrics.verdict(local, floor, floor_tolerance) if ok else "",
            "free_verdict": metrics.verdict(free, floor, floor_tolerance) if ok else "",
            "free_over_local": ratio, "inputs_from_reference": replaced,
            "status": "ok" if ok else "missing in candidate",
        }

    def hook_for(cand_name: str, module: nn.Module) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if replaying[0]:
                return
            index = counts.get(cand_name, 0)
            counts[cand_name] = index + 1
            for ref_name, transform in plan[cand_name]:
                calls = rec[ref_name] if ref_name in rec.names else []
                if index >= len(calls):
                    continue  # the candidate called it more often than the reference; nothing to replay
                ref_call = calls[index]
                ref_inputs = ref_call.inputs
                replaced = [0, 0]

                def from_reference(leaf: str, live: torch.Tensor) -> torch.Tensor:
                    replaced[1] += 1
                    ref_t = ref_inputs.get(leaf)
                    if not isinstance(ref_t, torch.Tensor):
                        return live.clone()
                    if ref_t.shape != live.shape:
                        raise ParityKitError(
                            f"cannot replay {cand_name!r}: reference input {leaf!r} of {ref_name!r} has shape "
                            f"{tuple(ref_t.shape)}, the candidate's has {tuple(live.shape)}; map modules whose "
                            "inputs have one shape"
                        )
                    replaced[0] += 1
                    dtype = live.dtype if live.is_floating_point() else ref_t.dtype
                    return ref_t.to(device=live.device, dtype=dtype, copy=True)

                replay_args = _substitute(args, "input", from_reference)
                replay_kwargs = _substitute(kwargs, "input", from_reference)
                replaying[0] = True
                try:
                    local_out = module(*replay_args, **replay_kwargs)
                finally:
                    replaying[0] = False
                live_in = next(iter(_flatten((args, kwargs), "x").values()), None)
                ref_in = next(iter(ref_inputs.values()), None)
                input_error = (
                    float(metric_fn(ref_in, live_in))
                    if isinstance(ref_in, torch.Tensor) and live_in is not None and live_in.is_floating_point()
                    and ref_in.shape == live_in.shape else math.nan
                )
                free_leaves, local_leaves = _flatten(output, "output"), _flatten(local_out, "output")
                for leaf, ref_t in ref_call.outputs.items():
                    if not isinstance(ref_t, torch.Tensor) or not ref_t.is_floating_point():
                        continue
                    ref_t = transform(ref_t) if transform is not None else ref_t
                    rows.append(compare_row(
                        ref_name, cand_name, index, leaf, ref_t, free_leaves.get(leaf), local_leaves.get(leaf),
                        input_error, f"{replaced[0]}/{replaced[1]}", len(rows),
                    ))
        return hook

    handles = []
    try:
        for cand_name in plan:
            module = cand_modules[cand_name]
            handles.append(module.register_forward_hook(hook_for(cand_name, module), with_kwargs=True))
        with torch.no_grad():
            _call(candidate_model, _prepare_inputs(candidate_model, inputs))
    finally:
        for handle in handles:
            handle.remove()
    seen = {(r["module"], r["call"]) for r in rows}
    for cand_name, pairs in plan.items():
        for ref_name, _ in pairs:
            for call in rec[ref_name]:
                if (ref_name, call.index) not in seen:
                    out = call.output
                    rows.append(compare_row(ref_name, cand_name, call.index, "output", out, None, None,
                                            math.nan, "0/0", len(rows)))
    return pd.DataFrame(rows)
