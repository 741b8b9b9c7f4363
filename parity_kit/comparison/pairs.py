"""Pair by pair: the rows of a comparison table and the reductions behind them, shared by
:func:`parity_kit.compare` (two recordings) and :func:`parity_kit.compare_live` (two running models).

A floating pair becomes a :class:`PairJob`; a :class:`PairReducer` queues each job's fused reductions where its
tensors live and reads all results back in few transfers; :func:`fill_row` turns the reductions into the
row's metrics and its floor, ratio and verdict (by the rule of :mod:`parity_kit.comparison.floor`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..dtypes import parse_dtype
from ..errors import ParityKitError
from ..recording import Call, Recording
from . import metrics as M
from .floor import floor_for, floor_from_candidate, floor_ratio, unit_dtype
from .mapping import MappingTarget, ModuleMapping


MappingLike = ModuleMapping | Mapping[str, str] | Callable[[str], "str | None"] | None


COLUMNS = ["order", "module", "cand_module", "call", "tensor", "shape", "ref_dtype", "cand_dtype",
           "max_abs", "mean_abs", "rel_rms", "cosine", "sqnr_db", "max_ulp", "floor", "floor_ratio",
           "verdict", "status", "nonfinite",
           # ULPs per value (sign flips near zero dominate it), the one-rounding floor, and the calibrated
           # judgement that parity_kit.comparison.floor.apply_floor fills in (NaN / None until then)
           "max_ulp_raw", "rounding_floor", "floor_kind", "own_rel_rms", "own_floor", "own_floor_ratio",
           "diagnosis", "own_cause"]


METRICS = ("max_abs", "mean_abs", "rel_rms", "cosine", "sqnr_db", "max_ulp", "max_ulp_raw", "floor_ratio",
           "own_rel_rms", "own_floor_ratio")


def require_tensors(rec: Recording, role: str) -> None:
    if not isinstance(rec, Recording):
        raise ParityKitError(f"{role} must be a parity_kit.Recording, got {type(rec).__name__}")
    if rec.mode != "tensors":
        raise ParityKitError(
            f"the {role} recording was captured with mode='stats'; compare() needs the tensors, so "
            "capture it with mode='tensors' (use a narrower modules= pattern if memory is short)"
        )


def require_calls(rec: Recording, role: str) -> None:
    """ParityKitError for a recording without calls: comparing it would give an empty table and no word."""
    if not len(rec):
        raise ParityKitError(
            f"the {role} recording is empty (no call was captured): the model did not run inside its "
            "`with record(...)` block, or modules= selected modules the forward never called"
        )


def incomplete(rec: Recording) -> bool:
    """Whether ``rec`` comes from a ``record()`` block that raised (its metadata says ``complete: False``)."""
    return rec.metadata.get("complete") is False


def mark_incomplete(table: Any, ref: Recording, cand: Recording) -> None:
    """Replace "ok" by "incomplete reference/candidate/runs" where a recording's block raised, so a table
    of an interrupted run cannot pass for a complete comparison."""
    which = [role for role, rec in (("reference", ref), ("candidate", cand)) if incomplete(rec)]
    if which:
        status = f"incomplete {which[0]}" if len(which) == 1 else "incomplete runs"
        table.loc[table["status"] == "ok", "status"] = status


INCOMPLETE = ("incomplete reference", "incomplete candidate", "incomplete runs")


def leaf_filter(tensors: str | Sequence[str]) -> Callable[[str], bool]:
    if tensors == "outputs":
        return lambda leaf: leaf == "output" or leaf.startswith("output.")
    if tensors == "all":
        return lambda leaf: True
    if isinstance(tensors, Sequence) and not isinstance(tensors, str):
        wanted = set(tensors)
        return lambda leaf: leaf in wanted
    raise ParityKitError(f"tensors={tensors!r}: use 'outputs', 'all' or a list of leaf names like ['output.0']")


def is_output(leaf: str) -> bool:
    return leaf == "output" or leaf.startswith("output.")


def nonfinite_count(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0


def empty_row(order: int | None, module: str, cand_module: str | None, call: int, leaf: str, status: str,
         shape: Any = None, ref_dtype: str | None = None, cand_dtype: str | None = None) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS, math.nan)
    row.update(order=order, module=module, cand_module=cand_module, call=call, tensor=leaf, shape=shape,
               ref_dtype=ref_dtype, cand_dtype=cand_dtype, verdict=None, status=status, nonfinite=0,
               floor_kind=None, diagnosis=None, own_cause=None)
    return row


def target_name(target: MappingTarget) -> str:
    return target.cand if target.label is None else f"{target.cand} [{target.label}]"


def compare_leaf(call: Call, leaf: str, ref_t: torch.Tensor, target: MappingTarget,
                  cand_calls: dict[tuple[str, int], Call], used: set[tuple[str, int, str]],
                  tolerance: float, jobs: list[PairJob]) -> dict[str, Any]:
    ref_dtype = call.orig_dtype(leaf)
    name = target_name(target)
    other = cand_calls.get((target.cand, call.index))
    cand_leaf = matching_leaf(leaf, other) if other is not None else None
    if cand_leaf is None:
        return empty_row(call.order, call.module, name, call.index, leaf, "missing in candidate",
                    tuple(ref_t.shape), ref_dtype)
    used.add((target.cand, call.index, cand_leaf))
    cand_t = other.tensors[cand_leaf]
    cand_dtype = other.orig_dtype(cand_leaf)
    if target.transform is not None and is_output(leaf):
        try:
            ref_t = target.transform(ref_t)
        except ParityKitError:
            raise
        except Exception as e:  # a user transform failing on this tensor is a mapping problem
            raise ParityKitError(
                f"mapping transform for {call.module!r} -> {name!r} failed on leaf {leaf!r} with shape "
                f"{tuple(ref_t.shape)}: {type(e).__name__}: {e}; fix the transform or the rule"
            ) from None
    if ref_t.shape != cand_t.shape:
        row = empty_row(call.order, call.module, name, call.index, leaf, "shape mismatch",
                   f"{tuple(ref_t.shape)} vs {tuple(cand_t.shape)}", ref_dtype, cand_dtype)
        row["nonfinite"] = nonfinite_count(cand_t)
        return row
    row = empty_row(call.order, call.module, name, call.index, leaf, "ok", tuple(ref_t.shape), ref_dtype, cand_dtype)
    if ref_t.is_floating_point() and cand_t.is_floating_point():
        jobs.append(PairJob(row, ref_t, cand_t, unit_dtype(ref_dtype, cand_dtype),
                            floor_from_candidate(ref_dtype, cand_dtype)))
        return row
    # integer leaves (token ids, positions): exact values, so no floor and no ULP unit
    values = {**M.all_metrics(ref_t.double(), cand_t.double()), "max_ulp": math.nan, "max_ulp_raw": math.nan,
              "floor": 0.0, "nonfinite": nonfinite_count(cand_t)}
    fill_row(row, values, tolerance)
    return row


def fill_row(row: dict[str, Any], values: dict[str, float], tolerance: float) -> None:
    """Write a pair's metrics into its row, with the floor chosen by the rule and the verdict against it."""
    floor = values["floor"]
    if row["ref_dtype"] is not None and _floating(row["ref_dtype"]) and _floating(row["cand_dtype"]):
        floor = floor_for(floor, row["ref_dtype"], row["cand_dtype"])
    row.update(values)
    row["floor"] = row["rounding_floor"] = floor
    row["floor_kind"] = "one rounding"
    rel = values["rel_rms"]
    row["floor_ratio"] = floor_ratio(rel, floor)
    row["verdict"] = M.verdict(rel, floor, tolerance)
    row["nonfinite"] = int(values["nonfinite"])


