"""The noise-floor rule: how much error rounding alone explains, and how an error is judged against it.

Every table with ``floor`` / ``floor_ratio`` / ``verdict`` columns (:func:`parity_kit.compare`,
:func:`parity_kit.compare_live`, :func:`parity_kit.local_vs_propagated`, the precision sweep and bisection) and
every calibrated verdict (:func:`apply_floor`, :func:`parity_kit.compare_models`) follows this one rule.

**One rounding** (all that two recordings alone can tell, the ``rounding_floor`` column). The floor does not
depend on which run is called the reference:

- the two dtypes differ: the error that rounding the *wider* run's tensor once to the *narrower* dtype causes
  (its representability floor); ULPs are counted in the narrower dtype too;
- the same dtype: each run rounded its own exact result at least once, so one rounding in that dtype
  (:func:`parity_kit.metrics.nominal_floor`, in the metric's units).

**Calibrated** (a :class:`Floor`, measured by :func:`parity_kit.calibrate_floor` from the wider run's model).
One rounding is the right yardstick only for the first module: a correct low-precision model rounds at every
module, and the error it inherits grows layer by layer. The calibrated floor of a module is what honest
arithmetic in each run's dtype produces there, measured on a *rounding-only run*: the model computed in fp64
(the baseline) against the same model with its weights, and every module's floating inputs and outputs,
rounded to the dtype, each module computing inside in the dtype's accumulation precision (fp32 for
fp16/bf16, as their kernels accumulate; the dtype itself otherwise). Its free-run error is the **free floor**
(accumulated rounding); each module replayed alone on the baseline's inputs gives the **own floor**. The two
runs round independently, so their floors add in quadrature (a run in fp64 adds nothing); the one-rounding
floor stays a lower bound. Independent sources of difference — the rounding floor now, run-to-run or batch
variance later — are the named components of a :class:`Floor`, also added in quadrature.

Why boundaries and not every operation: a rounding-only run that rounded every operation would be the
candidate's own code in its dtype, and a module that loses precision inside (a variance computed in bf16, a
score matrix materialised in bf16) would then pass for rounding. Rounding at module boundaries models a module
that computes its function well from rounded inputs and weights; a module whose own error exceeds that floor
computes differently — a bug, or a precision-sensitive operation (:func:`parity_kit.compare_models` tells
these two apart by recomputing the module of both runs in fp64 on the same inputs).

**Judgement** of a row (``tolerance`` × floor, 2 by default):

- "consistent with rounding": the free error within the free floor and the own error within the own floor;
- "own error above floor": the module itself computes differently from the reference;
- "inherited": its own error is within its floor, but it passes on a larger error it received;
- "above floor": the free error exceeds the floor and the own error was not measured;
- "not finite": the candidate produced NaN/Inf there.

>>> import torch
>>> ref = torch.linspace(1, 2, 100)
>>> rounding_floor(ref, "bf16") > 0, rounding_floor(ref, "fp32") == nominal_floor("fp32")
(True, True)
>>> judge(1e-2, 2e-3)
{'floor': 0.002, 'floor_ratio': 5.0, 'verdict': 'above floor ×5'}
>>> diagnose(free_ratio=4.0, own_ratio=1.1)
'inherited'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from ..dtypes import DtypeLike, dtype_name, parse_dtype
from ..errors import ParityKitError
from . import metrics
from .metrics import check_tolerance, nominal_floor, verdict

CONSISTENT = "consistent with rounding"
OWN = "own error above floor"
INHERITED = "inherited"
ABOVE = "above floor"
NOT_FINITE = "not finite"
DIAGNOSES = (CONSISTENT, OWN, INHERITED, ABOVE, NOT_FINITE)

#: own_cause of an innermost culprit, from recomputing it in fp64 on the reference inputs
COMPUTES_DIFFERENTLY = "computes differently"
PRECISION_SENSITIVE = "precision-sensitive"

#: (module, call, tensor leaf) of a row, the module named as in the model the floor was measured on
RowKey = tuple[str, int, str]


def narrower(cand_dtype: DtypeLike, ref_dtype: DtypeLike) -> bool:
    """True when the candidate's floating dtype is less precise than the reference's."""
    return torch.finfo(parse_dtype(cand_dtype)).eps > torch.finfo(parse_dtype(ref_dtype)).eps


def unit_dtype(ref_dtype: DtypeLike, cand_dtype: DtypeLike) -> torch.dtype:
    """The dtype a pair's ULPs and one-rounding floor are counted in: the narrower one (the candidate's if equal).

    >>> unit_dtype("bf16", "fp32"), unit_dtype("fp32", "bf16")
    (torch.bfloat16, torch.bfloat16)
    """
    ref, cand = parse_dtype(ref_dtype), parse_dtype(cand_dtype)
    return ref if narrower(ref, cand) else cand


def floor_from_candidate(ref_dtype: DtypeLike, cand_dtype: DtypeLike) -> bool:
    """True when the one-rounding floor is the candidate's representability (the candidate is the wider run)."""
    return narrower(ref_dtype, cand_dtype)


