"""Queries of a comparison table and of recordings: the first divergence, the first NaN/Inf, the error per token."""

from __future__ import annotations

import math
import numbers
from typing import Any

import pandas as pd
import torch

from ..errors import ParityKitError
from ..recording import Recording, TensorStats
from .execution import EXECUTION_NOISE
from .floor import DIAGNOSES
from .mapping import ModuleMapping
from .pairs import INCOMPLETE, METRICS, MappingLike, is_output, require_tensors


_LOWER_IS_WORSE = {"cosine", "sqnr_db"}


def first_divergence(table: pd.DataFrame, metric: str = "rel_rms", threshold: float = 1e-2, *,
                     diagnosis: str | None = None, skip_execution_noise: bool = False) -> pd.Series | None:
    """The first "ok" row, in table (execution) order, whose ``metric`` crosses ``threshold``.

    Crossing means above for distances (rel_rms, max_abs, mean_abs, max_ulp, floor_ratio, own_rel_rms,
    own_floor_ratio) and below for similarities (cosine, sqnr_db); a NaN metric counts as crossed, except an
    own error, which is NaN where it was not measured. Search by own error on a calibrated table
    (:func:`parity_kit.compare_models`, :func:`parity_kit.comparison.floor.apply_floor`) with
    ``metric="own_floor_ratio", threshold=2``, or by judgement with ``diagnosis="own error above floor"``
    (the first row with that diagnosis; ``metric`` and ``threshold`` are then not used). None if no row crosses;
    ParityKitError when nothing could be compared (an empty table, no "ok" row: a forgotten mapping or an
    interrupted run) or ``threshold`` is not a number, since "no divergence" would then be a wrong answer.
    ``skip_execution_noise=True`` skips rows a table judged against an execution floor (``pk.compare(...,
    execution_floor=...)``) finds within one of its floors (rounding, run-to-run noise, batch variance, kernel settings).

    >>> t = pd.DataFrame({"module": ["a", "b", "c"], "rel_rms": [1e-4, 5e-2, 1.0], "status": "ok",
    ...                   "diagnosis": ["consistent with rounding", "inherited", "own error above floor"]})
    >>> first_divergence(t)["module"], first_divergence(t, diagnosis="own error above floor")["module"]
    ('b', 'c')
    """
    ok = _comparable_rows(table)
    if skip_execution_noise:
        if "execution_floor" not in table.columns:
            raise ParityKitError("skip_execution_noise=True needs a table judged against an execution floor: "
                                 "pk.compare(ref, cand, execution_floor=pk.execution_floor(...))")
        ok = ok[~ok["verdict"].isin(EXECUTION_NOISE)]
    if diagnosis is not None:
        if diagnosis not in DIAGNOSES:
            raise ParityKitError(f"diagnosis={diagnosis!r} is not one of {list(DIAGNOSES)}")
        if "diagnosis" not in table.columns or table["diagnosis"].isna().all():
            raise ParityKitError("the table has no diagnosis: judge it first (pk.compare_models, or "
                                 "parity_kit.comparison.floor.apply_floor on a compare table)")
        hits = ok[ok["diagnosis"] == diagnosis]
        return None if hits.empty else hits.iloc[0]
    if metric not in table.columns:
        raise ParityKitError(f"metric {metric!r} is not a column of the table; use one of {list(METRICS)}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        raise ParityKitError(f"threshold={threshold!r} is not a number, so no row could cross it; pass a float, "
                             "e.g. threshold=1e-2 for rel_rms or threshold=2 for floor_ratio")
    values = ok[metric].astype(float)
    crossed = (values < threshold) if metric in _LOWER_IS_WORSE else (values > threshold)
    if not metric.startswith("own_"):
        crossed |= values.isna()
    hits = ok[crossed]
    return None if hits.empty else hits.iloc[0]


