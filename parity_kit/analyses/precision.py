"""Run chosen modules in another dtype; find which modules need higher precision.

Three tools, from the smallest to the largest:

- :func:`run_in_dtype` — a context manager that makes chosen modules compute in another dtype
  (inputs cast in, outputs cast back, weights swapped for temporary copies), restoring everything
  bit-exactly on exit;
- :func:`sweep_by_class` — one forward pass per module class with only that class in high precision:
  which *kind* of module causes the output error;
- :func:`bisect_precision` — the smallest set of module *instances* to keep in high precision so the
  output error falls below a target, in O(k log N) forward passes, with the error/cost curve.

Mixed precision here has module granularity: a module kept in fp32 receives its inputs cast to fp32
and hands its outputs back in the surrounding dtype. Two neighbouring fp32 modules therefore still
exchange a rounded tensor; to keep a whole island in fp32, select the module that contains it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..dtypes import DtypeLike, dtype_name, parse_dtype
from ..errors import ParityKitError

MetricLike = str | Callable[[torch.Tensor, torch.Tensor], float]
ModulesLike = str | Sequence[str] | type | tuple[type, ...]
MasterWeights = Mapping[str, torch.Tensor] | nn.Module | None

# Leaf modules that compute nothing, so keeping them in fp32 can only add a cast.
_NO_OP_CLASSES: tuple[type, ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.Flatten, nn.Unflatten,
)
# Error metrics (smaller is better) that the search can minimise.
_ERROR_METRICS = ("rel_rms", "max_abs", "mean_abs")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# run_in_dtype
# ----------------------------------------------------------------------------------------------

def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside tuples, lists and dicts (ModelOutput included)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, dict):
        mapped = {k: _map_tensors(v, fn) for k, v in obj.items()}
        if hasattr(obj, "to_tuple"):  # transformers ModelOutput: keyword constructor only
            return type(obj)(**mapped)
        try:
            return type(obj)(mapped)
        except TypeError:  # a dict subclass with its own constructor: a plain dict keeps the data
            return mapped
    return obj


def _cast_floating(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t
    return cast


def _first_floating_dtype(obj: Any) -> torch.dtype | None:
    found: list[torch.dtype] = []

    def visit(t: torch.Tensor) -> torch.Tensor:
        if not found and t.is_floating_point():
            found.append(t.dtype)
        return t

    _map_tensors(obj, visit)
    return found[0] if found else None


def _outermost(selected: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Drop every selected module that lies inside another selected one (the outermost wins)."""
    names = {name for name, _ in selected}

    def has_selected_ancestor(name: str) -> bool:
        if "" in names and name != "":
            return True
        parts = name.split(".")
        return any(".".join(parts[:i]) in names for i in range(1, len(parts)))

    return [(name, mod) for name, mod in selected if not has_selected_ancestor(name)]


def _master_lookup(master_weights: MasterWeights) -> dict[str, torch.Tensor] | None:
    if master_weights is None:
        return None
    if isinstance(master_weights, nn.Module):
        table = dict(master_weights.named_parameters(remove_duplicate=False))
        table.update(master_weights.named_buffers(remove_duplicate=False))
        return {k: v.detach() for k, v in table.items()}
    if isinstance(master_weights, Mapping):
        return {k: v.detach() for k, v in master_weights.items() if isinstance(v, torch.Tensor)}
    raise ParityKitError(
        f"master_weights must be a state dict, an nn.Module or None, not {type(master_weights).__name__}; "
        "pass the fp32 reference model (or its state_dict()) to supply exact high-precision weights"
    )


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


@contextlib.contextmanager
def _run_modules_in_dtype(
    roots: Sequence[tuple[str, nn.Module]], dtype: torch.dtype, masters: dict[str, torch.Tensor] | None,
) -> Iterator[list[str]]:
    """:func:`run_in_dtype` on already selected, non-nested modules (no pattern matching per call)."""
    swapped: list[tuple[dict[str, Any], str, Any]] = []  # (the module's _parameters/_buffers, key, original)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        seen: set[int] = set()
        for root_name, root in roots:
            own_dtype: torch.dtype | None = None
            for sub_name, sub in root.named_modules():
                if id(sub) in seen:
                    continue
                seen.add(id(sub))
                for store in (sub._parameters, sub._buffers):
                    for key, original in list(store.items()):
                        if original is None or not original.is_floating_point():
                            continue
                        own_dtype = own_dtype or original.dtype
                        full = _join(root_name, sub_name, key)
                        source = original
                        if masters is not None and full in masters:
                            source = masters[full]
                            if source.shape != original.shape:
                                raise ParityKitError(
                                    f"master weight {full!r} has shape {tuple(source.shape)} but the model's has "
                                    f"{tuple(original.shape)}; pass master weights of the same architecture"
                                )
                        elif masters is not None and store is sub._parameters:
                            raise ParityKitError(
                                f"master_weights has no entry for parameter {full!r}; pass a model or state dict "
                                "with the same parameter names (or master_weights=None to up-cast the model's "
                                "own weights)"
                            )
                        copy = source.detach().to(device=original.device, dtype=dtype, copy=True)
                        if isinstance(original, nn.Parameter):
                            copy = nn.Parameter(copy, requires_grad=original.requires_grad)
                        swapped.append((store, key, original))
                        store[key] = copy
            handles.extend(_cast_hooks(root, dtype, own_dtype))
        yield [name for name, _ in roots]
    finally:
        for handle in reversed(handles):
            handle.remove()
        for store, key, original in reversed(swapped):
            store[key] = original