def floor_for(representability: float, ref_dtype: DtypeLike, cand_dtype: DtypeLike, *,
              nominal: float | None = None) -> float:
    """The one-rounding rule, given the wider run's representability floor in the narrower dtype (as already
    measured, e.g. by the fused comparison reductions): that floor when the dtypes differ, else ``nominal``
    (default: :func:`nominal_floor` of the dtype, the rel_rms of one rounding)."""
    if narrower(cand_dtype, ref_dtype) or narrower(ref_dtype, cand_dtype):
        return representability
    return nominal_floor(cand_dtype) if nominal is None else nominal


def rounding_floor(ref: torch.Tensor, cand_dtype: DtypeLike, ref_dtype: DtypeLike | None = None,
                   metric: str | Callable[[torch.Tensor, torch.Tensor], float] = "rel_rms",
                   cand: torch.Tensor | None = None) -> float:
    """The one-rounding floor of ``metric`` for a candidate in ``cand_dtype`` against ``ref`` (whose dtype, as the
    model produced it, is ``ref_dtype``; default ``ref.dtype``).

    A narrower candidate: ``metric`` of ``ref`` rounded to ``cand_dtype``. A wider candidate: of ``cand`` (the
    candidate tensor) rounded to ``ref_dtype``, so the floor does not depend on the argument order (without
    ``cand``, the nominal rounding below). The same dtype: the nominal rounding in the metric's units: rel_rms
    ``eps/(2√3)``, max_abs half an ULP of the largest value ``max|ref|·eps/2``, mean_abs ``mean|ref|·eps/4``;
    a callable metric gets its value on the reference against itself nudged by one nominal rounding.

    >>> ref = torch.linspace(1, 2, 100)
    >>> rounding_floor(ref.bfloat16(), "fp32", cand=ref) == rounding_floor(ref, "bf16")
    True
    """
    if not ref.is_floating_point():
        return 0.0
    target = parse_dtype(cand_dtype)
    ref_kind = parse_dtype(ref_dtype) if ref_dtype is not None else ref.dtype
    name, fn = metrics.error_metric(metric)
    if narrower(target, ref_kind):
        return float(fn(ref, ref.to(target)))
    if narrower(ref_kind, target) and cand is not None and cand.is_floating_point():
        return float(fn(cand, cand.to(ref_kind)))
    eps = torch.finfo(target).eps
    r = ref.detach().double()
    if name == "rel_rms":
        return nominal_floor(target)
    if name == "max_abs":
        return float(r.abs().max()) * eps / 2 if r.numel() else 0.0
    if name == "mean_abs":
        return float(r.abs().mean()) * eps / 4 if r.numel() else 0.0
    return float(fn(r, r * (1 + eps / (2 * math.sqrt(3)))))


