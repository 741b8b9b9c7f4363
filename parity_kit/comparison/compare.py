"""Comparison of two recordings: one tidy table row per (module, call, tensor leaf), with noise-floor
verdicts, plus helpers that read that table (first divergence, first non-finite, per-token error).

Sections: table building (``compare``), table queries (``first_divergence``, ``first_nonfinite``),
per-token error (``per_token_error``). Replay-based analyses (local vs propagated) go in their own
section below these.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from . import metrics as M
from .._util.sizes import parse_bytes
from ..dtypes import parse_dtype
from ..errors import ParityKitError
from .mapping import MappingTarget, ModuleMapping
from ..recording import Call, Recording, TensorStats

MappingLike = ModuleMapping | Mapping[str, str] | Callable[[str], "str | None"] | None

COLUMNS = ["order", "module", "cand_module", "call", "tensor", "shape", "ref_dtype", "cand_dtype",
           "max_abs", "mean_abs", "rel_rms", "cosine", "sqnr_db", "max_ulp", "floor", "floor_ratio",
           "verdict", "status", "nonfinite"]
METRICS = ("max_abs", "mean_abs", "rel_rms", "cosine", "sqnr_db", "max_ulp")
_LOWER_IS_WORSE = {"cosine", "sqnr_db"}


# ---------------------------------------------------------------------------------------- table building
def _require_tensors(rec: Recording, role: str) -> None:
    if not isinstance(rec, Recording):
        raise ParityKitError(f"{role} must be a parity_kit.Recording, got {type(rec).__name__}")
    if rec.mode != "tensors":
        raise ParityKitError(
            f"the {role} recording was captured with mode='stats'; compare() needs the tensors, so "
            "capture it with mode='tensors' (use a narrower modules= pattern if memory is short)"
        )


def _leaf_filter(tensors: str | Sequence[str]) -> Callable[[str], bool]:
    if tensors == "outputs":
        return lambda leaf: leaf == "output" or leaf.startswith("output.")
    if tensors == "all":
        return lambda leaf: True
    if isinstance(tensors, Sequence) and not isinstance(tensors, str):
        wanted = set(tensors)
        return lambda leaf: leaf in wanted
    raise ParityKitError(f"tensors={tensors!r}: use 'outputs', 'all' or a list of leaf names like ['output.0']")


def _is_output(leaf: str) -> bool:
    return leaf == "output" or leaf.startswith("output.")


def _nonfinite(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0


def _row(order: int | None, module: str, cand_module: str | None, call: int, leaf: str, status: str,
         shape: Any = None, ref_dtype: str | None = None, cand_dtype: str | None = None) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS, math.nan)
    row.update(order=order, module=module, cand_module=cand_module, call=call, tensor=leaf, shape=shape,
               ref_dtype=ref_dtype, cand_dtype=cand_dtype, verdict=None, status=status, nonfinite=0)
    return row


def _target_name(target: MappingTarget) -> str:
    return target.cand if target.label is None else f"{target.cand} [{target.label}]"


def compare(
    ref: Recording,
    cand: Recording,
    mapping: MappingLike = None,
    *,
    strict: bool = False,
    tensors: str | Sequence[str] = "outputs",
    floor_tolerance: float = 2.0,
    device: str | torch.device | None = None,
    chunk_bytes: int | str | None = "1GiB",
) -> pd.DataFrame:
    """Compare two tensors-mode recordings, aligned by (module through ``mapping``, call index, leaf).

    One row per reference (call, leaf, mapping target) in the reference's execution order, then one
    row per candidate leaf nothing mapped to (``status="missing in reference"``; ``module`` holds the
    candidate name there). ``status`` is "ok", "missing in candidate", "missing in reference" or
    "shape mismatch"; with ``strict=True`` any status but "ok" raises. Metrics are computed in fp64;
    ``floor`` is the rel_rms of rounding the (transformed) reference to the candidate's dtype as the
    model produced it (before any cast on capture), which is also the ULP unit; ``floor_ratio`` is
    rel_rms / floor and ``verdict`` judges rel_rms against ``floor_tolerance × floor``.
    ``nonfinite`` counts NaN/Inf values in the candidate tensor.

    Every pair is reduced once (all metrics from one set of fp64 reductions, see
    :func:`parity_kit.comparison.metrics.pair_reductions`) on ``device`` (default: where the reference tensor
    lives, so GPU-resident recordings are compared on their GPU), queued without waiting, and the
    results of all pairs are read back together. Tensors that must move to ``device`` are streamed
    pair by pair; after every ``chunk_bytes`` moved the queued results are read back, so device memory
    stays bounded by one pair's working set plus what is queued. (Environment variable
    ``PARITY_KIT_COMPILE=1`` runs the CUDA reductions through ``torch.compile``: experimental, see
    benchmarks/results/compare_throughput_h200.json.)

    >>> import torch
    >>> from parity_kit.recording import Call, Recording
    >>> a = Recording("tensors", [Call("m", 0, 0, {"output": torch.tensor([1.0, 2.0])})])
    >>> b = Recording("tensors", [Call("m", 0, 0, {"output": torch.tensor([1.0, 2.5])})])
    >>> compare(a, b)[["module", "max_abs", "status"]].values.tolist()
    [['m', 0.5, 'ok']]
    """
    _require_tensors(ref, "reference")
    _require_tensors(cand, "candidate")
    mm = ModuleMapping.coerce(mapping)
    keep = _leaf_filter(tensors)
    target_device = torch.device(device) if device is not None else None
    if target_device is not None and target_device.type == "cuda" and not torch.cuda.is_available():
        raise ParityKitError(f"device={str(target_device)!r} but CUDA is not available here; use device='cpu' or None")
    try:
        chunk = parse_bytes(chunk_bytes)
    except ParityKitError:
        raise ParityKitError(f"chunk_bytes={chunk_bytes!r} is not understood; use bytes (int), '1GiB', '256MB' "
                             "or None (read all results back once)") from None
    cand_calls: dict[tuple[str, int], Call] = {(c.module, c.index): c for c in cand.calls}
    used: set[tuple[str, int, str]] = set()
    rows: list[dict[str, Any]] = []
    jobs: list[_Job] = []

    for call in ref.calls:
        targets = mm.targets(call.module)
        for leaf, ref_t in call.tensors.items():
            if not keep(leaf):
                continue
            if not targets:
                rows.append(_row(call.order, call.module, None, call.index, leaf, "missing in candidate",
                                 tuple(ref_t.shape), call.orig_dtype(leaf)))
                continue
            for target in targets:
                rows.append(_compare_leaf(call, leaf, ref_t, target, cand_calls, used, floor_tolerance, jobs))

    for call in cand.calls:
        for leaf, cand_t in call.tensors.items():
            if keep(leaf) and (call.module, call.index, leaf) not in used:
                rows.append(_row(None, call.module, call.module, call.index, leaf, "missing in reference",
                                 tuple(cand_t.shape), None, call.orig_dtype(leaf)))

    _run_jobs(jobs, target_device, chunk, floor_tolerance)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["order"] = table["order"].astype("Int64")
    table["nonfinite"] = table["nonfinite"].astype("int64")
    if strict:
        bad = table[table["status"] != "ok"]
        if len(bad):
            sample = "; ".join(f"{r.module} call {r.call} {r.tensor}: {r.status}" for r in bad.head(5).itertuples())
            raise ParityKitError(
                f"compare(strict=True): {len(bad)} of {len(table)} rows are not comparable ({sample}); "
                "fix the mapping (see ModuleMapping.unmatched) or capture the same modules in both runs"
            )
    return table


def _compare_leaf(call: Call, leaf: str, ref_t: torch.Tensor, target: MappingTarget,
                  cand_calls: dict[tuple[str, int], Call], used: set[tuple[str, int, str]],
                  tolerance: float, jobs: list[_Job]) -> dict[str, Any]:
    ref_dtype = call.orig_dtype(leaf)
    name = _target_name(target)
    other = cand_calls.get((target.cand, call.index))
    cand_leaf = _matching_leaf(leaf, other) if other is not None else None
    if cand_leaf is None:
        return _row(call.order, call.module, name, call.index, leaf, "missing in candidate",
                    tuple(ref_t.shape), ref_dtype)
    used.add((target.cand, call.index, cand_leaf))
    cand_t = other.tensors[cand_leaf]
    cand_dtype = other.orig_dtype(cand_leaf)
    if target.transform is not None and _is_output(leaf):
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
        row = _row(call.order, call.module, name, call.index, leaf, "shape mismatch",
                   f"{tuple(ref_t.shape)} vs {tuple(cand_t.shape)}", ref_dtype, cand_dtype)
        row["nonfinite"] = _nonfinite(cand_t)
        return row
    row = _row(call.order, call.module, name, call.index, leaf, "ok", tuple(ref_t.shape), ref_dtype, cand_dtype)
    if ref_t.is_floating_point() and cand_t.is_floating_point():
        jobs.append(_Job(row, ref_t, cand_t, parse_dtype(cand_dtype)))
        return row
    # integer leaves (token ids, positions): exact values, so no floor and no ULP unit
    values = {**M.all_metrics(ref_t.double(), cand_t.double()), "max_ulp": math.nan, "floor": 0.0,
              "nonfinite": _nonfinite(cand_t)}
    _fill(row, values, tolerance)
    return row


def _fill(row: dict[str, Any], values: dict[str, float], tolerance: float) -> None:
    if _same_or_wider_candidate(row["ref_dtype"], row["cand_dtype"]):
        # rounding the reference to the candidate's dtype changes nothing, yet each run rounded its
        # own result: judge against one rounding in that dtype instead of a floor of zero
        values = {**values, "floor": M.nominal_floor(row["cand_dtype"])}
    floor = values["floor"]
    row.update(values)
    rel = values["rel_rms"]
    row["floor_ratio"] = (rel / floor if floor > 0 else (0.0 if rel == 0 else math.inf)) if not math.isnan(rel) else math.nan
    row["verdict"] = M.verdict(rel, floor, tolerance)
    row["nonfinite"] = int(values["nonfinite"])


def _matching_leaf(leaf: str, other: Call) -> str | None:
    """The candidate's leaf for a reference leaf: the same name, or, for the primary output, the other
    side's primary output when one implementation returns a tensor and the other a tuple
    (InternLM2's attention returns ``output``, Llama's ``(output.0, weights)``)."""
    if leaf in other.tensors:
        return leaf
    primary = {"output", "output.0"}
    if leaf in primary:
        return next((name for name in ("output", "output.0") if name in other.tensors), None)
    return None


def _same_or_wider_candidate(ref_dtype: Any, cand_dtype: Any) -> bool:
    """True for floating dtypes where the candidate's is at least as precise as the reference's."""
    try:
        ref, cand = parse_dtype(ref_dtype), parse_dtype(cand_dtype)
    except ParityKitError:  # integer leaves and missing rows
        return False
    return torch.finfo(ref).eps >= torch.finfo(cand).eps


@dataclass
class _Job:
    """A comparable floating pair whose metrics are still to be computed into ``row``."""

    row: dict[str, Any]
    ref: torch.Tensor | None
    cand: torch.Tensor | None
    dtype: torch.dtype


_compiled_reductions: Callable[..., torch.Tensor] | None = None
_compile_failed = False


def _reduce(ref: torch.Tensor, cand: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`metrics.pair_reductions`, through torch.compile on CUDA when PARITY_KIT_COMPILE=1."""
    global _compiled_reductions, _compile_failed
    # opt-in: on the H200 (torch 2.11) the compiled kernel gave wrong max_abs values and no speed-up
    if ref.is_cuda and not _compile_failed and os.environ.get("PARITY_KIT_COMPILE", "0") == "1":
        try:
            if _compiled_reductions is None:
                _compiled_reductions = torch.compile(M.pair_reductions, dynamic=True)
            return _compiled_reductions(ref.reshape(-1), cand.reshape(-1), dtype)
        except Exception as e:  # a missing compiler or an unsupported op: the eager path gives the same numbers
            _compile_failed = True
            warnings.warn(f"torch.compile of the comparison kernels failed ({type(e).__name__}: {e}); "
                          "comparing eagerly (same results, slower)", RuntimeWarning, stacklevel=3)
    return M.pair_reductions(ref, cand, dtype)


