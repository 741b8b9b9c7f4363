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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .._util.calling import call_model, model_dtype, prepare_inputs, primary_tensor
from ..capture import ModuleSpec, select_modules
from ..comparison.floor import judge, rounding_floor
from ..comparison.metrics import ErrorMetric, error_metric
from ..dtypes import DtypeLike, dtype_name, parse_dtype
from ..errors import ParityKitError
from .mixed_precision import MasterWeights, master_lookup, outermost, run_modules_in_dtype


# Leaf modules that compute nothing, so keeping them in fp32 can only add a cast.
_NO_OP_CLASSES: tuple[type, ...] = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.Flatten, nn.Unflatten,
)



# ----------------------------------------------------------------------------------------------
# shared machinery of the sweep and the bisection
# ----------------------------------------------------------------------------------------------

def _forward_target(model: nn.Module, inputs: Any, target: str) -> torch.Tensor:
    """Run ``model`` once on prepared ``inputs``; return "logits" (the model output) or a module's output."""
    with torch.no_grad():
        if target == "logits":
            return primary_tensor(call_model(model, inputs), type(model).__name__).detach()
        module = dict(model.named_modules()).get(target)
        if module is None:
            raise ParityKitError(f"target {target!r} is neither 'logits' nor a module name of {type(model).__name__}")
        seen: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _a, out: seen.append(primary_tensor(out, target).detach()))
        try:
            call_model(model, inputs)
        finally:
            handle.remove()
        if not seen:
            raise ParityKitError(f"target module {target!r} was not called in the forward pass; pick another target")
        return seen[-1]


def _reference_output(reference: torch.Tensor | nn.Module, inputs: Any, target: str) -> torch.Tensor:
    if isinstance(reference, nn.Module):
        return _forward_target(reference, prepare_inputs(reference, inputs), target)
    if isinstance(reference, torch.Tensor):
        return reference.detach()
    raise ParityKitError(
        f"reference must be a tensor of {target} or a model, not {type(reference).__name__}"
    )


def _check_low_precision(model: nn.Module, high: torch.dtype, task: str) -> torch.dtype:
    low = model_dtype(model)
    if not any(p.is_floating_point() and p.dtype.itemsize < high.itemsize for p in model.parameters()):
        raise ParityKitError(
            f"nothing to {task}: every parameter is already {dtype_name(low)} (not lower than "
            f"{dtype_name(high)}); cast the model to bf16/fp16 first"
        )
    return low


def _candidate_modules(model: nn.Module, candidates: ModuleSpec) -> list[tuple[str, nn.Module]]:
    """The finest selected modules: a selected module that contains other selected ones is dropped."""
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


class _Evaluator:
    """Error of the low-precision model's target with a given set of modules in high precision."""

    def __init__(self, model: nn.Module, reference: torch.Tensor, inputs: Any, target: str, high: torch.dtype,
                 masters: dict[str, torch.Tensor] | None, metric: Callable[[torch.Tensor, torch.Tensor], float],
                 bar: Any) -> None:
        # Prepared once: inside run_in_dtype the model's first weight may already be the fp32 copy.
        self.model, self.reference, self.target = model, reference, target
        self.inputs = prepare_inputs(model, inputs)
        self.high, self.masters, self.metric, self.bar = high, masters, metric, bar
        self.passes = 0
        self.cache: dict[frozenset[str], float] = {}

    def __call__(self, chosen: Sequence[tuple[str, nn.Module]]) -> float:
        key = frozenset(n for n, _ in chosen)
        if key in self.cache:
            return self.cache[key]
        with run_modules_in_dtype(outermost(chosen), self.high, self.masters):
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
    metric: ErrorMetric = "rel_rms",
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
    metric_name, metric_fn = error_metric(metric)
    low = _check_low_precision(model_low, high, "sweep")
    ref_out = _reference_output(reference, inputs, target)
    floor = rounding_floor(ref_out, low, metric=metric_fn)
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
    masters = master_lookup(master_model)
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
                **judge(error, floor, floor_tolerance),
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
    candidates: ModuleSpec = "*",
    target: float | None = 0.5,
    target_abs: float | None = None,
    target_removed: float | None = None,
    master_model: MasterWeights = None,
    metric: ErrorMetric = "rel_rms",
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
    metric_name, metric_fn = error_metric(metric)
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
    floor = rounding_floor(ref_out, low, metric=metric_fn)
    masters = master_lookup(master_model)
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
            **judge(error, floor, tolerance),
        })
    return pd.DataFrame(records)