def floor_ratio(value: float, floor: float) -> float:
    """``value / floor``; inf for an error above a floor of 0, 0 for no error at all, NaN for a NaN value."""
    if math.isnan(value):
        return math.nan
    if floor > 0:
        return value / floor
    return 0.0 if value == 0 else math.inf


def require_table(table: Any, what: str) -> None:
    """ParityKitError unless ``table`` looks like a comparison table (a DataFrame with a module column)."""
    if not isinstance(table, pd.DataFrame):
        raise ParityKitError(f"{what} takes a comparison table (pk.compare / pk.compare_models), got "
                             f"{type(table).__name__}")
    missing = [c for c in ("module",) if c not in table.columns]
    if missing:
        raise ParityKitError(f"{what}: the table lacks the column(s) {missing}; pass a table returned by pk.compare "
                             "or pk.compare_models")


def judge(value: float, floor: float, tolerance: float = 2.0) -> dict[str, Any]:
    """The ``floor``, ``floor_ratio`` and ``verdict`` columns of one error."""
    check_tolerance(tolerance)
    return {"floor": floor, "floor_ratio": floor_ratio(value, floor), "verdict": verdict(value, floor, tolerance)}


def diagnose(free_ratio: float, own_ratio: float = math.nan, tolerance: float = 2.0) -> str:
    """The judgement of one row from its free-run and own error over their floors (NaN own: not measured).

    >>> diagnose(1.5, 1.2), diagnose(40.0, 9.0), diagnose(5.0), diagnose(float("nan"))
    ('consistent with rounding', 'own error above floor', 'above floor', 'not finite')
    """
    if math.isnan(free_ratio):
        return NOT_FINITE
    if not math.isnan(own_ratio) and own_ratio > tolerance:
        return OWN
    if free_ratio > tolerance:
        return ABOVE if math.isnan(own_ratio) else INHERITED
    return CONSISTENT


