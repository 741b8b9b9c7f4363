"""Comparison of two recordings: one tidy table row per (module, call, tensor leaf), with noise-floor verdicts.

The rows are built by :mod:`parity_kit.comparison.pairs`; the queries that read the table (first divergence,
first non-finite value, error per token) are in :mod:`parity_kit.comparison.queries`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from .._util.sizes import parse_bytes
from ..errors import ParityKitError
from ..recording import Call, Recording
from .execution import ExecutionFloor, apply_execution_floor
from .mapping import ModuleMapping
from .metrics import check_tolerance
from .pairs import (COLUMNS, MappingLike, PairJob, compare_leaf, empty_row, leaf_filter, mark_incomplete, require_calls,
                    require_tensors, run_jobs)


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
    execution_floor: ExecutionFloor | None = None,
) -> pd.DataFrame:
    """Compare two tensors-mode recordings, aligned by (module through ``mapping``, call index, leaf).

    One row per reference (call, leaf, mapping target) in the reference's execution order, then one
    row per candidate leaf nothing mapped to (``status="missing in reference"``; ``module`` holds the
    candidate name there). ``status`` is "ok", "missing in candidate", "missing in reference" or
    "shape mismatch", and "incomplete reference" / "incomplete candidate" / "incomplete runs" instead of "ok"
    where a recording's block raised (metadata ``complete`` False: its forward stopped part-way; the metrics are
    still computed); with ``strict=True`` any status but "ok" raises. Two recordings of which one holds
    no call (the model never ran inside its block) raise ParityKitError. Metrics are computed in fp64;
    ``floor`` is the rel_rms of rounding the (transformed) reference to the candidate's dtype as the
    model produced it (before any cast on capture), which is also the ULP unit; ``floor_ratio`` is
    rel_rms / floor and ``verdict`` judges rel_rms against ``floor_tolerance × floor``.
    ``nonfinite`` counts NaN/Inf values in the candidate tensor. With an ``execution_floor`` (measured by
    :func:`parity_kit.execution_floor`), ``verdict`` says which floor explains a row — rounding, run-to-run noise,
    batch variance, kernel settings — or "above every floor ×N" (:func:`parity_kit.comparison.execution.apply_execution_floor`).

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
    require_tensors(ref, "reference")
    require_tensors(cand, "candidate")
    require_calls(ref, "reference")
    require_calls(cand, "candidate")
    floor_tolerance = check_tolerance(floor_tolerance, "floor_tolerance")
    mm = ModuleMapping.coerce(mapping)
    keep = leaf_filter(tensors)
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
    jobs: list[PairJob] = []

    for call in ref.calls:
        targets = mm.targets(call.module)
        for leaf, ref_t in call.tensors.items():
            if not keep(leaf):
                continue
            if not targets:
                rows.append(empty_row(call.order, call.module, None, call.index, leaf, "missing in candidate",
                                 tuple(ref_t.shape), call.orig_dtype(leaf)))
                continue
            for target in targets:
                rows.append(compare_leaf(call, leaf, ref_t, target, cand_calls, used, floor_tolerance, jobs))

    for call in cand.calls:
        for leaf, cand_t in call.tensors.items():
            if keep(leaf) and (call.module, call.index, leaf) not in used:
                rows.append(empty_row(None, call.module, call.module, call.index, leaf, "missing in reference",
                                 tuple(cand_t.shape), None, call.orig_dtype(leaf)))

    run_jobs(jobs, target_device, chunk, floor_tolerance)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["order"] = table["order"].astype("Int64")
    table["nonfinite"] = table["nonfinite"].astype("int64")
    mark_incomplete(table, ref, cand)
    if strict:
        bad = table[table["status"] != "ok"]
        if len(bad):
            sample = "; ".join(f"{r.module} call {r.call} {r.tensor}: {r.status}" for r in bad.head(5).itertuples())
            raise ParityKitError(
                f"compare(strict=True): {len(bad)} of {len(table)} rows are not comparable ({sample}); "
                "fix the mapping (see ModuleMapping.unmatched) or capture the same modules in both runs"
            )
    if execution_floor is not None:
        table = apply_execution_floor(table, execution_floor, tolerance=floor_tolerance)
    return table