def _comparable_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The "ok" rows of a comparison table; ParityKitError when there are none to search."""
    if not isinstance(table, pd.DataFrame):
        raise ParityKitError(f"first_divergence takes the table compare() returns, got {type(table).__name__}")
    if table.empty:
        raise ParityKitError("the table is empty: nothing was compared, so there is no first divergence to find; "
                             "check that both recordings hold calls and that modules= selected modules that ran")
    if "status" not in table.columns:
        return table
    ok = table[table["status"] == "ok"]
    if ok.empty:
        counts = ", ".join(f"{n} {s}" for s, n in table["status"].value_counts().items())
        hint = ("a recording's block raised part-way: re-record a forward that finishes"
                if table["status"].isin(INCOMPLETE).any() else
                "no row was comparable: pass mapping= (reference -> candidate names, see ModuleMapping.unmatched) "
                "or capture the same modules in both runs")
        raise ParityKitError(f"no row of the table has status 'ok' ({counts}); {hint}")
    return ok


def first_nonfinite(recording_or_table: Recording | pd.DataFrame) -> pd.Series | dict[str, Any] | None:
    """The first place, in execution order, where a NaN or Inf appears.

    For a comparison table: the first row with ``nonfinite > 0`` (a Series). For a recording (either
    mode): a dict ``{module, call, order, tensor, nan, inf}``. None if everything is finite.

    >>> from parity_kit.recording import Call, Recording
    >>> rec = Recording("tensors", [Call("a", 0, 0, {"output": torch.ones(2)}),
    ...                             Call("b", 0, 1, {"output": torch.tensor([1.0, float("inf")])})])
    >>> first_nonfinite(rec)["module"]
    'b'
    """
    if isinstance(recording_or_table, pd.DataFrame):
        if "nonfinite" not in recording_or_table.columns:
            raise ParityKitError("the table has no 'nonfinite' column; pass a table returned by compare()")
        hits = recording_or_table[recording_or_table["nonfinite"] > 0]
        return None if hits.empty else hits.iloc[0]
    if not isinstance(recording_or_table, Recording):
        raise ParityKitError("first_nonfinite takes a Recording or a table returned by compare()")
    for call in recording_or_table.calls:
        for leaf, value in call.tensors.items():
            if isinstance(value, TensorStats):
                nan, inf = value.nan, value.inf
            elif value.is_floating_point():
                nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
            else:
                continue
            if nan or inf:
                return {"module": call.module, "call": call.index, "order": call.order, "tensor": leaf,
                        "nan": nan, "inf": inf}
    return None


def _per_row(metric: str, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    diff = c - r
    if metric == "max_abs":
        return diff.abs().amax(-1)
    if metric == "mean_abs":
        return diff.abs().mean(-1)
    if metric == "rel_rms":
        num, den = diff.square().sum(-1), r.square().sum(-1)
        return torch.where(den > 0, (num / den).sqrt(), torch.where(num > 0, torch.inf, 0.0))
    if metric == "cosine":
        nr, nc = r.norm(dim=-1), c.norm(dim=-1)
        both_zero = (nr == 0) & (nc == 0)
        cos = (r * c).sum(-1) / (nr * nc)
        return torch.where(both_zero, 1.0, torch.where((nr == 0) | (nc == 0), 0.0, cos.clamp(-1, 1)))
    raise ParityKitError(f"per_token_error metric {metric!r}: use 'rel_rms', 'max_abs', 'mean_abs' or 'cosine'")


def per_token_error(ref: Recording, cand: Recording, mapping: MappingLike = None, metric: str = "rel_rms",
                    tensor: str = "output", *, call: int = 0) -> pd.DataFrame:
    """Per-token error: rows are reference modules (execution order), columns token positions.

    Each tensor is viewed as rows of its last dimension (``[..., D] -> [N, D]``, batch and sequence
    flattened, so with batch B and length T column ``b*T + t`` is token t of sequence b) and ``metric``
    is computed per row in fp64. ``tensor`` names the leaf, ``call`` the call index (e.g. a decode
    step). Modules whose leaf is missing, non-floating or of another shape in the candidate are left
    out; a module mapped to several candidates gets one row per target ("name [q]").

    >>> from parity_kit.recording import Call, Recording
    >>> a = Recording("tensors", [Call("m", 0, 0, {"output": torch.ones(1, 2, 4)})])
    >>> b = Recording("tensors", [Call("m", 0, 0, {"output": torch.tensor([[[1.0] * 4, [2.0] * 4]])})])
    >>> per_token_error(a, b).values.tolist()
    [[0.0, 1.0]]
    """
    require_tensors(ref, "reference")
    require_tensors(cand, "candidate")
    mm = ModuleMapping.coerce(mapping)
    cand_calls = {(c.module, c.index): c for c in cand.calls}
    rows: dict[str, list[float]] = {}
    for rcall in ref.calls:
        if rcall.index != call or tensor not in rcall.tensors:
            continue
        targets = mm.targets(rcall.module)
        for target in targets:
            other = cand_calls.get((target.cand, call))
            if other is None or tensor not in other.tensors:
                continue
            r, c = rcall.tensors[tensor], other.tensors[tensor]
            if target.transform is not None and is_output(tensor):
                r = target.transform(r)
            if r.shape != c.shape or r.dim() == 0 or not (r.is_floating_point() and c.is_floating_point()):
                continue
            r64 = r.detach().double().reshape(-1, r.shape[-1])  # [tokens, D]
            c64 = c.detach().double().reshape(-1, c.shape[-1])
            label = rcall.module if len(targets) == 1 else f"{rcall.module} [{target.label or target.cand}]"
            rows[label] = _per_row(metric, r64, c64).tolist()
    if not rows:
        raise ParityKitError(
            f"per_token_error found no module with leaf {tensor!r} at call {call} in both recordings; "
            "check tensor= (e.g. 'output.0' for tuple outputs), call= and the mapping"
        )
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "module"
    frame.columns.name = "position"
    return frame