@dataclass(frozen=True)
class FloorComponent:
    """One independent source of difference between two correct runs, as floors per row.

    ``free``: the floor of each row's free-run error; ``own``: of each module's own error (on the reference
    inputs; empty where the source has no such notion). Values are in the :class:`Floor`'s metric.
    """

    name: str
    description: str
    free: Mapping[RowKey, float] = field(default_factory=dict)
    own: Mapping[RowKey, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Floor:
    """Calibrated floors per (module, call, tensor), by named :class:`FloorComponent`; components are independent
    sources, so a row's floor is the root of the sum of their squares.

    ``keyed_by`` says whose module names the keys use: the model the floor was measured on, ``"reference"``
    (matched against a table's ``module`` column) or ``"candidate"`` (its ``cand_module``). ``dtypes`` are the two
    runs' dtypes, ``metric`` the error metric (rel_rms).

    >>> f = Floor(("fp32", "bf16"), components={"rounding": FloorComponent("rounding", "", {("m", 0, "output"): 3e-3})})
    >>> f = f.with_component(FloorComponent("run_to_run", "", {("m", 0, "output"): 4e-3}))
    >>> round(f.free(("m", 0, "output")), 6), math.isnan(f.own(("m", 0, "output")))
    (0.005, True)
    """

    dtypes: tuple[str, str]
    keyed_by: str = "reference"
    metric: str = "rel_rms"
    components: Mapping[str, FloorComponent] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.keyed_by not in ("reference", "candidate"):
            raise ParityKitError(f"Floor.keyed_by={self.keyed_by!r}: use 'reference' or 'candidate'")
        if not isinstance(self.dtypes, tuple | list) or len(self.dtypes) != 2:
            raise ParityKitError(f"Floor.dtypes={self.dtypes!r}: pass the two runs' dtypes, e.g. ('fp32', 'bf16')")
        for d in self.dtypes:
            parse_dtype(d)

    def with_component(self, component: FloorComponent) -> Floor:
        """A copy with ``component`` added (or replaced, by name)."""
        return Floor(self.dtypes, self.keyed_by, self.metric, {**self.components, component.name: component})

    def _combined(self, key: RowKey, kind: str) -> float:
        values = [getattr(c, kind)[key] for c in self.components.values() if key in getattr(c, kind)]
        return math.sqrt(sum(v * v for v in values)) if values else math.nan

    def free(self, key: RowKey) -> float:
        """The floor of a row's free-run error (NaN where no component measured it)."""
        return self._combined(key, "free")

    def own(self, key: RowKey) -> float:
        """The floor of a module's own error (NaN where no component measured it)."""
        return self._combined(key, "own")

    def to_frame(self) -> pd.DataFrame:
        """One row per key, a ``<component>_free`` and ``<component>_own`` column per component."""
        keys = sorted({k for c in self.components.values() for k in (*c.free, *c.own)}, key=str)
        rows = []
        for module, call, tensor in keys:
            row: dict[str, Any] = {"module": module, "call": call, "tensor": tensor}
            for c in self.components.values():
                row[f"{c.name}_free"] = c.free.get((module, call, tensor), math.nan)
                row[f"{c.name}_own"] = c.own.get((module, call, tensor), math.nan)
            rows.append(row)
        return pd.DataFrame(rows)


def without_label(cand_module: Any) -> Any:
    """``"name [q]"`` → ``"name"``: a table's candidate name without the mapping target's label."""
    return cand_module.split(" [", 1)[0] if isinstance(cand_module, str) else cand_module


_PRIMARY_ALIAS = {"output": "output.0", "output.0": "output"}


def _aliases(key: tuple) -> list[tuple]:
    """``key``, then the same key under the other name of a primary output (``output`` / ``output.0``: one
    implementation returns a tensor, the other a tuple)."""
    *head, leaf = key
    return [key] + ([(*head, _PRIMARY_ALIAS[leaf])] if leaf in _PRIMARY_ALIAS else [])


def first_known(lookup: Callable[[tuple], float], key: tuple) -> float:
    """``lookup(key)``, or under the primary output's other name when that is NaN (see :func:`_aliases`)."""
    for candidate in _aliases(key):
        value = lookup(candidate)
        if not math.isnan(value):
            return value
    return math.nan


def own_errors_by_row(own: pd.DataFrame, metric: str = "rel_rms") -> dict[tuple[str, str, int, str], float]:
    """``(module, cand_module, call, tensor) -> own error`` from a :func:`parity_kit.local_vs_propagated` table."""
    column = f"local_{metric}"
    if column not in own.columns:
        raise ParityKitError(f"own= must be a local_vs_propagated table with a {column!r} column (metric={metric!r})")
    ok = own[own["status"] == "ok"]
    return {(r.module, r.cand_module, int(r.call), r.tensor): float(getattr(r, column)) for r in ok.itertuples()}


def _is_inside(module: str, ancestor: str) -> bool:
    return ancestor == "" or module.startswith(ancestor + ".")


def apply_floor(table: pd.DataFrame, floor: Floor | None = None, own: pd.DataFrame | None = None, *,
                tolerance: float = 2.0, causes: Mapping[str, str] | None = None) -> pd.DataFrame:
    """A comparison table judged by the calibrated rule: a copy of ``table`` (from :func:`parity_kit.compare` or
    :func:`parity_kit.compare_live`) whose ``floor``, ``floor_ratio`` and ``verdict`` judge the free error against
    the calibrated free floor (never below ``rounding_floor``, the one-rounding floor, which stays as it was),
    with ``floor_kind`` "calibrated" where ``floor`` measured the row; ``own_rel_rms`` (the module's own error,
    from ``own``, a :func:`parity_kit.local_vs_propagated` table), ``own_floor``, ``own_floor_ratio``;
    ``diagnosis`` (see the module docstring) and ``own_cause``: ``causes[module]`` for a culprit whose cause
    was measured, "contains <module>" for a module holding an innermost culprit of the same call.

    >>> t = pd.DataFrame({"module": ["a"], "cand_module": ["a"], "call": [0], "tensor": ["output"], "status": ["ok"],
    ...                   "rel_rms": [6e-3], "rounding_floor": [2e-3], "floor": [2e-3], "nonfinite": [0]})
    >>> f = Floor(("fp32", "bf16"), components={"rounding": FloorComponent("rounding", "", {("a", 0, "output"): 5e-3})})
    >>> apply_floor(t, f)[["floor", "verdict", "floor_kind", "diagnosis"]].values.tolist()
    [[0.005, 'within floor', 'calibrated', 'consistent with rounding']]
    """
    tolerance = check_tolerance(tolerance)
    require_table(table, "apply_floor")
    if floor is not None and not isinstance(floor, Floor):
        raise ParityKitError(f"floor must be a Floor (from pk.calibrate_floor) or None, got {type(floor).__name__} "
                             f"{floor!r:.40}")
    out = table.copy()
    for column in ("rounding_floor", "floor_ratio", "own_rel_rms", "own_floor", "own_floor_ratio"):
        if column not in out.columns:
            out[column] = out["floor"] if column == "rounding_floor" else math.nan
    for column in ("verdict", "floor_kind", "diagnosis", "own_cause"):
        out[column] = out[column].astype(object) if column in out.columns else None
    own_values = own_errors_by_row(own) if own is not None else {}
    metric = floor.metric if floor is not None else "rel_rms"
    if metric != "rel_rms":
        raise ParityKitError(f"the Floor is in {metric!r}; comparison tables judge rel_rms: calibrate with rel_rms")
    for index, row in out.iterrows():
        one = float(row["rounding_floor"])
        if row["status"] != "ok" or math.isnan(one):
            continue
        free_floor, own_floor, kind = one, one, "one rounding"
        if floor is not None:
            name = row["module"] if floor.keyed_by == "reference" else without_label(row["cand_module"])
            key = (name, int(row["call"]), row["tensor"])
            calibrated_free = first_known(floor.free, key)
            if not math.isnan(calibrated_free):
                free_floor, kind = max(one, calibrated_free), "calibrated"
            calibrated_own = first_known(floor.own, key)
            if not math.isnan(calibrated_own):
                own_floor = max(one, calibrated_own)
        own_key = (row["module"], without_label(row["cand_module"]), int(row["call"]), row["tensor"])
        own_error = first_known(lambda k: own_values.get(k, math.nan), own_key)
        rel = float(row["rel_rms"])
        out.at[index, "floor"] = free_floor
        out.at[index, "floor_ratio"] = floor_ratio(rel, free_floor)
        out.at[index, "verdict"] = verdict(rel, free_floor, tolerance)
        out.at[index, "floor_kind"] = kind
        out.at[index, "own_rel_rms"] = own_error
        out.at[index, "own_floor"] = own_floor if not math.isnan(own_error) else math.nan
        own_ratio = floor_ratio(own_error, own_floor)
        out.at[index, "own_floor_ratio"] = own_ratio
        broken = int(row.get("nonfinite", 0) or 0) > 0 or not math.isfinite(rel)
        out.at[index, "diagnosis"] = NOT_FINITE if broken else diagnose(floor_ratio(rel, free_floor), own_ratio,
                                                                        tolerance)
    _mark_causes(out, causes or {})
    return out


def _mark_causes(table: pd.DataFrame, causes: Mapping[str, str]) -> None:
    """Fill ``own_cause``: the measured cause of an innermost culprit, "contains X" for its ancestors."""
    own_rows = table[table["diagnosis"] == OWN]
    innermost = set(innermost_culprits(own_rows["module"]))
    for index, row in own_rows.iterrows():
        module = row["module"]
        if module in innermost:
            table.at[index, "own_cause"] = causes.get(module)
            continue
        inner = sorted(m for m in innermost if m != module and _is_inside(m, module)
                       and ((own_rows["module"] == m) & (own_rows["call"] == row["call"])).any())
        table.at[index, "own_cause"] = f"contains {inner[0]}" if inner else causes.get(module)


def innermost_culprits(modules: Iterable[str]) -> list[str]:
    """The modules (in order, once each) that hold no other of ``modules`` inside them.

    >>> innermost_culprits(["model.layers.1.mlp.down_proj", "model.layers.1.mlp", "model.layers.1"])
    ['model.layers.1.mlp.down_proj']
    """
    names = list(dict.fromkeys(modules))
    return [m for m in names if not any(o != m and _is_inside(o, m) for o in names)]


def culprits(table: pd.DataFrame, top: int | None = None) -> pd.DataFrame:
    """The innermost modules whose own error is above their floor, largest own error over its floor first: one
    row per module (its worst call and tensor), with ``module, cand_module, call, tensor, own_rel_rms, own_floor,
    own_floor_ratio, own_cause``. Empty when every module computes like the reference (or nothing was judged).

    >>> t = pd.DataFrame({"module": ["a.x", "a"], "cand_module": ["a.x", "a"], "call": [0, 0], "tensor": "output",
    ...                   "own_rel_rms": [0.1, 0.05], "own_floor": [1e-3, 1e-3], "own_floor_ratio": [100.0, 50.0],
    ...                   "own_cause": [None, "contains a.x"], "diagnosis": [OWN, OWN]})
    >>> culprits(t)["module"].tolist()
    ['a.x']
    """
    columns = ["module", "cand_module", "call", "tensor", "own_rel_rms", "own_floor", "own_floor_ratio", "own_cause"]
    require_table(table, "culprits")
    if "diagnosis" not in table.columns:
        return pd.DataFrame(columns=columns)
    own_rows = table[table["diagnosis"] == OWN]
    inner = set(innermost_culprits(own_rows["module"]))
    picked = own_rows[own_rows["module"].isin(inner)]
    if picked.empty:
        return pd.DataFrame(columns=columns)
    worst = picked.loc[picked.groupby("module", sort=False)["own_floor_ratio"].idxmax()]
    ranked = worst.sort_values("own_floor_ratio", ascending=False, kind="stable")[columns].reset_index(drop=True)
    return ranked.head(top) if top is not None else ranked


def run_verdict(table: pd.DataFrame) -> dict[str, Any]:
    """The verdict on a whole judged table, with the figures behind it. In order of precedence:

    - "not comparable": no comparable row; "not judged": no diagnosis (a plain compare table, see
      :func:`apply_floor`); "not finite": the candidate produced NaN/Inf;
    - "computes differently": a culprit whose own error stays above its floor when recomputed in fp64 (a bug,
      or a deliberate change); "own error above floor": culprits whose cause was not measured;
    - "precision-sensitive": every culprit computes the reference's function, but some free-run error is above
      its floor: the ``precision_sensitive`` modules lose more than rounding explains and the run shows it;
    - "above floor": free errors above the floor that no measured own error explains;
    - "healthy": every free-run error is within its floor and no module computes differently. Modules listed
      in ``precision_sensitive`` then amplify rounding without lifting the run above its floor.

    >>> t = pd.DataFrame({"module": ["a", "b"], "status": "ok", "diagnosis": [CONSISTENT, INHERITED],
    ...                   "verdict": ["within floor", "above floor ×3"]})
    >>> v = run_verdict(t); v["verdict"], v["n_modules_consistent"], v["n_modules"]
    ('above floor', 1, 2)
    """
    require_table(table, "run_verdict")
    ok = table[table["status"] == "ok"] if "status" in table.columns else table
    if "diagnosis" not in ok.columns:
        ok = ok.assign(diagnosis=None)
    judged = ok[ok["diagnosis"].notna()]
    by_diagnosis = module_diagnosis_counts(judged)
    found = culprits(table)
    causes = found["own_cause"].tolist()
    sensitive = [m for m, c in zip(found["module"], causes) if c == PRECISION_SENSITIVE]
    free_above = bool((judged["verdict"] != "within floor").any()) if "verdict" in judged.columns else False
    if ok.empty:
        outcome = "not comparable"
    elif judged.empty:
        outcome = "not judged"
    elif (judged["diagnosis"] == NOT_FINITE).any():
        outcome = NOT_FINITE
    elif any(c == COMPUTES_DIFFERENTLY for c in causes):
        outcome = COMPUTES_DIFFERENTLY
    elif any(c != PRECISION_SENSITIVE for c in causes):
        outcome = OWN
    elif free_above:
        outcome = PRECISION_SENSITIVE if sensitive else ABOVE
    else:
        outcome = "healthy"
    return {"verdict": outcome, "n_modules": sum(by_diagnosis.values()), "n_modules_consistent": by_diagnosis[CONSISTENT],
            "n_modules_by_diagnosis": by_diagnosis,
            "culprits": found["module"].tolist(), "culprit_causes": causes,
            "culprit_own_floor_ratios": [float(v) for v in found["own_floor_ratio"]],
            "precision_sensitive": sensitive,
            "n_rows_by_diagnosis": {d: int((judged["diagnosis"] == d).sum()) for d in DIAGNOSES}}


#: a module with rows of several diagnoses is counted under the first of these it has
_SEVERITY = (NOT_FINITE, OWN, ABOVE, INHERITED, CONSISTENT)


def module_diagnosis_counts(table: pd.DataFrame) -> dict[str, int]:
    """How many modules of a judged table read each diagnosis, each module once, under its most severe row (not
    finite, own error above floor, above floor, inherited, consistent with rounding).

    >>> t = pd.DataFrame({"module": ["a", "a", "b"], "diagnosis": [CONSISTENT, INHERITED, CONSISTENT]})
    >>> module_diagnosis_counts(t)[INHERITED], module_diagnosis_counts(t)[CONSISTENT]
    (1, 1)
    """
    judged = table[table["diagnosis"].notna()] if "diagnosis" in table.columns else table.iloc[:0]
    worst = judged.groupby("module", sort=False)["diagnosis"].agg(
        lambda d: next((s for s in _SEVERITY if (d == s).any()), CONSISTENT))
    return {d: int((worst == d).sum()) for d in DIAGNOSES}


_FIGURE_NAMES = {CONSISTENT: "consistent", OWN: "own_error_above_floor", INHERITED: "inherited",
                 ABOVE: "above_floor", NOT_FINITE: "not_finite"}


def verdict_figures(judgement: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The numbers of a :func:`run_verdict` for a findings file, each name after ``prefix``: the modules judged,
    how many read each diagnosis (``n_modules_consistent``, ``n_modules_inherited``, ...), the share consistent
    with rounding, the culprits by cause and their own error over the floor (names and the verdict itself go in
    the conclusion's text: findings hold numbers).

    >>> t = pd.DataFrame({"module": ["a", "b"], "status": "ok", "diagnosis": [CONSISTENT, INHERITED],
    ...                   "verdict": ["within floor", "above floor ×3"]})
    >>> f = verdict_figures(run_verdict(t), "fp16_"); f["fp16_n_modules_inherited"], f["fp16_share_modules_consistent"]
    (1, 0.5)
    """
    counts = judgement.get("n_modules_by_diagnosis", {})
    n = int(judgement.get("n_modules", 0))
    causes = list(judgement.get("culprit_causes", []))
    out: dict[str, Any] = {"n_modules": n}
    out.update({f"n_modules_{_FIGURE_NAMES[d]}": int(counts.get(d, 0)) for d in DIAGNOSES})
    out.update({
        "share_modules_consistent": counts.get(CONSISTENT, 0) / n if n else None,
        "n_culprits": len(causes),
        "n_computes_differently": sum(c == COMPUTES_DIFFERENTLY for c in causes),
        "n_precision_sensitive": sum(c == PRECISION_SENSITIVE for c in causes),
        "culprit_own_floor_ratios": [float(r) for r in judgement.get("culprit_own_floor_ratios", [])],
    })
    return {f"{prefix}{k}": v for k, v in out.items()}


def describe_verdict(judgement: Mapping[str, Any], label: str) -> str:
    """One sentence of a :func:`run_verdict`: what ``label`` (the candidate run) is, and on which figures.

    >>> t = pd.DataFrame({"module": ["a"], "status": "ok", "diagnosis": [CONSISTENT], "verdict": ["within floor"]})
    >>> describe_verdict(run_verdict(t), "bf16")
    'bf16 is healthy: every error is within its calibrated floor and no module computes differently (1 of 1 modules are consistent with rounding).'
    """
    j = judgement
    verdict_name = str(j.get("verdict", "not judged"))
    consistent = f"{j.get('n_modules_consistent', 0)} of {j.get('n_modules', 0)} modules are consistent with rounding"
    named = ", ".join(f"{m} (own error ×{r:.3g} its floor)"
                      for m, r in zip(j.get("culprits", [])[:3], j.get("culprit_own_floor_ratios", [])[:3]))
    sensitive = ", ".join(j.get("precision_sensitive", [])[:3])
    if verdict_name == "healthy":
        if not sensitive:
            return (f"{label} is healthy: every error is within its calibrated floor and no module computes "
                    f"differently ({consistent}).")
        one = len(j.get("precision_sensitive", [])[:3]) == 1
        return (f"{label} is healthy: every free-run error is within its calibrated floor and no module computes "
                f"differently ({consistent}); {sensitive} {'has' if one else 'have'} own error above "
                f"{'its' if one else 'their'} floor, more than rounding at {'its' if one else 'their'} boundaries "
                "explains (within the floor when recomputed in fp64), without lifting the run above its floor.")
    if verdict_name == COMPUTES_DIFFERENTLY:
        return (f"{label} computes differently from the reference at {named}: the own error stays above the floor "
                f"when the module computes in fp64, so it is a bug or a deliberate change; {consistent}.")
    if verdict_name == PRECISION_SENSITIVE:
        return (f"{label} computes the reference's function but loses precision at {named}: within the floor "
                f"when recomputed in fp64, above it in the run; {consistent}.")
    if verdict_name == OWN:
        return f"{label} has modules whose own error is above their floor: {named}; {consistent}."
    if verdict_name == ABOVE:
        return f"{label} has errors above the calibrated floor that no module's own error explains; {consistent}."
    if verdict_name == NOT_FINITE:
        return f"{label} produces NaN/Inf; {consistent}."
    return f"{label}: {verdict_name}."


def verdict_summary(judged: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per judged table (``{label: table}``, e.g. :attr:`parity_kit.ModelComparison.table`): the run's
    verdict, how many modules read each diagnosis, and the culprits with their causes.

    >>> t = pd.DataFrame({"module": ["a"], "status": "ok", "diagnosis": [CONSISTENT], "verdict": ["within floor"]})
    >>> verdict_summary({"bf16 vs fp32": t})[["verdict", "modules", "consistent with rounding"]].values.tolist()
    [['healthy', 1, 1]]
    """
    if not isinstance(judged, Mapping) or not judged:
        raise ParityKitError("verdict_summary takes {label: judged table} (e.g. {'bf16': result.table}), "
                             f"got {type(judged).__name__}")
    rows = []
    for label, table in judged.items():
        j = run_verdict(table)
        rows.append({"comparison": label, "verdict": j["verdict"], "modules": j["n_modules"],
                     **j["n_modules_by_diagnosis"],
                     "culprits": ", ".join(f"{m} ({c or 'cause not measured'})"
                                           for m, c in zip(j["culprits"], j["culprit_causes"])) or "none"})
    return pd.DataFrame(rows).set_index("comparison")


def dtype_pair(ref_dtype: DtypeLike, cand_dtype: DtypeLike) -> tuple[str, str]:
    """The two runs' dtypes as names, for :attr:`Floor.dtypes`."""
    return dtype_name(parse_dtype(ref_dtype)), dtype_name(parse_dtype(cand_dtype))