class _Reducer:
    """Queues the reduction of each pair where it should run; reads the results back in batches.

    ``device`` None reduces a pair where its reference tensor lives. After ``chunk`` bytes were moved
    to the device the queued results are read back (one transfer per device), which bounds what is
    queued; otherwise everything is read back once, by :meth:`finish`.
    """

    def __init__(self, device: torch.device | None, chunk: int | None, tolerance: float):
        self.device, self.chunk, self.tolerance = device, chunk, tolerance
        self.queued: list[tuple[_Job, torch.Tensor]] = []
        self.moved = 0

    def add(self, job: _Job) -> None:
        where = self.device if self.device is not None else job.ref.device
        ref_t, cand_t = job.ref, job.cand
        if ref_t.device != where:
            self.moved += ref_t.numel() * ref_t.element_size()
            ref_t = ref_t.to(where, non_blocking=True)
        if cand_t.device != where:
            self.moved += cand_t.numel() * cand_t.element_size()
            cand_t = cand_t.to(where, non_blocking=True)
        values = _reduce(ref_t, cand_t, job.dtype)
        job.ref = job.cand = None  # the queued reduction keeps what it needs: let the tensors go
        self.queued.append((job, values))
        if self.chunk is not None and self.moved >= self.chunk:
            self.finish()

    def finish(self) -> None:
        by_device: dict[torch.device, list[tuple[_Job, torch.Tensor]]] = {}
        for job, values in self.queued:
            by_device.setdefault(values.device, []).append((job, values))
        for items in by_device.values():
            table = torch.stack([v for _, v in items]).cpu().tolist()  # one transfer per device
            for (job, _), values in zip(items, table):
                _fill(job.row, M.metrics_from_reductions(values), self.tolerance)
        self.queued.clear()
        self.moved = 0


