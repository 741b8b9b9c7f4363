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

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from .._util.calling import call_model, check_token_ids, prepare_inputs
from .._util.trees import leaves, map_tensors
from ..capture import ModuleSpec, record, select_modules
from ..comparison.floor import rounding_floor
from ..comparison.mapping import ModuleMapping
from ..comparison.metrics import ErrorMetric, error_metric, verdict
from ..dtypes import dtype_name
from ..errors import ParityKitError
from ..recording import Call, Recording


def local_vs_propagated(
    reference: nn.Module | Recording,
    candidate_model: nn.Module,
    inputs: Any,
    *,
    modules: ModuleSpec = "*",
    mapping: Any = None,
    metric: ErrorMetric = "rel_rms",
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
    (e.g. :func:`parity_kit.run_in_dtype`) stay active. A module that mutates state passed to
    it (a KV cache) would see it mutated twice: run with caching off.

    One row per (module, call, floating output leaf), in the candidate's completion order. Columns:
    ``order, module, cand_module, call, tensor, shape, ref_dtype, cand_dtype``, ``input_<metric>``
    (of the module's first input: the error it inherited), ``local_<metric>`` (its output on the
    reference inputs), ``free_<metric>`` (its output in the free run), ``floor`` (one rounding, by the rule of
    :mod:`parity_kit.comparison.floor`: the wider of the two outputs rounded to the narrower dtype; the
    calibrated floors of :func:`parity_kit.calibrate_floor` are what :func:`parity_kit.compare_models` judges
    by), ``local_verdict``, ``free_verdict``,
    ``free_over_local`` (NaN when both are 0), ``inputs_from_reference`` ("replaced/total" tensor
    leaves), ``status`` ("ok" | "missing in candidate" | "inputs not replayable": a floating input of the
    call could not be taken from the reference, so the local error is NaN). Reference input leaves are matched by
    name and, between an implementation that passes an argument by position and one that names it, through
    the candidate forward's parameter order (when the shapes agree). With the candidate being the same model in
    the same dtype, the local error is exactly 0.

    >>> import copy, torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> ref = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).eval()
    >>> table = local_vs_propagated(ref, copy.deepcopy(ref), torch.randn(2, 4))
    >>> table["local_rel_rms"].tolist()
    [0.0, 0.0]
    """
    metric_name, metric_fn = error_metric(metric)
    if not isinstance(candidate_model, nn.Module):
        raise ParityKitError(f"candidate_model must be a torch.nn.Module, got {type(candidate_model).__name__}")
    check_token_ids([m for m in (reference, candidate_model) if isinstance(m, nn.Module)], inputs)
    rec = _reference_recording(reference, inputs, modules, memory_budget)
    plan = _replay_plan(rec, _selected_reference_names(rec, reference, modules), mapping, candidate_model)
    replayer = _Replayer(rec, plan, metric_name, metric_fn, floor_tolerance)
    with replayer.hooked(candidate_model), torch.no_grad():
        call_model(candidate_model, prepare_inputs(candidate_model, inputs))
    return replayer.table()


def _reference_recording(reference: nn.Module | Recording, inputs: Any, modules: ModuleSpec,
                         memory_budget: int | str | None) -> Recording:
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
        call_model(reference, prepare_inputs(reference, inputs))
    return rec


def _selected_reference_names(rec: Recording, reference: nn.Module | Recording, modules: ModuleSpec) -> list[str]:
    if isinstance(reference, nn.Module):
        return list(rec.names)
    # A recording has no module tree; match the pattern against its names through a stand-in tree.
    stand_in = nn.Module()
    for name in rec.names:
        node = stand_in
        for part in name.split("."):
            if part not in node._modules:
                node._modules[part] = nn.Module()
            node = node._modules[part]
    chosen = {n for n, _ in select_modules(stand_in, modules)}
    return [n for n in rec.names if n in chosen]


_PRIMARY_ALIAS = {"output": "output.0", "output.0": "output"}


def _parameter_names(module: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):  # a forward without a readable signature
        return []


def _kind(t: torch.Tensor) -> str:
    """"floating", "bool" or "integer": tensors of one kind encode a value alike, so one can be cast to the other."""
    return "floating" if t.is_floating_point() else ("bool" if t.dtype == torch.bool else "integer")


def _other_spelling(leaf: str, parameters: list[str]) -> str | None:
    """``input.0.x`` ↔ ``input.<name of parameter 0>.x``, by the candidate forward's parameter order.

    >>> _other_spelling("input.hidden_states", ["hidden_states", "mask"]), _other_spelling("input.1.0", ["h", "pos"])
    ('input.0', 'input.pos.0')
    """
    _, head, *rest = leaf.split(".")
    if head.isdigit():
        index = int(head)
        name = parameters[index] if index < len(parameters) else None
    else:
        name = str(parameters.index(head)) if head in parameters else None
    return None if name is None else ".".join(["input", name, *rest])

#: candidate module name -> the reference modules replayed on it, each with its output transform (or None)
ReplayPlan = dict[str, list[tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]]]


def _replay_plan(rec: Recording, ref_names: list[str], mapping: Any, candidate_model: nn.Module) -> ReplayPlan:
    coerced = ModuleMapping.coerce(mapping)
    cand_modules = dict(candidate_model.named_modules())
    plan: ReplayPlan = {}
    unmapped = []
    for ref_name in ref_names:
        for t in coerced.targets(ref_name):
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
    return plan


@dataclass
class _Replayed:
    """One replay of a candidate module on a reference call's inputs."""

    output: Any
    input_error: float
    replaced: str  # "replaced/total" tensor leaves of the inputs
    from_reference: bool = True  # every floating input (and at least one input) came from the reference