def _cast_hooks(
    module: nn.Module, dtype: torch.dtype, own_dtype: torch.dtype | None,
) -> list[torch.utils.hooks.RemovableHandle]:
    # One stack entry per call in flight, so recursive or re-entrant calls cast back correctly.
    surrounding: list[torch.dtype | None] = []

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # The dtype the rest of the model works in: the floating inputs' dtype, or, for a module fed
        # only integers (an embedding), the dtype its weights had.
        surrounding.append(_first_floating_dtype((args, kwargs)) or own_dtype)
        cast = _cast_floating(dtype)
        return _map_tensors(args, cast), _map_tensors(kwargs, cast)

    def post_hook(_mod: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> Any:
        back = surrounding.pop() if surrounding else None
        return output if back is None else _map_tensors(output, _cast_floating(back))

    return [
        module.register_forward_pre_hook(pre_hook, prepend=True, with_kwargs=True),
        module.register_forward_hook(post_hook, prepend=True, with_kwargs=True),
    ]


@contextlib.contextmanager
def run_in_dtype(
    model: nn.Module, modules: ModulesLike, dtype: DtypeLike, *, master_weights: MasterWeights = None,
) -> Iterator[list[str]]:
    """Make the chosen modules compute in ``dtype`` (higher or lower than the model's) inside the block.

    For each selected module: floating inputs (positional and keyword) are cast to ``dtype``; its
    parameters and floating buffers (its children's too) are replaced by temporary copies in
    ``dtype``; its floating outputs are cast back to the surrounding dtype (that of its first floating
    input, or of its own weights when it receives only integers). On exit — also after an exception —
    the original parameter and buffer objects are put back, so values, dtypes, ``requires_grad`` and
    identities are restored bit-exactly, and the hooks added here are removed.

    Up-casting a bf16 weight to fp32 does not restore the bits the bf16 cast lost: it only makes the
    *arithmetic* fp32. For a real fix, pass ``master_weights`` (the fp32 reference model, or its
    ``state_dict()``, with the same parameter names); the copies are then made from those. Buffers
    missing from a ``master_weights`` dict (non-persistent ones) are taken from the model itself.

    ``modules`` takes what :func:`parity_kit.capture.recorder.select_modules` takes (names, globs, ``re:``
    regexes, classes). A module selected together with one of its ancestors is handled once, by the
    ancestor (the outermost wins). Neighbouring selected modules still hand each other tensors in the
    surrounding dtype; select their common parent to keep a whole block in ``dtype``. Outputs of a
    selected module are all cast back, including any recurrent state it returns.

    Yields the names of the modules that run in ``dtype`` (the outermost of the selection).

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    >>> with run_in_dtype(net, nn.LayerNorm, "fp32") as names:
    ...     y = net(torch.randn(2, 4, dtype=torch.bfloat16))
    ...     inside = net[1].weight.dtype
    >>> names, inside, net[1].weight.dtype, y.dtype
    (['1'], torch.float32, torch.bfloat16, torch.bfloat16)
    """
    from ..capture.recorder import select_modules

    target = parse_dtype(dtype)
    roots = _outermost(select_modules(model, modules))
    with _run_modules_in_dtype(roots, target, _master_lookup(master_weights)) as names:
        yield names


# ----------------------------------------------------------------------------------------------
# shared machinery of the sweep and the bisection
# ----------------------------------------------------------------------------------------------

def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    raise ParityKitError(f"{type(model).__name__} has no floating parameter; pass a model with weights")


def _prepare_inputs(model: nn.Module, inputs: Any) -> Any:
    """Cast floating inputs to the model's dtype so one input set feeds the fp32 and the bf16 model."""
    dtype = _model_dtype(model)
    return _map_tensors(inputs, _cast_floating(dtype))


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _primary_tensor(output: Any, what: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ParityKitError(
        f"cannot find a tensor in the output of {what} ({type(output).__name__}); return a tensor, "
        "a tuple starting with one, or an object with .logits"
    )


def _forward_target(model: nn.Module, inputs: Any, target: str) -> torch.Tensor:
    """Run ``model`` once on prepared ``inputs``; return "logits" (the model output) or a module's output."""
    with torch.no_grad():
        if target == "logits":
            return _primary_tensor(_call(model, inputs), type(model).__name__).detach()
        module = dict(model.named_modules()).get(target)
        if module is None:
            raise ParityKitError(f"target {target!r} is neither 'logits' nor a module name of {type(model).__name__}")
        seen: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _a, out: seen.append(_primary_tensor(out, target).detach()))
        try:
            _call(model, inputs)
        finally:
            handle.remove()
        if not seen:
            raise ParityKitError(f"target module {target!r} was not called in the forward pass; pick another target")
        return seen[-1]


def _metric_fn(metric: MetricLike) -> tuple[str, Callable[[torch.Tensor, torch.Tensor], float]]:
    if callable(metric):
        return getattr(metric, "__name__", "metric"), metric
    if metric not in _ERROR_METRICS:
        raise ParityKitError(
            f"metric {metric!r} cannot be minimised; use one of {list(_ERROR_METRICS)} or a callable "
            "(ref, x) -> float where smaller is better"
        )
    from ..comparison import metrics

    return metric, getattr(metrics, metric)


def _reference_output(reference: torch.Tensor | nn.Module, inputs: Any, target: str) -> torch.Tensor:
    if isinstance(reference, nn.Module):
        return _forward_target(reference, _prepare_inputs(reference, inputs), target)
    if isinstance(reference, torch.Tensor):
        return reference.detach()
    raise ParityKitError(
        f"reference must be a tensor of {target} or a model, not {type(reference).__name__}"
    )


def _check_low_precision(model: nn.Module, high: torch.dtype, task: str) -> torch.dtype:
    low = _model_dtype(model)
    if not any(p.is_floating_point() and p.dtype.itemsize < high.itemsize for p in model.parameters()):
        raise ParityKitError(
            f"nothing to {task}: every parameter is already {dtype_name(low)} (not lower than "
            f"{dtype_name(high)}); cast the model to bf16/fp16 first"
        )
    return low


def _candidate_modules(model: nn.Module, candidates: ModulesLike) -> list[tuple[str, nn.Module]]:
    """The finest selected modules: a selected module that contains other selected ones is dropped."""
    from ..capture.recorder import select_modules

    selected = select_modules(model, candidates)
    names = {n for n, _ in selected}
    finest = [
        (n, m) for n, m in selected
        if not isinstance(m, _NO_OP_CLASSES)
        and not any(other != n and (n == "" or other.startswith(n + ".")) for other in names)
    ]
    if not finest:
        raise ParityKitError(
            f"candidates {candidates!r} selected only modules that compute nothing ({len(selected)} of them); "
            "pick modules with weights or operations"
        )
    return finest


def _param_count(modules: Sequence[nn.Module]) -> int:
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def _floor_columns(value: float, floor: float, tolerance: float) -> dict[str, Any]:
    from ..comparison import metrics

    ratio = value / floor if floor > 0 else (math.inf if value > 0 else 1.0)
    return {"floor": floor, "floor_ratio": ratio, "verdict": metrics.verdict(value, floor, tolerance)}


class _Evaluator:
    """Error of the low-precision model's target with a given set of modules in high precision."""

    def __init__(self, model: nn.Module, reference: torch.Tensor, inputs: Any, target: str, high: torch.dtype,
                 masters: dict[str, torch.Tensor] | None, metric: Callable[[torch.Tensor, torch.Tensor], float],
                 bar: Any) -> None:
        # Prepared once: inside run_in_dtype the model's first weight may already be the fp32 copy.
        self.model, self.reference, self.target = model, reference, target
        self.inputs = _prepare_inputs(model, inputs)
        self.high, self.masters, self.metric, self.bar = high, masters, metric, bar
        self.passes = 0
        self.cache: dict[frozenset[str], float] = {}

    def __call__(self, chosen: Sequence[tuple[str, nn.Module]]) -> float:
        key = frozenset(n for n, _ in chosen)
        if key in self.cache:
            return self.cache[key]
        with _run_modules_in_dtype(_outermost(chosen), self.high, self.masters):
            out = _forward_target(self.model, self.inputs, self.target)
        if out.shape != self.reference.shape:
            raise ParityKitError(
                f"the model's {self.target} has shape {tuple(out.shape)} but the reference has "
                f"{tuple(self.reference.shape)}; pass reference outputs for the same inputs"
            )
        self.passes += 1
        if self.bar is not None:
            self.bar.update(1)
        value = float(self.metric(self.reference, out))
        self.cache[key] = value
        return value


# ----------------------------------------------------------------------------------------------
# sweep by class
# ----------------------------------------------------------------------------------------------

def _default_classes(model: nn.Module) -> list[type]:
    """Leaf module classes, in order of first appearance, minus the ones that compute nothing."""
    classes: list[type] = []
    for _, m in model.named_modules():
        if next(m.children(), None) is None and not isinstance(m, _NO_OP_CLASSES) and type(m) not in classes:
            classes.append(type(m))
    return classes


def sweep_by_class(
    model_low: nn.Module,
    reference: torch.Tensor | nn.Module,
    inputs: Any,
    *,
    classes: Sequence[type] | None = None,
    metric: MetricLike = "rel_rms",
    target: str = "logits",
    master_model: MasterWeights = None,
    high_dtype: DtypeLike = "fp32",
    floor_tolerance: float = 2.0,
    progress: bool = True,
) -> pd.DataFrame:
    """Which kind of module causes the output error? Keep one class at a time in high precision.

    One forward pass of ``model_low`` per class, with every instance of that class run in
    ``high_dtype`` (see :func:`run_in_dtype`; ``master_model`` supplies exact fp32 weights), plus
    context rows: nothing in high precision, every listed class at once, and the whole model.
    ``reference`` is the reference output (a tensor, e.g. fp32 or fp64 logits) or a reference model run
    on the same ``inputs`` (an ids tensor, a tuple of args or a dict of kwargs; floating inputs are cast
    to each model's dtype). ``classes=None`` takes every leaf class except no-ops (Dropout, Identity).

    Columns: ``kind`` ("context" | "class"), ``class``, ``n_modules``, ``param_fraction`` (of the
    model's parameters that class holds), ``error`` (``metric`` of the target against the reference),
    ``error_removed_fraction`` ((error with nothing in high precision − error) / the former), and the
    noise-floor columns ``floor`` (the metric of the reference against itself rounded to the model's
    dtype), ``floor_ratio``, ``verdict``. Class rows are sorted by the error they remove.

    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> ref = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4)).eval()
    >>> low = __import__("copy").deepcopy(ref).to(torch.bfloat16)
    >>> table = sweep_by_class(low, ref, torch.randn(3, 8), progress=False)
    >>> sorted(table["class"])[:2]
    ['LayerNorm', 'Linear']
    """
    high = parse_dtype(high_dtype)
    metric_name, metric_fn = _metric_fn(metric)
    low = _check_low_precision(model_low, high, "sweep")
    ref_out = _reference_output(reference, inputs, target)
    floor = float(metric_fn(ref_out, ref_out.to(low)))
    class_list = list(classes) if classes is not None else _default_classes(model_low)
    if not class_list:
        raise ParityKitError("no module class to sweep; pass classes=[nn.Linear, ...]")
    named = list(model_low.named_modules())
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for cls in class_list:
        if not isinstance(cls, type) or not issubclass(cls, nn.Module):
            raise ParityKitError(f"classes must hold nn.Module subclasses, got {cls!r}")
        members = [(n, m) for n, m in named if isinstance(m, cls) and n != ""]
        if not members:
            raise ParityKitError(
                f"class {cls.__name__} has no instance in {type(model_low).__name__}; classes present: "
                f"{sorted({type(m).__name__ for _, m in named})}"
            )
        groups[cls.__name__] = members
    everything = [pair for members in groups.values() for pair in members]
    total_params = _param_count([model_low])
    masters = _master_lookup(master_model)
    with tqdm(total=len(groups) + 3, desc="sweep by class", disable=not progress) as bar:
        evaluate = _Evaluator(model_low, ref_out, inputs, target, high, masters, metric_fn, bar)
        base = evaluate([])
        if base == 0:
            raise ParityKitError(
                f"the {dtype_name(low)} model already matches the reference exactly ({metric_name} = 0); "
                "nothing to sweep"
            )

        def row(kind: str, name: str, members: Sequence[tuple[str, nn.Module]], error: float) -> dict[str, Any]:
            return {
                "kind": kind, "class": name, "n_modules": len(members),
                "param_fraction": _param_count([m for _, m in members]) / total_params if total_params else 0.0,
                "error": error, "error_removed_fraction": (base - error) / base,
                **_floor_columns(error, floor, floor_tolerance),
            }

        rows = [row("context", f"nothing in {dtype_name(high)} (all {dtype_name(low)})", [], base)]
        class_rows = [row("class", name, members, evaluate(members)) for name, members in groups.items()]
        rows.append(row("context", f"all listed classes in {dtype_name(high)}", everything, evaluate(everything)))
        rows.append(row("context", f"whole model in {dtype_name(high)}", [("", model_low)],
                        evaluate([("", model_low)])))
    class_rows.sort(key=lambda r: -r["error_removed_fraction"])
    table = pd.DataFrame(rows + class_rows)
    table.attrs.update(metric=metric_name, low_dtype=dtype_name(low), high_dtype=dtype_name(high),
                       passes=evaluate.passes)
    return table


# ----------------------------------------------------------------------------------------------
# precision bisection
# ----------------------------------------------------------------------------------------------

@dataclass
class BisectionResult:
    """What :func:`bisect_precision` found.

    ``chosen``: the module names to keep in high precision, most important first (importance = how low
    the error gets with that module alone in high precision). ``curve``: one row per step, step 0
    = nothing in high precision, step i = the first i chosen modules, with ``error``,
    ``error_fraction`` (of the all-low error), ``param_fraction``, ``linear_flop_fraction`` (FLOPs of
    the chosen Linear layers over those of all Linear layers, 2·in·out per row they processed; other
    modules count as 0 FLOPs), ``meets_target`` and the noise-floor columns. ``passes``: forward passes
    used; ``pass_bound``: the documented bound 2 + 2k⌈log2 N⌉ + 2k for k chosen among N candidates.
    """

    chosen: list[str]
    passes: int
    pass_bound: int
    n_candidates: int
    error_low: float
    error_all_high: float
    error_chosen: float
    target_error: float
    floor: float
    metric: str
    low_dtype: str
    high_dtype: str
    curve: pd.DataFrame = field(repr=False)

    def summary(self) -> str:
        """One paragraph in words.

        >>> r = BisectionResult(["a"], 5, 6, 4, 0.1, 0.01, 0.02, 0.05, 0.004, "rel_rms", "bf16", "fp32",
        ...                     pd.DataFrame())
        >>> r.summary().split(";")[0]
        'keep 1 of 4 candidate modules in fp32 (a)'
        """
        names = ", ".join(self.chosen) if self.chosen else "none"
        return (
            f"keep {len(self.chosen)} of {self.n_candidates} candidate modules in {self.high_dtype} ({names}); "
            f"{self.metric} {self.error_low:.3g} (all {self.low_dtype}) -> {self.error_chosen:.3g} "
            f"(target {self.target_error:.3g}, all candidates in {self.high_dtype}: {self.error_all_high:.3g}, "
            f"floor {self.floor:.3g}); {self.passes} forward passes (bound {self.pass_bound})"
        )


@contextlib.contextmanager
def _count_linear_rows(model: nn.Module) -> Iterator[dict[int, int]]:
    """Count the rows each Linear layer processes during the block (for the FLOP estimate)."""
    rows: dict[int, int] = {}

    def count(mod: nn.Module, args: tuple, _out: Any) -> None:
        rows[id(mod)] = rows.get(id(mod), 0) + args[0].numel() // mod.in_features

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


def bisect_precision(
    model_low: nn.Module,
    reference: torch.Tensor | nn.Module,
    inputs: Any,
    *,
    candidates: ModulesLike = "*",
    target: float | None = 0.5,
    target_abs: float | None = None,
    target_removed: float | None = None,
    master_model: MasterWeights = None,
    metric: MetricLike = "rel_rms",
    output: str = "logits",
    high_dtype: DtypeLike = "fp32",
    floor_tolerance: float = 2.0,
    progress: bool = True,
) -> BisectionResult:
    """The smallest set of modules to keep in high precision so the output error falls below a target.

    ``candidates`` selects module instances (names, globs, ``re:`` regexes, classes); a selected module
    that contains other selected ones is replaced by them (``"*"`` → every leaf module except no-ops).
    The target error is ``target`` × the error with nothing in high precision; or ``target_abs``, an
    absolute ``metric`` value; or ``target_removed``, the fraction of the *removable* error to remove
    (the error with nothing in high precision minus the error with every candidate in high precision),
    for when module granularity cannot reach a fraction of the total. Precedence: ``target_abs``,
    then ``target_removed``, then ``target``. ``output`` is "logits" or a module name whose output is
    compared; ``reference``, ``inputs`` and ``master_model`` are as in :func:`sweep_by_class`.

    Algorithm (adaptive group testing by removal, robust to interactions): start from the set of all
    N candidates in high precision, which must meet the target (else a ParityKitError states the
    achievable floor). Walk a binary split of the candidates; for each group, one pass tests whether
    the target still holds with that group dropped back to low precision: if it does, the whole group
    is dropped; if not, a single module is kept and a larger group is split in two and each half is
    tried in turn. The kept set always meets the target, and each kept module was needed when it was
    tested. A group is tested only if its parent group could not be dropped, and such a parent always
    contains a kept module, so at most 2k⌈log2 N⌉ groups are tested for k kept modules. The kept
    modules are then ranked by the error with each alone in high precision (k passes) and the
    error/cost curve adds them in that order (k − 1 passes). Because modules interact (fixing one can
    expose or mask another), the curve need not fall monotonically; only its last point is guaranteed
    to meet the target. With the 2 passes for the all-low and
    all-high errors: passes ≤ 2 + 2k⌈log2 N⌉ + 2k. Repeated sets are not re-run.

    >>> import copy, torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> ref = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4)).eval()
    >>> low = copy.deepcopy(ref).to(torch.bfloat16)
    >>> result = bisect_precision(low, ref, torch.randn(16, 8), target=0.9, master_model=ref, progress=False)
    >>> result.passes <= result.pass_bound and result.error_chosen <= result.target_error
    True
    """
    high = parse_dtype(high_dtype)
    metric_name, metric_fn = _metric_fn(metric)
    low = _check_low_precision(model_low, high, "bisect")
    cands = _candidate_modules(model_low, candidates)
    for name, fraction in (("target_removed", target_removed), ("target", target)):
        if fraction is not None and not 0 < fraction < 1:
            raise ParityKitError(
                f"{name}={fraction!r} must be a fraction in (0, 1); or pass target_abs=<absolute error>"
            )
    if target_abs is None and target_removed is None and target is None:
        raise ParityKitError("no target: pass target (fraction), target_removed (fraction) or target_abs")
    ref_out = _reference_output(reference, inputs, output)
    floor = float(metric_fn(ref_out, ref_out.to(low)))
    masters = _master_lookup(master_model)
    n = len(cands)
    depth = max(1, math.ceil(math.log2(n))) if n > 1 else 0
    bar = tqdm(desc="precision bisection", unit="pass", disable=not progress)
    try:
        evaluate = _Evaluator(model_low, ref_out, inputs, output, high, masters, metric_fn, bar)
        with _count_linear_rows(model_low) as linear_rows:
            error_low = evaluate([])
        error_all = evaluate(cands)
        if target_abs is not None:
            tau = float(target_abs)
        elif target_removed is not None:
            tau = error_low - float(target_removed) * (error_low - error_all)
        else:
            tau = float(target) * error_low
        if error_all > tau:
            raise ParityKitError(
                f"target {metric_name} {tau:.4g} is below what keeping all {n} candidates in {dtype_name(high)} "
                f"achieves ({error_all:.4g} = {error_all / error_low:.3g} of the all-{dtype_name(low)} error "
                f"{error_low:.4g}; the {dtype_name(low)} rounding floor of the output is {floor:.4g}); "
                f"pass target_abs >= {error_all:.4g} (target >= {error_all / error_low:.3g}), or target_removed=<fraction "
                "of the removable error>, or widen candidates"
            )
        kept = _reduce(cands, evaluate, tau) if error_low > tau else []
        chosen_error = evaluate(kept)
        # Most important first: the lowest error with that module alone in high precision.
        alone = {name: evaluate([(name, module)]) for name, module in kept}
        ordered = sorted(kept, key=lambda p: alone[p[0]])
        curve = _curve(model_low, linear_rows, ordered, evaluate, error_low, tau, floor, floor_tolerance)
    finally:
        bar.close()
    k = len(ordered)
    return BisectionResult(
        chosen=[name for name, _ in ordered], passes=evaluate.passes, pass_bound=2 + 2 * k * depth + 2 * k,
        n_candidates=n, error_low=error_low, error_all_high=error_all, error_chosen=chosen_error,
        target_error=tau, floor=floor, metric=metric_name, low_dtype=dtype_name(low),
        high_dtype=dtype_name(high), curve=curve,
    )


def _reduce(cands: list[tuple[str, nn.Module]], evaluate: _Evaluator, tau: float) -> list[tuple[str, nn.Module]]:
    """Drop groups of candidates while the target still holds (see :func:`bisect_precision`)."""
    kept = list(cands)

    def without(group: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
        names = {n for n, _ in group}
        return [p for p in kept if p[0] not in names]

    # Explicit stack instead of recursion: (group, whether dropping it is already known to fail).
    stack: list[tuple[list[tuple[str, nn.Module]], bool]] = [(list(cands), True)]
    while stack:
        group, known_needed = stack.pop()
        group = [p for p in group if p in kept]
        if not group:
            continue
        if not known_needed:
            rest = without(group)
            if evaluate(rest) <= tau:
                kept = rest
                continue
        if len(group) > 1:
            half = len(group) // 2
            # Pushed in reverse so the first half is tried first.
            stack.append((group[half:], False))
            stack.append((group[:half], False))
    return kept


def _curve(model: nn.Module, rows_per_linear: dict[int, int], ordered: list[tuple[str, nn.Module]], evaluate: _Evaluator,
           error_low: float, tau: float, floor: float, tolerance: float) -> pd.DataFrame:
    total_params = _param_count([model])
    linear_flops = {id(m): 2 * m.in_features * m.out_features * rows_per_linear.get(id(m), 0)
                    for m in model.modules() if isinstance(m, nn.Linear)}
    total_flops = sum(linear_flops.values())
    records = []
    for step in range(len(ordered) + 1):
        prefix = ordered[:step]
        error = evaluate(prefix)
        subtree_ids = {id(sub) for _, m in prefix for sub in m.modules()}
        flops = sum(v for key, v in linear_flops.items() if key in subtree_ids)
        records.append({
            "step": step,
            "module": prefix[-1][0] if prefix else "(none)",
            "class": type(prefix[-1][1]).__name__ if prefix else "",
            "error": error,
            "error_fraction": error / error_low if error_low else 0.0,
            "param_fraction": _param_count([m for _, m in prefix]) / total_params if total_params else 0.0,
            "linear_flop_fraction": flops / total_flops if total_flops else 0.0,
            "meets_target": error <= tau,
            **_floor_columns(error, floor, tolerance),
        })
    return pd.DataFrame(records)


# ----------------------------------------------------------------------------------------------
# story 02: from measurements to tables and a conclusion
# ----------------------------------------------------------------------------------------------

#: Suffix of the GroupNorm over heads in FLA's RWKV-7 names (``ln_x`` in the reference code).
GROUPNORM_SUFFIX = "attn.g_norm"
#: Sub-modules of an RWKV-7 layer whose error the layer-by-layer plot follows ("(block)": the layer itself).
RWKV7_KINDS = ("(block)", "attn", "attn.wkv", "attn.g_norm", "attn.o_proj", "ffn")
#: Bisection candidates at two granularities: leaf modules, and attention / feed-forward blocks as wholes
#: (a leaf in fp32 still hands bf16 tensors to the element-wise code around it).
RWKV7_GRANULARITIES: dict[str, ModulesLike] = {
    "leaves": "*",
    "blocks": [r"re:model\.layers\.\d+\.(attn|ffn|attn_norm|ffn_norm|pre_norm)", "model.embeddings",
               "model.norm", "lm_head"],
}
#: Modules whose local and propagated error the story separates: each layer and its main sub-modules.
RWKV7_REPLAY_MODULES = r"re:model\.layers\.\d+(\.(attn_norm|attn|attn\.wkv|attn\.g_norm|attn\.o_proj|ffn_norm|ffn))?"
_PRIMARY_TENSORS = ("output", "output.0")


def held_out_input_ids(items: Sequence[Any], tokenizer: Callable[..., Mapping[str, Any]], *, skip: int,
                       seq_len: int, bos_id: int = 0) -> list[int]:
    """Token ids of held-out text: the last documents after the first ``skip``, cut to ``seq_len`` tokens.

    Documents (``context + target``) are taken from the end of ``items`` backwards until there are more
    than 8·``seq_len`` characters (a generous bound at about 4 characters per token), joined with spaces,
    tokenised without special tokens and prefixed with ``bos_id``, so the result never overlaps the first
    ``skip`` documents that an evaluation scores.

    >>> from types import SimpleNamespace as Item
    >>> chars = lambda text, add_special_tokens: {"input_ids": [ord(c) for c in text]}
    >>> held_out_input_ids([Item(context="ab", target="c"), Item(context="de", target="f")], chars, skip=1, seq_len=3)
    [0, 100, 101]
    """
    if seq_len < 2:
        raise ParityKitError(f"seq_len={seq_len} leaves no room for text after the BOS token; use seq_len >= 2")
    if skip >= len(items):
        raise ParityKitError(
            f"all {len(items)} documents are reserved for the evaluation (skip={skip}), none is left as held-out "
            "text; lower n_items or use a larger last-word set"
        )
    held_out: list[str] = []
    for item in reversed(items[skip:]):
        held_out.append(item.context + item.target)
        if sum(map(len, held_out)) > 8 * seq_len:
            break
    ids = tokenizer(" ".join(held_out), add_special_tokens=False)["input_ids"]
    return [bos_id, *ids[: seq_len - 1]]


def logits_error_table(logits: Mapping[str, torch.Tensor], *, dtype: str, reference_dtype: str,
                       tolerance: float = 2.0) -> pd.DataFrame:
    """How far the logits of three runs are apart: ``dtype`` vs the reference, ``dtype`` vs fp64, reference vs fp64.

    ``logits`` maps run names to logits: ``dtype``, ``reference_dtype`` and ``"fp64"`` as passed (the
    same spelling). Columns: ``run, reference, rel_rms, max_abs, floor`` (rel_rms of the reference
    rounded to the run's dtype), ``floor_ratio`` and ``verdict``; the rows keep that order.

    >>> ref = torch.linspace(-3, 3, 64, dtype=torch.float64)
    >>> t = logits_error_table({"fp64": ref, "fp32": ref.float(), "bf16": ref.bfloat16()}, dtype="bf16",
    ...                        reference_dtype="fp32")
    >>> t["run"].tolist(), t.loc[1, "verdict"]
    (['bf16', 'bf16', 'fp32'], 'within floor')
    """
    from ..comparison import metrics

    missing = [name for name in (dtype, reference_dtype, "fp64") if name not in logits]
    if missing:
        raise ParityKitError(f"logits has no run named {missing} (has {list(logits)}); pass the logits of the "
                             f"{dtype} run, the {reference_dtype} run and the fp64 run under those names")
    rows = []
    for run, ref_name in ((dtype, reference_dtype), (dtype, "fp64"), (reference_dtype, "fp64")):
        m = metrics.all_metrics(logits[ref_name], logits[run], parse_dtype(run))
        rows.append({"run": run, "reference": ref_name, "rel_rms": m["rel_rms"], "max_abs": m["max_abs"],
                     "floor": m["floor"], "floor_ratio": m["rel_rms"] / m["floor"] if m["floor"] else float("nan"),
                     "verdict": metrics.verdict(m["rel_rms"], m["floor"], tolerance)})
    return pd.DataFrame(rows)


def primary_outputs(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a comparison table that hold a module's primary output (``output`` or ``output.0``).

    >>> primary_outputs(pd.DataFrame({"tensor": ["output.0", "output.1", "output"]})).index.tolist()
    [0, 2]
    """
    if "tensor" not in table.columns:
        raise ParityKitError("the table has no 'tensor' column; pass a pk.compare or pk.local_vs_propagated table")
    return table[table["tensor"].isin(_PRIMARY_TENSORS)]


def kinds_present(table: pd.DataFrame, kinds: Sequence[str] = RWKV7_KINDS) -> list[str]:
    """Those of ``kinds`` (module names below ``layers.<i>``; "(block)" = the layer itself) the table holds.

    >>> kinds_present(pd.DataFrame({"module": ["model.layers.0.attn", "model.layers.0", "model.norm"]}))
    ['(block)', 'attn']
    """
    below_layer = table["module"].str.replace(r"^.*layers\.\d+\.?", "", regex=True).replace("", "(block)")
    present = set(below_layer)
    return [kind for kind in kinds if kind in present]


def modules_ending_with(table: pd.DataFrame, suffix: str = GROUPNORM_SUFFIX) -> pd.DataFrame:
    """The rows whose ``module`` ends with ``suffix`` (by default every layer's GroupNorm).

    >>> modules_ending_with(pd.DataFrame({"module": ["l.0.attn.g_norm", "l.0.attn"]}))["module"].tolist()
    ['l.0.attn.g_norm']
    """
    return table[table["module"].str.endswith(suffix)]


def first_above_floor_text(primary: pd.DataFrame, threshold: float = 2.0) -> str:
    """One line naming the first module, in execution order, whose error exceeds ``threshold`` × its floor.

    >>> t = pd.DataFrame({"order": [0, 1], "module": ["a", "b"], "rel_rms": [1e-3, 2e-2], "floor_ratio": [1.0, 9.0],
    ...                   "verdict": ["within floor", "above floor ×9"]})
    >>> first_above_floor_text(t)
    'first module (execution order) whose error is above 2x its own floor: b (0.02, above floor ×9)'
    """
    from ..comparison.compare import first_divergence

    first = first_divergence(primary, metric="floor_ratio", threshold=threshold)
    found = None if first is None else f"{first['module']} ({first['rel_rms']:.3g}, {first['verdict']})"
    return f"first module (execution order) whose error is above {threshold:g}x its own floor: {found}"


def join_sweeps(sweep: pd.DataFrame, sweep_vs_fp64: pd.DataFrame) -> pd.DataFrame:
    """``sweep`` with a column ``error_removed_vs_fp64``: the same class's removed fraction in ``sweep_vs_fp64``.

    >>> a = pd.DataFrame({"class": ["x", "y"], "error_removed_fraction": [0.5, 0.1]})
    >>> join_sweeps(a, a.iloc[::-1].assign(error_removed_fraction=[0.2, 0.4]))["error_removed_vs_fp64"].tolist()
    [0.4, 0.2]
    """
    missing = sorted(set(sweep["class"]) - set(sweep_vs_fp64["class"]))
    if missing:
        raise ParityKitError(f"classes {missing} are missing from the fp64 sweep; run both sweeps on the same model")
    joined = sweep.copy()
    joined["error_removed_vs_fp64"] = (
        sweep_vs_fp64.set_index("class").loc[sweep["class"], "error_removed_fraction"].to_numpy())
    return joined


@dataclass
class ClassSweepSummary:
    """Where one module class stands in a :func:`sweep_by_class` table.

    ``rank`` counts from 1 among the class rows (sorted by the error they remove); ``all_classes_removed``
    and ``whole_model_removed`` come from the context rows "all listed classes" and "whole model".
    """

    class_name: str
    removed: float
    rank: int
    class_rows: pd.DataFrame = field(repr=False)
    all_classes_removed: float
    whole_model_removed: float

    @property
    def n_classes(self) -> int:
        return len(self.class_rows)

    @property
    def top_class(self) -> str:
        return str(self.class_rows.iloc[0]["class"])

    @property
    def top_removed(self) -> float:
        return float(self.class_rows.iloc[0]["error_removed_fraction"])

    def describe(self) -> str:
        """One line: the class's share, its rank and the top class."""
        return (f"{self.class_name}: removes {self.removed:.1%} of the error (rank {self.rank} of {self.n_classes} "
                f"classes); top class: {self.top_class} ({self.top_removed:.1%})")


def summarise_class_sweep(sweep: pd.DataFrame, class_name: str) -> ClassSweepSummary:
    """The share of the output error that keeping ``class_name`` in high precision removes, and its rank.

    >>> sweep = pd.DataFrame({"kind": ["context"] * 3 + ["class"] * 2,
    ...     "class": ["nothing", "all listed", "whole model", "Linear", "GroupNorm"],
    ...     "error_removed_fraction": [0.0, 0.7, 0.9, 0.5, 0.1]})
    >>> summarise_class_sweep(sweep, "GroupNorm").describe()
    'GroupNorm: removes 10.0% of the error (rank 2 of 2 classes); top class: Linear (50.0%)'
    """
    class_rows = sweep[sweep["kind"] == "class"].reset_index(drop=True)
    matches = class_rows.index[class_rows["class"] == class_name]
    if len(matches) == 0:
        raise ParityKitError(f"class {class_name!r} is not among the swept classes {class_rows['class'].tolist()}; "
                             "pass the class name of a module the sweep covered")
    context = sweep[sweep["kind"] == "context"]
    if len(context) < 3:
        raise ParityKitError("the sweep lacks its context rows (nothing / all listed classes / whole model); "
                             "pass the table pk.sweep_by_class returned")
    # The context rows come in sweep_by_class's order: nothing, all listed classes, whole model.
    return ClassSweepSummary(
        class_name=class_name, removed=float(class_rows.loc[matches[0], "error_removed_fraction"]),
        rank=int(matches[0]) + 1, class_rows=class_rows,
        all_classes_removed=float(context.iloc[1]["error_removed_fraction"]),
        whole_model_removed=float(context.iloc[2]["error_removed_fraction"]),
    )


@dataclass
class LocalErrorSummary:
    """The GroupNorm rows of a local-vs-propagated table, and the module with the largest local error.

    Ratios are errors over each row's own floor, one per GroupNorm instance in execution order.
    """

    local_floor_ratio: list[float]
    free_floor_ratio: list[float]
    largest_local_module: str
    largest_local_ratio: float

    @property
    def inherited(self) -> bool:
        """True when the median free-run ratio exceeds twice the median local ratio."""
        return bool(pd.Series(self.free_floor_ratio).median() > 2 * pd.Series(self.local_floor_ratio).median())

    def describe(self) -> str:
        """One line: the GroupNorm's local error range and the largest local error."""
        local = pd.Series(self.local_floor_ratio)
        return (f"GroupNorm local error: {local.min():.2g}-{local.max():.2g} x its floor; largest local error "
                f"relative to its floor: {self.largest_local_module} ({self.largest_local_ratio:.3g} x)")


def summarise_local_errors(table: pd.DataFrame, suffix: str = GROUPNORM_SUFFIX,
                           metric: str = "rel_rms") -> LocalErrorSummary:
    """Local and free-run error over the floor for the modules ending with ``suffix``, and the module with the
    largest local error over its floor, from a :func:`parity_kit.local_vs_propagated` table (primary outputs).

    >>> t = pd.DataFrame({"module": ["l.0.attn", "l.0.attn.g_norm"], "local_rel_rms": [4e-2, 1e-2],
    ...                   "free_rel_rms": [5e-2, 6e-2], "floor": [1e-2, 1e-2]})
    >>> s = summarise_local_errors(t)
    >>> s.local_floor_ratio, s.largest_local_module, s.inherited
    ([1.0], 'l.0.attn', True)
    """
    local, free = f"local_{metric}", f"free_{metric}"
    missing = sorted({"module", local, free, "floor"} - set(table.columns))
    if missing:
        raise ParityKitError(f"the table lacks columns {missing}; pass a pk.local_vs_propagated table "
                             f"computed with metric={metric!r}")
    rows = modules_ending_with(table, suffix)
    if rows.empty:
        raise ParityKitError(f"no module ending with {suffix!r} in the table; replay modules that include it")
    ranked = table.assign(ratio=table[local] / table["floor"]).sort_values("ratio", ascending=False)
    return LocalErrorSummary(
        local_floor_ratio=[float(v) for v in rows[local] / rows["floor"]],
        free_floor_ratio=[float(v) for v in rows[free] / rows["floor"]],
        largest_local_module=str(ranked.iloc[0]["module"]), largest_local_ratio=float(ranked.iloc[0]["ratio"]),
    )


def groupnorm_fix_variants(model_low: nn.Module, master_model: nn.Module, bisection_chosen: Sequence[str],
                           dtype: str) -> dict[str, tuple[list[str], nn.Module | None]]:
    """The variants story 02 measures: label → (modules kept in fp32, master weights or None), in this order:
    plain ``dtype``; every ``nn.GroupNorm`` in fp32 with up-cast weights; the same with ``master_model``'s
    weights (the fix); the bisection's set in fp32 with master weights.

    >>> net = nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4))
    >>> [(label, modules) for label, (modules, _) in groupnorm_fix_variants(net, net, ["0"], "bf16").items()][1:3]
    [('bf16 + GroupNorm fp32 (up-cast weights)', ['1']), ('bf16 + GroupNorm fp32 (fp32 master weights)', ['1'])]
    """
    groupnorms = [n for n, m in model_low.named_modules() if isinstance(m, nn.GroupNorm)]
    if not groupnorms:
        raise ParityKitError(f"{type(model_low).__name__} has no nn.GroupNorm module; this story needs a model with "
                             "a GroupNorm over heads (e.g. RWKV-7's attn.g_norm)")
    return {
        dtype: ([], None),
        f"{dtype} + GroupNorm fp32 (up-cast weights)": (groupnorms, None),
        f"{dtype} + GroupNorm fp32 (fp32 master weights)": (groupnorms, master_model),
        f"{dtype} + bisection set fp32 ({len(bisection_chosen)} blocks)": (list(bisection_chosen), master_model),
    }


@dataclass
class VariantMeasurements:
    """What :func:`measure_variants` measured: ``table`` (one row per variant), and per variant label its
    last-word evaluation (``evals``) and its logits on the analysis input (``logits``)."""

    table: pd.DataFrame
    evals: dict[str, Any]
    logits: dict[str, torch.Tensor] = field(repr=False)


def measure_variants(
    model_low: nn.Module,
    variants: Mapping[str, tuple[Sequence[str], MasterWeights]],
    inputs: Any,
    reference_logits: Mapping[str, torch.Tensor],
    *,
    error_low: float,
    evaluate: Callable[[nn.Module, str], Any],
    reference_eval: Any,
    high_dtype: DtypeLike = "fp32",
    n_bootstrap_paired: int = 10_000,
) -> VariantMeasurements:
    """Run ``model_low`` once per variant (modules in ``high_dtype`` with optional master weights, as
    :func:`run_in_dtype`) and measure its logits and its last-word evaluation.

    ``reference_logits``: name → logits on ``inputs``; the first entry is the reference that
    ``removed_vs_plain`` (1 − error / ``error_low``, the plain low-precision error) is judged against.
    ``evaluate(model, label)`` returns a :class:`parity_kit.analyses.evaluation.LastWordResult` and runs inside the
    variant's precision setting; each result is paired with ``reference_eval``
    (:func:`parity_kit.paired_comparison`). Table columns: ``variant, modules_in_fp32``,
    ``rel_rms_vs_<name>`` and ``verdict_vs_<name>`` per reference, ``removed_vs_plain, ppl, ppl_stderr,
    acc, ppl_minus_ref, paired_z``.

    >>> from parity_kit.analyses.evaluation import LastWordResult
    >>> _ = torch.manual_seed(0)
    >>> ref = nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8)).eval()
    >>> low, x = __import__("copy").deepcopy(ref).bfloat16(), torch.randn(3, 4)
    >>> ev = lambda model, label: LastWordResult.from_loglikelihoods([-1.0, -2.0, -1.5], n_bootstrap=10, label=label)
    >>> logits = {"fp32": ref(x).detach()}
    >>> m = measure_variants(low, {"plain": ([], None), "gn": (["1"], ref)}, x.bfloat16(), logits,
    ...     error_low=__import__("parity_kit").metrics.rel_rms(logits["fp32"], low(x.bfloat16())),
    ...     evaluate=ev, reference_eval=ev(ref, "fp32"), n_bootstrap_paired=10)
    >>> m.table["variant"].tolist(), float(m.table.loc[0, "removed_vs_plain"])
    (['plain', 'gn'], 0.0)
    """
    from ..comparison import metrics
    from .evaluation import paired_comparison

    if not reference_logits:
        raise ParityKitError("reference_logits is empty; pass {name: logits} with the main reference first")
    low = _model_dtype(model_low)
    main_reference = next(iter(reference_logits))
    rows, evals, variant_logits = [], {}, {}
    for label, (modules, master) in variants.items():
        fixed = run_in_dtype(model_low, list(modules), high_dtype, master_weights=master) if modules \
            else contextlib.nullcontext()
        with fixed:
            with torch.no_grad():
                out = variant_logits[label] = _primary_tensor(_call(model_low, inputs), label)
            evals[label] = evaluate(model_low, label)
        row: dict[str, Any] = {"variant": label, "modules_in_fp32": len(modules)}
        for ref_name, ref_out in reference_logits.items():
            m = metrics.all_metrics(ref_out, out, low)
            row[f"rel_rms_vs_{ref_name}"] = m["rel_rms"]
            row[f"verdict_vs_{ref_name}"] = metrics.verdict(m["rel_rms"], m["floor"])
        row["removed_vs_plain"] = 1 - row[f"rel_rms_vs_{main_reference}"] / error_low
        paired = paired_comparison(reference_eval, evals[label], n_bootstrap=n_bootstrap_paired)
        row.update(ppl=evals[label].ppl, ppl_stderr=evals[label].ppl_stderr, acc=evals[label].acc,
                   ppl_minus_ref=evals[label].ppl - reference_eval.ppl, paired_z=paired["z"])
        rows.append(row)
    return VariantMeasurements(table=pd.DataFrame(rows), evals=evals, logits=variant_logits)


def _groupnorm_role(rank: int, removed: float) -> str:
    if rank == 1 and removed >= 0.5:
        return "the main culprit"
    if removed >= 0.2:
        return "a contributor but not the whole story"
    return "not the main culprit"


def conclude_groupnorm_precision(
    *,
    model: str,
    dtype: str,
    reference_dtype: str,
    logit_table: pd.DataFrame,
    sweep: ClassSweepSummary,
    local: LocalErrorSummary,
    blocks: BisectionResult,
    leaves: BisectionResult,
    fix_table: pd.DataFrame,
    reference_ppl: float,
    reference_ppl_stderr: float,
    upcast_logits_change: float,
) -> tuple[str, dict[str, Any]]:
    """Story 02's conclusion and every number it relies on, from the notebook's measurements.

    ``logit_table``: :func:`logits_error_table`. ``sweep``: :func:`summarise_class_sweep` for the
    GroupNorm class. ``local``: :func:`summarise_local_errors`. ``blocks`` / ``leaves``: the bisections
    over blocks and over leaf modules. ``fix_table``: :attr:`VariantMeasurements.table` for
    :func:`groupnorm_fix_variants` (row 0 plain, row 2 the GroupNorm fix with master weights).
    ``upcast_logits_change``: rel_rms between the plain logits and those with GroupNorm arithmetic in
    fp32 on the same weights. The GroupNorm is called the main culprit when it ranks first and removes at
    least half of the error, a contributor when it removes at least a fifth, and not the main culprit otherwise.

    >>> text, figures = conclude_groupnorm_precision(model="tiny-rwkv7", dtype="bf16", reference_dtype="fp32",
    ...     logit_table=logit_table, sweep=sweep, local=local, blocks=blocks, leaves=leaves, fix_table=fix_table,
    ...     reference_ppl=4.1, reference_ppl_stderr=0.1, upcast_logits_change=0.0)  # doctest: +SKIP
    """
    if len(logit_table) < 3 or len(fix_table) < 3:
        raise ParityKitError("logit_table needs its three rows (logits_error_table) and fix_table at least the plain, "
                             "up-cast and master-weight rows (groupnorm_fix_variants); pass the tables the story built")
    error_low = float(logit_table.loc[0, "rel_rms"])
    plain, gn_fix = fix_table.iloc[0], fix_table.iloc[2]
    local_ratio, free_ratio = pd.Series(local.local_floor_ratio), pd.Series(local.free_floor_ratio)
    indistinguishable = max(abs(plain["paired_z"]), abs(gn_fix["paired_z"])) < 2
    z_note = f"; neither run is distinguishable from {reference_dtype} on this set, |z| < 2" if indistinguishable else ""
    parts = [
        f"In {model}, {dtype} logits differ from {reference_dtype} by rel_rms {error_low:.3g} "
        f"({logit_table.loc[0, 'floor_ratio']:.3g}x the {dtype} rounding floor of the logits; "
        f"{reference_dtype} itself is {logit_table.loc[2, 'rel_rms']:.2g} from fp64).",
        f"GroupNorm ({sweep.class_name}, attn.g_norm) is {_groupnorm_role(sweep.rank, sweep.removed)}: keeping it in "
        f"fp32 removes {sweep.removed:.1%} of the output error (class rank {sweep.rank} of {sweep.n_classes}; "
        f"{sweep.top_class} removes {sweep.top_removed:.1%}). Its outputs are {free_ratio.min():.2g}-"
        f"{free_ratio.max():.2g}x their floor in the free run but {local_ratio.min():.2g}-"
        f"{local_ratio.max():.2g}x when fed the reference inputs, so most of the error it shows is "
        f"{'inherited' if local.inherited else 'its own'}; "
        f"the largest local error relative to its floor is {local.largest_local_module}'s "
        f"({local.largest_local_ratio:.2g}x).",
        f"All leaf modules in fp32 together remove {sweep.all_classes_removed:.1%} of the output error, the whole "
        f"model (logits still rounded to {dtype}) {sweep.whole_model_removed:.1%}: the difference is made outside "
        f"the leaf modules, in the element-wise code of the blocks and the {dtype} hand-offs between modules.",
        f"Bisection over blocks keeps {len(blocks.chosen)} of {blocks.n_candidates} in fp32 "
        f"({', '.join(blocks.chosen) or 'none'}; {blocks.curve.iloc[-1]['param_fraction']:.1%} of parameters, "
        f"{blocks.passes} passes) to reach rel_rms {blocks.error_chosen:.3g}; over leaves it keeps "
        f"{len(leaves.chosen)} of {leaves.n_candidates} ({leaves.passes} passes).",
        f"GroupNorm arithmetic in fp32 with the same bf16 weights moves the logits by rel_rms "
        f"{upcast_logits_change:.2g}{' (bit-identical on this input)' if upcast_logits_change == 0 else ''}. "
        f"The GroupNorm fix (fp32 with fp32 master weights) changes the logits error by "
        f"{-gn_fix['removed_vs_plain']:+.1%} and last-word perplexity from {plain['ppl']:.4f} to "
        f"{gn_fix['ppl']:.4f} ({reference_dtype}: {reference_ppl:.4f} ± {reference_ppl_stderr:.4f}; paired z vs "
        f"{reference_dtype}: {plain['paired_z']:.2f} -> {gn_fix['paired_z']:.2f}"
        f"{z_note}).",
    ]
    figures: dict[str, Any] = {
        "logits_rel_rms_vs_ref": error_low,
        "logits_rel_rms_vs_fp64": float(logit_table.loc[1, "rel_rms"]),
        "ref_vs_fp64_rel_rms": float(logit_table.loc[2, "rel_rms"]),
        "logits_floor": float(logit_table.loc[0, "floor"]),
        "groupnorm_error_removed": sweep.removed,
        "groupnorm_class_rank": sweep.rank,
        "n_classes": sweep.n_classes,
        "top_class_error_removed": sweep.top_removed,
        "all_leaf_classes_error_removed": sweep.all_classes_removed,
        "whole_model_error_removed": sweep.whole_model_removed,
        "class_error_removed": dict(zip(sweep.class_rows["class"],
                                        sweep.class_rows["error_removed_fraction"].astype(float))),
        "groupnorm_local_floor_ratio": list(local.local_floor_ratio),
        "groupnorm_free_floor_ratio": list(local.free_floor_ratio),
        "largest_local_floor_ratio": local.largest_local_ratio,
        "groupnorm_upcast_logits_change": upcast_logits_change,
        "bisection_blocks_chosen": len(blocks.chosen),
        "bisection_blocks_candidates": blocks.n_candidates,
        "bisection_blocks_passes": blocks.passes,
        "bisection_blocks_pass_bound": blocks.pass_bound,
        "bisection_blocks_error": blocks.error_chosen,
        "bisection_leaves_chosen": len(leaves.chosen),
        "bisection_leaves_candidates": leaves.n_candidates,
        "bisection_leaves_passes": leaves.passes,
        "bisection_leaves_error": leaves.error_chosen,
        "ppl_reference": reference_ppl,
        "ppl_reference_stderr": reference_ppl_stderr,
        "ppl_by_variant": dict(zip(fix_table["variant"], fix_table["ppl"].astype(float))),
        "logits_rel_rms_by_variant": dict(zip(fix_table["variant"],
                                              fix_table[f"rel_rms_vs_{reference_dtype}"].astype(float))),
        "paired_z_by_variant": dict(zip(fix_table["variant"], fix_table["paired_z"].astype(float))),
    }
    return " ".join(parts), figures


def explore_precision(
    model: str,
    *,
    dtype: DtypeLike = "bf16",
    reference_dtype: DtypeLike = "fp32",
    device: str = "cpu",
    seq_len: int = 128,
    removed: float = 0.5,
    candidates: ModulesLike = "blocks",
    skip_items: int = 150,
) -> list[Any]:
    """The story-02 panel's analysis: class sweep and bisection of ``model`` in ``dtype`` against ``reference_dtype``.

    Models come from the shared cache (``pk.ui.MODELS``); the input is ``seq_len`` tokens of held-out
    text after the first ``skip_items`` last-word documents, as in the notebook; the bisection looks for
    the fewest modules that remove the fraction ``removed`` of the error fp32 can remove. Returns the
    sweep table and plot, the bisection summary, and its error/cost curve as a table and a plot.
    ``candidates`` is ``"blocks"`` or ``"leaves"`` (:data:`RWKV7_GRANULARITIES`) or any module pattern.

    >>> out = explore_precision("tiny-rwkv7", seq_len=16)
    >>> [type(x).__name__ for x in out]
    ['DataFrame', 'Figure', 'str', 'DataFrame', 'Figure']
    """
    from ..present import plots
    from .evaluation import load_lastword_items
    from .._util.paths import data_dir
    from ..present.panels import MODELS

    if isinstance(candidates, str):
        candidates = RWKV7_GRANULARITIES.get(candidates, candidates)
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ParityKitError(f"seq_len={seq_len!r}: use at least 2 tokens")
    reference, tokenizer = MODELS.load(model, reference_dtype, device)
    candidate, _ = MODELS.load(model, dtype, device)
    items = load_lastword_items(data_dir() / "eval" / "lastword.jsonl")
    ids = held_out_input_ids(items, tokenizer, skip=skip_items, seq_len=seq_len)
    inputs = {"input_ids": torch.tensor([ids], device=device), "use_cache": False}
    sweep = sweep_by_class(candidate, reference, inputs, master_model=reference, progress=False)
    with torch.no_grad():
        reference_logits = reference(**inputs).logits.detach()
    result = bisect_precision(candidate, reference_logits, inputs, candidates=candidates, target_removed=removed,
                              master_model=reference, progress=False)
    return [sweep, plots.class_sweep(sweep), result.summary(), result.curve, plots.bisection_curve(result)]