def _run_jobs(jobs: list[_Job], device: torch.device | None, chunk: int | None, tolerance: float) -> None:
    reducer = _Reducer(device, chunk, tolerance)
    for job in jobs:
        reducer.add(job)
    reducer.finish()


# ---------------------------------------------------------------------------------------- table queries
def first_divergence(table: pd.DataFrame, metric: str = "rel_rms", threshold: float = 1e-2) -> pd.Series | None:
    """The first "ok" row, in table (execution) order, whose ``metric`` crosses ``threshold``.

    Crossing means above for distances (rel_rms, max_abs, mean_abs, max_ulp, floor_ratio) and below
    for similarities (cosine, sqnr_db); a NaN metric counts as crossed. None if no row crosses.

    >>> t = pd.DataFrame({"module": ["a", "b", "c"], "rel_rms": [1e-4, 5e-2, 1.0], "status": "ok"})
    >>> first_divergence(t)["module"]
    'b'
    """
    if metric not in table.columns:
        raise ParityKitError(f"metric {metric!r} is not a column of the table; use one of {list(METRICS)}")
    ok = table[table["status"] == "ok"] if "status" in table.columns else table
    values = ok[metric].astype(float)
    crossed = (values < threshold) if metric in _LOWER_IS_WORSE else (values > threshold)
    crossed |= values.isna()
    hits = ok[crossed]
    return None if hits.empty else hits.iloc[0]


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


# ---------------------------------------------------------------------------------------- per-token error
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
    _require_tensors(ref, "reference")
    _require_tensors(cand, "candidate")
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
            if target.transform is not None and _is_output(tensor):
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