class _Replayer:
    """The forward hooks of one :func:`local_vs_propagated` pass and the rows they produce."""

    def __init__(self, rec: Recording, plan: ReplayPlan, metric_name: str,
                 metric_fn: Callable[[torch.Tensor, torch.Tensor], float], tolerance: float) -> None:
        self.rec, self.plan, self.tolerance = rec, plan, tolerance
        self.metric_name, self.metric_fn = metric_name, metric_fn
        self.rows: list[dict[str, Any]] = []
        self.counts: dict[str, int] = {}
        self.replaying = False

    @contextlib.contextmanager
    def hooked(self, model: nn.Module) -> Iterator[None]:
        modules = dict(model.named_modules())
        handles = []
        try:
            for cand_name in self.plan:
                module = modules[cand_name]
                handles.append(module.register_forward_hook(self._hook_for(cand_name, module), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook_for(self, cand_name: str, module: nn.Module) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.replaying:
                return
            index = self.counts.get(cand_name, 0)
            self.counts[cand_name] = index + 1
            for ref_name, transform in self.plan[cand_name]:
                calls = self.rec[ref_name] if ref_name in self.rec.names else []
                if index < len(calls):  # else the candidate called it more often than the reference did
                    self._compare_call(module, cand_name, ref_name, transform, calls[index], args, kwargs, output)
        return hook

    def _compare_call(self, module: nn.Module, cand_name: str, ref_name: str,
                      transform: Callable[[torch.Tensor], torch.Tensor] | None, ref_call: Call,
                      args: tuple, kwargs: dict, output: Any) -> None:
        replayed = self._replay(module, cand_name, ref_name, ref_call, args, kwargs)
        free_leaves, local_leaves = dict(leaves(output, "output")), dict(leaves(replayed.output, "output"))
        for leaf, ref_t in ref_call.outputs.items():
            if not isinstance(ref_t, torch.Tensor) or not ref_t.is_floating_point():
                continue
            ref_t = transform(ref_t) if transform is not None else ref_t
            # one implementation may return a tensor where the other returns a tuple (output / output.0)
            cand_leaf = leaf if leaf in free_leaves else _PRIMARY_ALIAS.get(leaf, leaf)
            self.rows.append(self._row(ref_name, cand_name, ref_call.index, leaf, ref_t, free_leaves.get(cand_leaf),
                                       local_leaves.get(cand_leaf), replayed.input_error, replayed.replaced,
                                       replayed.from_reference))

    def _replay(self, module: nn.Module, cand_name: str, ref_name: str, ref_call: Call, args: tuple,
                kwargs: dict) -> _Replayed:
        """Run ``module`` again on ``ref_call``'s inputs: each recorded tensor leaf, cloned and cast to the dtype
        of the live leaf it replaces; leaves the reference lacks (and non-tensor arguments) are the live ones."""
        ref_inputs = ref_call.inputs
        counted = [0, 0, 0]  # leaves replaced, leaves in all, floating leaves left live
        parameters = _parameter_names(module)

        def from_reference(leaf: str, live: torch.Tensor) -> torch.Tensor:
            counted[1] += 1
            ref_t = ref_inputs.get(leaf)
            if not isinstance(ref_t, torch.Tensor):
                # the other implementation may pass this argument by position where this one names it (or
                # the reverse): the same parameter under the other spelling, when its shape agrees
                other = ref_inputs.get(_other_spelling(leaf, parameters))
                if not isinstance(other, torch.Tensor) or other.shape != live.shape:
                    counted[2] += int(live.is_floating_point())
                    return live.clone()
                ref_t = other
            if _kind(ref_t) != _kind(live):
                # the same argument in another encoding (a boolean mask where the other passes an additive one):
                # a cast would change its meaning (True -> 1.0 is no -inf). It comes from the token ids, not from
                # the activations, so the live one carries no inherited error: keep it
                return live.clone()
            if ref_t.shape != live.shape:
                raise ParityKitError(
                    f"cannot replay {cand_name!r}: reference input {leaf!r} of {ref_name!r} has shape "
                    f"{tuple(ref_t.shape)}, the candidate's has {tuple(live.shape)}; map modules whose "
                    "inputs have one shape"
                )
            counted[0] += 1
            dtype = live.dtype if live.is_floating_point() else ref_t.dtype
            return ref_t.to(device=live.device, dtype=dtype, copy=True)

        replay_args, replay_kwargs = map_tensors(args, from_reference, "input"), map_tensors(kwargs, from_reference, "input")
        self.replaying = True
        try:
            local_out = module(*replay_args, **replay_kwargs)
        finally:
            self.replaying = False
        live_in = next((t for _, t in leaves((args, kwargs), "x")), None)
        ref_in = next(iter(ref_inputs.values()), None)
        comparable = (isinstance(ref_in, torch.Tensor) and live_in is not None and live_in.is_floating_point()
                      and ref_in.shape == live_in.shape)
        input_error = float(self.metric_fn(ref_in, live_in)) if comparable else math.nan
        # a floating input left live carries the inherited error into the replay: no own error then
        return _Replayed(local_out, input_error, f"{counted[0]}/{counted[1]}", counted[0] > 0 and counted[2] == 0)

    def _row(self, ref_name: str, cand_name: str, index: int, leaf: str, ref_t: torch.Tensor,
             free_t: torch.Tensor | None, local_t: torch.Tensor | None, input_error: float,
             replaced: str, from_reference: bool = True) -> dict[str, Any]:
        ok = free_t is not None and local_t is not None
        cand_dtype = free_t.dtype if free_t is not None else None
        floor = (rounding_floor(ref_t, cand_dtype, ref_t.dtype, self.metric_fn, cand=free_t)
                 if ok and cand_dtype.is_floating_point else math.nan)
        free = float(self.metric_fn(ref_t, free_t)) if ok else math.nan
        replayed = ok and from_reference
        local = float(self.metric_fn(ref_t, local_t)) if replayed else math.nan
        name = self.metric_name
        return {
            "order": len(self.rows), "module": ref_name, "cand_module": cand_name, "call": index, "tensor": leaf,
            "shape": tuple(ref_t.shape), "ref_dtype": dtype_name(ref_t.dtype),
            "cand_dtype": dtype_name(cand_dtype) if cand_dtype is not None else None,
            f"input_{name}": input_error, f"local_{name}": local, f"free_{name}": free,
            "floor": floor,
            "local_verdict": verdict(local, floor, self.tolerance) if replayed else "",
            "free_verdict": verdict(free, floor, self.tolerance) if ok else "",
            "free_over_local": free / local if local > 0 else (math.inf if free > 0 else math.nan),
            "inputs_from_reference": replaced,
            "status": "ok" if replayed else ("inputs not replayable" if ok else "missing in candidate"),
        }

    def table(self) -> pd.DataFrame:
        """The rows, plus a "missing in candidate" row for every reference call the candidate never made."""
        seen = {(r["module"], r["call"]) for r in self.rows}
        for cand_name, pairs in self.plan.items():
            for ref_name, _ in pairs:
                for call in self.rec[ref_name]:
                    if (ref_name, call.index) not in seen:
                        self.rows.append(self._row(ref_name, cand_name, call.index, "output", call.output, None,
                                                   None, math.nan, "0/0"))
        return pd.DataFrame(self.rows)
