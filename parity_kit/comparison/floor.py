"""The noise-floor rule: how much error rounding alone explains, and how an error is judged against it.

One rule, used by every table that carries ``floor`` / ``floor_ratio`` / ``verdict`` columns
(:func:`parity_kit.compare`, :func:`parity_kit.local_vs_propagated`, the precision sweep and bisection):

- the candidate's dtype is *narrower* than the reference's: the floor is the error that rounding the
  reference once to the candidate's dtype already causes (its representability floor);
- the same dtype, or a *wider* one: rounding the reference changes nothing, yet each run rounded its own
  exact result at least once, so the floor is one rounding in the candidate's dtype
  (:func:`parity_kit.metrics.nominal_floor`, in the metric's units).

An error within ``tolerance`` × the floor reads "within floor"; above it, "above floor ×N".

>>> import torch
>>> ref = torch.linspace(1, 2, 100)
>>> rounding_floor(ref, "bf16") > 0, rounding_floor(ref, "fp32") == nominal_floor("fp32")
(True, True)
>>> judge(1e-2, 2e-3)
{'floor': 0.002, 'floor_ratio': 5.0, 'verdict': 'above floor ×5'}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..dtypes import DtypeLike, parse_dtype
from ..errors import ParityKitError
from . import metrics
from .metrics import nominal_floor, verdict


def narrower(cand_dtype: DtypeLike, ref_dtype: DtypeLike) -> bool:
    """True when the candidate's floating dtype is less precise than the reference's."""
    return torch.finfo(parse_dtype(cand_dtype)).eps > torch.finfo(parse_dtype(ref_dtype)).eps


def floor_for(representability: float, ref_dtype: DtypeLike, cand_dtype: DtypeLike, *,
              nominal: float | None = None) -> float:
    """The rule, given the reference's representability floor in the candidate's dtype (as already measured,
    e.g. by the fused comparison reductions): that floor when the candidate is narrower, else ``nominal``
    (default: :func:`nominal_floor` of the candidate's dtype, the rel_rms of one rounding)."""
    if narrower(cand_dtype, ref_dtype):
        return representability
    return nominal_floor(cand_dtype) if nominal is None else nominal


def rounding_floor(ref: torch.Tensor, cand_dtype: DtypeLike, ref_dtype: DtypeLike | None = None,
                   metric: str | Callable[[torch.Tensor, torch.Tensor], float] = "rel_rms") -> float:
    """The floor of ``metric`` for a candidate in ``cand_dtype`` against ``ref`` (whose dtype, as the model
    produced it, is ``ref_dtype``; default ``ref.dtype``).

    For the same or a wider dtype the nominal rounding is expressed in the metric's units: rel_rms
    ``eps/(2√3)``, max_abs half an ULP of the largest value ``max|ref|·eps/2``, mean_abs ``mean|ref|·eps/4``;
    a callable metric gets its value on the reference rounded once to the candidate's dtype, or, when that
    changes nothing, on the reference against itself nudged by one nominal rounding.
    """
    if not ref.is_floating_point():
        return 0.0
    cand = parse_dtype(cand_dtype)
    ref_kind = parse_dtype(ref_dtype) if ref_dtype is not None else ref.dtype
    name, fn = metrics.error_metric(metric)
    if narrower(cand, ref_kind):
        return float(fn(ref, ref.to(cand)))
    eps = torch.finfo(cand).eps
    r = ref.detach().double()
    if name == "rel_rms":
        return nominal_floor(cand)
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


def judge(value: float, floor: float, tolerance: float = 2.0) -> dict[str, Any]:
    """The ``floor``, ``floor_ratio`` and ``verdict`` columns of one error."""
    if tolerance <= 0 or math.isnan(tolerance):
        raise ParityKitError(f"floor_tolerance={tolerance!r} must be a positive number (2.0 by default)")
    return {"floor": floor, "floor_ratio": floor_ratio(value, floor), "verdict": verdict(value, floor, tolerance)}
