"""The execution floor: how much two runs of *one* configuration differ because of how they were executed.

Two runs disagree for reasons that are not the model's dtype at all: kernels that reduce in a different order
from one call to the next (atomics, split-K heuristics), a prompt decoded alone or in a batch (other matrix
shapes, padding, other reduction lengths), TF32 or deterministic algorithms switched on a GPU. An
:class:`ExecutionFloor` holds, per (module, call, tensor), the largest rel_rms measured between repeated runs of
one configuration, by source (measured by :func:`parity_kit.execution_floor`):

- ``run_to_run``: the same input, alone, run again;
- ``batch``: the same input at the first and last slot of batches of other sizes, padded left and right;
- ``kernel_settings``: on a GPU, TF32 and deterministic algorithms toggled.

:func:`apply_execution_floor` judges a comparison table against the floors cumulatively, so the verdict says
which source is enough to explain a row: "within rounding floor", "within run-to-run noise", "within batch
variance", "within kernel-setting variance", or "above every floor ×N" (N = the error over the sum in
quadrature of every floor, the sources being independent).

>>> import pandas as pd
>>> floor = ExecutionFloor(dtype="bf16", device="cpu", floors={"run_to_run": {("a", 0, "output"): 0.0},
...                        "batch": {("a", 0, "output"): 4e-3, ("b", 0, "output"): 4e-3}})
>>> t = pd.DataFrame({"module": ["a", "b"], "cand_module": ["a", "b"], "call": 0, "tensor": "output",
...                   "status": "ok", "rel_rms": [5e-3, 1.0], "floor": [1e-3, 1e-3]})
>>> apply_execution_floor(t, floor)["verdict"].tolist()
['within batch variance', 'above every floor ×240']
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd

from ..errors import ParityKitError
from .floor import FloorComponent, RowKey, check_tolerance, first_known, without_label
from .metrics import verdict

#: The sources of an execution floor, in the order a verdict adds them.
SOURCES = ("run_to_run", "batch", "kernel_settings")
WITHIN = {"rounding": "within rounding floor", "run_to_run": "within run-to-run noise",
          "batch": "within batch variance", "kernel_settings": "within kernel-setting variance"}
#: Verdicts of rows that rounding or execution alone explains.
EXECUTION_NOISE = tuple(WITHIN.values())


@dataclass(frozen=True)
class ExecutionFloor:
    """Per source (:data:`SOURCES`), the largest rel_rms between runs of one configuration, per (module, call,
    tensor) of the model it was measured on (``keyed_by``: whose names a table matches it by, "reference" or
    "candidate"). ``contexts`` lists the executions that were compared, ``skipped`` the ones that could not run
    here and why."""

    dtype: str
    device: str
    floors: Mapping[str, Mapping[RowKey, float]]
    keyed_by: str = "candidate"
    contexts: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()
    model: str = ""
    metadata: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.floors) - set(SOURCES))
        if unknown:
            raise ParityKitError(f"ExecutionFloor sources {unknown} are unknown; use {list(SOURCES)}")
        if self.keyed_by not in ("reference", "candidate"):
            raise ParityKitError(f"ExecutionFloor.keyed_by={self.keyed_by!r}: use 'reference' or 'candidate'")

    def value(self, source: str, key: RowKey) -> float:
        """The floor of one source for one row (NaN where it was not measured; ``output`` and ``output.0`` name
        the same primary output)."""
        values = self.floors.get(source, {})
        return first_known(lambda k: float(values.get(k, math.nan)), key)

    def components(self) -> list[FloorComponent]:
        """The sources as free-floor components of a calibrated :class:`parity_kit.Floor`."""
        return [FloorComponent(source, WITHIN[source], dict(values)) for source, values in self.floors.items()]

    def to_frame(self) -> pd.DataFrame:
        """One row per (module, call, tensor), a column per source."""
        keys = sorted({k for values in self.floors.values() for k in values}, key=str)
        return pd.DataFrame([{"module": m, "call": c, "tensor": t,
                              **{source: self.value(source, (m, c, t)) for source in SOURCES if source in self.floors}}
                             for m, c, t in keys])


def _row_key(row: pd.Series, keyed_by: str) -> RowKey:
    name = row["module"] if keyed_by == "reference" else without_label(row.get("cand_module", row["module"]))
    return (str(name), int(row["call"]), str(row["tensor"]))


def execution_verdict(error: float, rounding: float, floors: Mapping[str, float], tolerance: float = 2.0) -> str:
    """The first cumulative floor (rounding, then each source in :data:`SOURCES` order) that explains ``error``.

    >>> execution_verdict(3e-3, 1e-3, {"run_to_run": 2e-3}), execution_verdict(1.0, 1e-3, {"run_to_run": 0.0})
    ('within run-to-run noise', 'above every floor ×1000')
    """
    if math.isnan(error):
        return "not finite"
    squares = rounding * rounding if math.isfinite(rounding) else 0.0
    if error <= tolerance * math.sqrt(squares):
        return WITHIN["rounding"]
    for source in SOURCES:
        value = floors.get(source, math.nan)
        if math.isnan(value):
            continue
        squares += value * value
        if error <= tolerance * math.sqrt(squares):
            return WITHIN[source]
    return verdict(error, math.sqrt(squares), tolerance).replace("above floor", "above every floor")


def apply_execution_floor(table: pd.DataFrame, floor: ExecutionFloor, *, tolerance: float = 2.0) -> pd.DataFrame:
    """A copy of a comparison table with a column per measured source (``run_to_run_floor``, ``batch_floor``,
    ``kernel_settings_floor``), ``execution_floor`` (their sum in quadrature) and ``verdict`` judged cumulatively
    (module docstring). ``floor`` (the rounding floor of the row) is kept; rows the execution floor did not
    measure keep their verdict.
    """
    if not isinstance(floor, ExecutionFloor):
        raise ParityKitError(f"execution_floor must be an ExecutionFloor (from pk.execution_floor), got "
                             f"{type(floor).__name__}")
    tolerance = check_tolerance(tolerance)
    missing = {"module", "call", "tensor", "status", "rel_rms", "floor"} - set(table.columns)
    if missing:
        raise ParityKitError(f"the table lacks {sorted(missing)}; pass a table from pk.compare or pk.compare_live")
    out = table.copy()
    sources = [s for s in SOURCES if s in floor.floors]
    columns = {s: [] for s in sources}
    combined, verdicts = [], []
    for _, row in out.iterrows():
        key = _row_key(row, floor.keyed_by)
        values = {s: floor.value(s, key) for s in sources}
        for s in sources:
            columns[s].append(values[s])
        known = [v for v in values.values() if not math.isnan(v)]
        combined.append(math.sqrt(sum(v * v for v in known)) if known else math.nan)
        measured = row["status"] == "ok" and known
        verdicts.append(execution_verdict(float(row["rel_rms"]), float(row["floor"]), values, tolerance)
                        if measured else row.get("verdict"))
    for s in sources:
        out[f"{s}_floor"] = columns[s]
    out["execution_floor"] = combined
    out["verdict"] = pd.Series(verdicts, index=out.index, dtype=object)
    return out