def matching_leaf(leaf: str, other: Call) -> str | None:
    """The candidate's leaf for a reference leaf: the same name, or, for the primary output, the other
    side's primary output when one implementation returns a tensor and the other a tuple
    (InternLM2's attention returns ``output``, Llama's ``(output.0, weights)``)."""
    if leaf in other.tensors:
        return leaf
    primary = {"output", "output.0"}
    if leaf in primary:
        return next((name for name in ("output", "output.0") if name in other.tensors), None)
    return None


def _floating(dtype: Any) -> bool:
    try:
        return parse_dtype(dtype).is_floating_point
    except ParityKitError:  # integer leaves
        return False


@dataclass
class PairJob:
    """A comparable floating pair whose metrics are still to be computed into ``row``."""

    row: dict[str, Any]
    ref: torch.Tensor | None
    cand: torch.Tensor | None
    dtype: torch.dtype              # the ULP unit and one-rounding dtype: the narrower of the two runs'
    floor_from_candidate: bool = False  # the candidate is the wider run: the floor rounds it, not the reference


_compiled_reductions: Callable[..., torch.Tensor] | None = None
_compile_failed = False


def _reduce(ref: torch.Tensor, cand: torch.Tensor, dtype: torch.dtype, from_candidate: bool) -> torch.Tensor:
    """:func:`metrics.pair_reductions`, through torch.compile on CUDA when PARITY_KIT_COMPILE=1."""
    global _compiled_reductions, _compile_failed
    # opt-in: in benchmarks/results/compare_throughput_h200.json the compiled torch path gives the eager
    # path's numbers but takes 0.117 s where the fused Triton kernel takes 0.030 s
    if ref.is_cuda and not _compile_failed and os.environ.get("PARITY_KIT_COMPILE", "0") == "1":
        try:
            if _compiled_reductions is None:
                _compiled_reductions = torch.compile(M.pair_reductions, dynamic=True)
            return _compiled_reductions(ref.reshape(-1), cand.reshape(-1), dtype, floor_from_candidate=from_candidate)
        except Exception as e:  # a missing compiler or an unsupported op: the eager path gives the same numbers
            _compile_failed = True
            warnings.warn(f"torch.compile of the comparison kernels failed ({type(e).__name__}: {e}); "
                          "comparing eagerly (same results, slower)", RuntimeWarning, stacklevel=3)
    return M.pair_reductions(ref, cand, dtype, floor_from_candidate=from_candidate)


class PairReducer:
    """Queues the reduction of each pair where it should run; reads the results back in batches.

    ``device`` None reduces a pair where its reference tensor lives. After ``chunk`` bytes were moved
    to the device the queued results are read back (one transfer per device), which bounds what is
    queued; otherwise everything is read back once, by :meth:`finish`.
    """

    def __init__(self, device: torch.device | None, chunk: int | None, tolerance: float):
        self.device, self.chunk, self.tolerance = device, chunk, tolerance
        self.queued: list[tuple[PairJob, torch.Tensor]] = []
        self.moved = 0

    def add(self, job: PairJob) -> None:
        where = self.device if self.device is not None else job.ref.device
        ref_t, cand_t = job.ref, job.cand
        if ref_t.device != where:
            self.moved += ref_t.numel() * ref_t.element_size()
            ref_t = ref_t.to(where, non_blocking=True)
        if cand_t.device != where:
            self.moved += cand_t.numel() * cand_t.element_size()
            cand_t = cand_t.to(where, non_blocking=True)
        values = _reduce(ref_t, cand_t, job.dtype, job.floor_from_candidate)
        job.ref = job.cand = None  # the queued reduction keeps what it needs: let the tensors go
        self.queued.append((job, values))
        if self.chunk is not None and self.moved >= self.chunk:
            self.finish()

    def finish(self) -> None:
        by_device: dict[torch.device, list[tuple[PairJob, torch.Tensor]]] = {}
        for job, values in self.queued:
            by_device.setdefault(values.device, []).append((job, values))
        for items in by_device.values():
            table = torch.stack([v for _, v in items]).cpu().tolist()  # one transfer per device
            for (job, _), values in zip(items, table):
                fill_row(job.row, M.metrics_from_reductions(values, job.dtype), self.tolerance)
        self.queued.clear()
        self.moved = 0


def run_jobs(jobs: list[PairJob], device: torch.device | None, chunk: int | None, tolerance: float) -> None:
    reducer = PairReducer(device, chunk, tolerance)
    for job in jobs:
        reducer.add(job)
    reducer.finish()
