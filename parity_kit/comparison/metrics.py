"""Pure error metrics between a reference tensor and a candidate, computed in fp64.

Conventions (pinned by tests):

- ``rel_rms(ref, x) = rms(x - ref) / rms(ref)``; if ``rms(ref) == 0`` it is 0 when ``x == ref``, else inf.
- ``cosine`` of two all-zero tensors is 1; of a zero and a non-zero tensor 0.
- ``sqnr_db = 10 log10(sum(ref²) / sum((x - ref)²))``; +inf for equal tensors, -inf when ref is all
  zero and x is not.
- ``max_ulp`` rounds both tensors to a dtype (the unit) and measures the largest distance on the
  integer line of that dtype's bit patterns (+0 and -0 coincide; exact across powers of two and for
  subnormals). Each value counts in its *own* ULPs, so two values near zero of opposite sign are
  thousands of ULPs apart: comparison tables keep this raw figure as ``max_ulp_raw``.
- ``scaled_max_ulp`` is the largest difference in ULPs *at the tensor's scale*: ``max_abs`` divided by the
  unit's spacing at ``rms(ref)`` (:func:`ulp_at`). A value smaller than the rms is not judged by its own tiny
  spacing, so near-zero sign flips do not dominate; an honest rounding of a tensor reads a few units. This is
  the ``max_ulp`` column of comparison tables.
- Non-finite values: positions where ``ref`` and ``x`` hold the same non-finite value (both NaN, or the
  same infinity) agree and are left out. Any other non-finite value in either tensor makes the
  distances ``max_abs, mean_abs, rel_rms, max_ulp`` inf, ``cosine`` NaN and ``sqnr_db`` -inf: the
  candidate is broken there and no finite number describes it.
- ``representability_floor(ref, dtype)`` is the rel_rms that rounding ``ref`` to ``dtype`` already
  causes; ``verdict`` judges an error against a floor (which floor applies is the rule of
  :mod:`parity_kit.comparison.floor`).

>>> ref = torch.tensor([1.0, 2.0, 3.0]); x = torch.tensor([1.0, 2.0, 3.5])
>>> round(rel_rms(ref, x), 4), max_abs(ref, x)
(0.1336, 0.5)
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..dtypes import DtypeLike, parse_dtype
from ..errors import ParityKitError

__all__ = ["max_abs", "mean_abs", "rel_rms", "cosine", "sqnr_db", "max_ulp", "scaled_max_ulp", "ulp_at",
           "error_metric", "ERROR_METRICS", "representability_floor", "nominal_floor", "all_metrics", "verdict",
           "pair_reductions", "metrics_from_reductions", "REDUCTIONS"]

_BITS_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
              torch.float32: torch.int32, torch.float64: torch.int64}


def _pair(ref: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(ref, x) as flat fp64 over the positions that are not agreeing non-finite values, and
    whether some remaining position is non-finite (which makes every distance inf)."""
    if not isinstance(ref, torch.Tensor) or not isinstance(x, torch.Tensor):
        raise ParityKitError("metrics take two torch.Tensors; for stats-mode recordings capture in mode='tensors'")
    if ref.shape != x.shape:
        raise ParityKitError(
            f"shape mismatch: reference {tuple(ref.shape)} vs candidate {tuple(x.shape)}; "
            "compare tensors of one shape (a ModuleMapping transform can reshape or split the reference)"
        )
    r = ref.detach().to(torch.float64).reshape(-1).cpu()
    c = x.detach().to(torch.float64).reshape(-1).cpu()
    finite_r, finite_c = torch.isfinite(r), torch.isfinite(c)
    if bool(finite_r.all()) and bool(finite_c.all()):
        return r, c, False
    agree = (~finite_r) & (~finite_c) & ((r == c) | (torch.isnan(r) & torch.isnan(c)))
    keep = ~agree
    r, c = r[keep], c[keep]
    return r, c, not bool(torch.isfinite(r).all() and torch.isfinite(c).all())


#: Error metrics (smaller is better) that a search can minimise and a replay can judge.
ERROR_METRICS = ("rel_rms", "max_abs", "mean_abs")
#: An error metric by name, or any callable ``(ref, x) -> float`` where smaller is better.
ErrorMetric = str | Callable[[torch.Tensor, torch.Tensor], float]


def error_metric(metric: ErrorMetric) -> tuple[str, Callable[[torch.Tensor, torch.Tensor], float]]:
    """``(name, function)`` of an error metric given by name or as a callable.

    >>> error_metric("max_abs")[0], error_metric(lambda r, x: 0.0)[0]
    ('max_abs', '<lambda>')
    """
    if callable(metric):
        return getattr(metric, "__name__", "metric"), metric
    if metric not in ERROR_METRICS:
        raise ParityKitError(
            f"metric {metric!r} is not an error metric (smaller is better), so it cannot be minimised or judged "
            f"against a floor; use one of {list(ERROR_METRICS)} or a callable "
            "(ref, x) -> float where smaller is better"
        )
    return metric, globals()[metric]


def max_abs(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Largest absolute difference.

    >>> max_abs(torch.tensor([1.0, -2.0]), torch.tensor([1.5, -4.0]))
    2.0
    """
    r, c, broken = _pair(ref, x)
    if broken:
        return math.inf
    return float((c - r).abs().max()) if r.numel() else 0.0


def mean_abs(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Mean absolute difference.

    >>> mean_abs(torch.tensor([1.0, -2.0]), torch.tensor([1.5, -4.0]))
    1.25
    """
    r, c, broken = _pair(ref, x)
    if broken:
        return math.inf
    return float((c - r).abs().mean()) if r.numel() else 0.0


def _rel_rms(r: torch.Tensor, c: torch.Tensor) -> float:
    err = float((c - r).square().sum())
    norm = float(r.square().sum())
    if norm == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return math.sqrt(err / norm)


def rel_rms(ref: torch.Tensor, x: torch.Tensor) -> float:
    """``rms(x - ref) / rms(ref)``; 0 for equal tensors, inf if ref is all zero and x is not.

    >>> rel_rms(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5]))
    0.1
    """
    r, c, broken = _pair(ref, x)
    return math.inf if broken else _rel_rms(r, c)


def cosine(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors; 1 for two zero tensors, 0 if only one is zero.

    >>> cosine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    0.7071067811865475
    """
    r, c, broken = _pair(ref, x)
    if broken:
        return math.nan
    nr, nc = float(r.norm()), float(c.norm())
    if nr == 0.0 and nc == 0.0:
        return 1.0
    if nr == 0.0 or nc == 0.0:
        return 0.0
    return max(-1.0, min(1.0, float(r @ c) / (nr * nc)))


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio ``10 log10(sum(ref²) / sum((x - ref)²))`` in dB.

    >>> sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5]))
    20.0
    """
    r, c, broken = _pair(ref, x)
    if broken:
        return -math.inf
    signal, noise = float(r.square().sum()), float((c - r).square().sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _ordered_ints(t: torch.Tensor) -> torch.Tensor:
    """Map float bit patterns to int64 so that neighbouring floats are neighbouring integers."""
    bits = t.contiguous().view(_BITS_VIEW[t.dtype]).to(torch.int64)
    magnitude = bits & ((1 << (torch.finfo(t.dtype).bits - 1)) - 1)
    # sign-magnitude → two's complement: negative floats count down from 0, so -0 == +0
    return torch.where(bits < 0, -magnitude, bits)


def max_ulp(ref: torch.Tensor, x: torch.Tensor, dtype: DtypeLike | None = None) -> float:
    """Largest distance in units in the last place of ``dtype`` (default: ``x``'s dtype).

    Both tensors are rounded to ``dtype`` first; inf if a non-finite value disagrees.

    >>> max_ulp(torch.tensor([1.0]), torch.tensor([1.0 + 2**-23]))
    1.0
    >>> max_ulp(torch.tensor([1.0]), torch.tensor([1.0 - 2**-24]))  # just below a power of two
    1.0
    """
    target = parse_dtype(dtype) if dtype is not None else x.dtype
    if target not in _BITS_VIEW:
        raise ParityKitError(f"max_ulp needs a floating dtype (fp64/fp32/fp16/bf16), got {target}")
    if ref.shape != x.shape:
        _pair(ref, x)  # raises the shape message
    r = ref.detach().reshape(-1).cpu().to(target)
    c = x.detach().reshape(-1).cpu().to(target)
    finite_r, finite_c = torch.isfinite(r), torch.isfinite(c)
    if not (bool(finite_r.all()) and bool(finite_c.all())):
        agree = (~finite_r) & (~finite_c) & ((r == c) | (torch.isnan(r) & torch.isnan(c)))
        if bool((~(finite_r & finite_c) & ~agree).any()):
            return math.inf
        r, c = r[finite_r & finite_c], c[finite_r & finite_c]
    if r.numel() == 0:
        return 0.0
    a, b = _ordered_ints(r), _ordered_ints(c)
    # int64 differences overflow only for fp64 values of opposite sign, where the distance is huge
    # anyway and the float difference is precise enough
    opposite = (a < 0) != (b < 0)
    dist = torch.where(opposite, (a.double() - b.double()).abs(), (a - b).abs().double())
    return float(dist.max())


def ulp_at(magnitude: float, dtype: DtypeLike) -> float:
    """The spacing of ``dtype``'s values at ``magnitude`` (one ULP there); subnormal spacing below the smallest
    normal value.

    >>> ulp_at(1.0, "bf16"), ulp_at(3.0, "fp16"), ulp_at(0.0, "fp16") == 2.0**-24
    (0.0078125, 0.001953125, True)
    """
    info = torch.finfo(parse_dtype(dtype))
    magnitude = abs(float(magnitude))
    if not magnitude >= info.tiny:  # also 0 and NaN
        return info.tiny * info.eps
    if math.isinf(magnitude):
        return math.inf
    _, exponent = math.frexp(magnitude)  # magnitude = m * 2**exponent, 0.5 <= m < 1
    return math.ldexp(info.eps, exponent - 1)


def _scaled_ulp(max_difference: float, rms_ref: float, dtype: DtypeLike) -> float:
    if max_difference == 0.0:
        return 0.0
    if math.isinf(max_difference) or math.isnan(max_difference):
        return math.inf
    return max_difference / ulp_at(rms_ref, dtype) if rms_ref > 0 else math.inf


def scaled_max_ulp(ref: torch.Tensor, x: torch.Tensor, dtype: DtypeLike | None = None) -> float:
    """The largest difference in ULPs of ``dtype`` (default: ``x``'s) at the scale of ``ref``: ``max_abs`` over
    :func:`ulp_at` of ``rms(ref)``. Inf if a non-finite value disagrees or ``ref`` is all zero and ``x`` is not.

    >>> ref = torch.tensor([1.0, -1.0, 1e-8]); x = torch.tensor([1.0, -1.0, -1e-8])  # a sign flip near zero
    >>> max_ulp(ref, x) > 1e9, scaled_max_ulp(ref, x) < 1
    (True, True)
    """
    target = parse_dtype(dtype) if dtype is not None else x.dtype
    r, c, broken = _pair(ref, x)
    if broken:
        return math.inf
    if r.numel() == 0:
        return 0.0
    return _scaled_ulp(float((c - r).abs().max()), float(r.square().mean().sqrt()), target)


def representability_floor(ref: torch.Tensor, dtype: DtypeLike) -> float:
    """The rel_rms that rounding ``ref`` to ``dtype`` already causes (0 if ``ref`` is already in it).

    An error near this floor is what the candidate dtype cannot avoid; much above it points at a bug
    or an unstable computation. Comparing two runs of the *same* dtype, this is 0; use
    :func:`nominal_floor` there (``compare`` does).

    >>> representability_floor(torch.tensor([1.0, 1.0 + 2**-12]), "fp16") > 0
    True
    """
    target = parse_dtype(dtype)
    r = ref.detach()
    if not r.is_floating_point():
        return 0.0
    return rel_rms(r, r.to(target))


def nominal_floor(dtype: DtypeLike) -> float:
    """The rel_rms of one rounding to ``dtype`` under the uniform-error model: ``eps / (2·√3)``.

    Two runs in the same dtype (fp16 original vs fp16 converted) each rounded their own exact result
    at least once, so this is their floor (fp16: 2.8e-4, bf16: 2.3e-3, fp32: 3.4e-8).

    >>> f"{nominal_floor('bf16'):.2e}"
    '2.26e-03'
    """
    return torch.finfo(parse_dtype(dtype)).eps / (2 * math.sqrt(3))


def all_metrics(ref: torch.Tensor, x: torch.Tensor, dtype: DtypeLike | None = None) -> dict[str, float]:
    """Every metric at once; ``dtype`` (default ``x``'s dtype) sets the ULP unit and the floor. ``max_ulp`` is
    :func:`scaled_max_ulp` (as in comparison tables), ``max_ulp_raw`` :func:`max_ulp`.

    >>> sorted(all_metrics(torch.ones(3), torch.ones(3)))
    ['cosine', 'floor', 'max_abs', 'max_ulp', 'max_ulp_raw', 'mean_abs', 'rel_rms', 'sqnr_db']
    """
    target = parse_dtype(dtype) if dtype is not None else x.dtype
    r, c, broken = _pair(ref, x)
    if broken:
        out = {"max_abs": math.inf, "mean_abs": math.inf, "rel_rms": math.inf,
               "cosine": math.nan, "sqnr_db": -math.inf}
    else:
        out = {"max_abs": max_abs(r, c), "mean_abs": mean_abs(r, c), "rel_rms": _rel_rms(r, c),
               "cosine": cosine(r, c), "sqnr_db": sqnr_db(r, c)}
    floating = target in _BITS_VIEW
    rms_ref = float(r.square().mean().sqrt()) if r.numel() else 0.0
    out["max_ulp"] = (_scaled_ulp(out["max_abs"], rms_ref, target) if r.numel() else 0.0) if floating else math.nan
    out["max_ulp_raw"] = max_ulp(ref, x, target) if floating else math.nan
    out["floor"] = representability_floor(ref, target) if floating else 0.0
    return out


def _two_significant(value: float) -> str:
    rounded = float(f"{value:.2g}")
    return f"{rounded:.0f}" if rounded >= 10 else f"{rounded:g}"


def check_tolerance(tolerance: Any, knob: str = "floor_tolerance") -> float:
    """``tolerance`` as a float if it is a positive, finite number; ParityKitError otherwise.

    >>> check_tolerance(2)
    2.0
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not math.isfinite(tolerance) \
            or tolerance <= 0:
        raise ParityKitError(f"{knob}={tolerance!r} is not a positive, finite number; the default 2.0 allows twice "
                             "the floor")
    return float(tolerance)


def verdict(value: float, floor: float, tolerance: float = 2.0) -> str:
    """"within floor" if ``value <= tolerance * floor``, else "above floor ×N" (N = value / floor,
    two significant digits; ×inf when the floor is 0). A NaN value gives "not finite".

    >>> verdict(3e-4, 2e-4), verdict(5e-3, 2e-4), verdict(1e-6, 0.0)
    ('within floor', 'above floor ×25', 'above floor ×inf')
    """
    check_tolerance(tolerance)
    if math.isnan(value):
        return "not finite"
    if value <= tolerance * floor:
        return "within floor"
    ratio = value / floor if floor > 0 else math.inf
    return f"above floor ×{'inf' if math.isinf(ratio) else _two_significant(ratio)}"


# ---------------------------------------------------------------------------------------- fused form
# The fused form computes every metric of one pair from a single set of reductions, on the device the
# tensors live on and without host synchronisation, so that a comparison can queue all its pairs and
# read the results back once. ``metrics_from_reductions`` applies the conventions above to them.
REDUCTIONS = ("max_abs", "sum_abs", "sum_d2", "sum_r2", "sum_c2", "dot", "kept", "bad", "nonfinite",
              "ulp", "ulp_bad", "ulp_ok", "floor_err", "floor_r2", "floor_bad")


def _finite_split(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(both finite, broken): broken marks positions where a non-finite value is not matched by the
    same non-finite value in the other tensor."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    ok = fa & fb
    agree = ~fa & ~fb & ((a == b) | (torch.isnan(a) & torch.isnan(b)))
    return ok, ~(ok | agree)


def pair_reductions(ref: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, *,
                    floor_from_candidate: bool = False) -> torch.Tensor:
    """The sums, maxima and counts every metric of ``(ref, x)`` derives from, as fp64 ``[len(REDUCTIONS)]``
    on the tensors' device; ``dtype`` is the ULP unit and floor dtype. The floor sums round the reference to
    ``dtype``, or the candidate with ``floor_from_candidate`` (when the candidate is the wider run, the floor is
    its representability in the reference's dtype). Queues work without waiting.

    CUDA pairs of fp16/bf16/fp32 (unit too) go through one fused Triton pass
    (:func:`parity_kit.comparison.kernels.pair_reductions_triton`) where Triton is installed; everything else,
    and every pair when ``PARITY_KIT_KERNEL=0``, through torch in fp64.

    >>> v = pair_reductions(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5]), torch.float32)
    >>> metrics_from_reductions(v.tolist())["rel_rms"]
    0.1
    """
    global _kernel_state
    kernel = _fused_kernel(ref, x, dtype)
    if kernel is not None:
        try:
            return kernel(ref, x, dtype, floor_from_candidate=floor_from_candidate)
        except (ParityKitError, torch.OutOfMemoryError):
            raise
        except Exception as e:  # a GPU or Triton build the kernel cannot run on: torch gives the same numbers
            _kernel_state = "failed"
            warnings.warn(f"the fused comparison kernel failed ({type(e).__name__}: {e}); reducing with torch "
                          "(same results, slower)", RuntimeWarning, stacklevel=2)
    if not ref.is_cuda:
        fast = _pair_reductions_finite(ref, x, dtype, floor_from_candidate)
        if fast is not None:
            return fast
    return _pair_reductions_torch(ref, x, dtype, floor_from_candidate)


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_kernel_state: str | Callable[..., torch.Tensor] = "unloaded"  # or "unavailable", "failed", the kernel


def _fused_kernel(ref: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> Callable[..., torch.Tensor] | None:
    """The fused kernel if it can reduce this pair here, else None."""
    global _kernel_state
    if not (ref.is_cuda and x.device == ref.device and ref.dtype in _KERNEL_DTYPES and x.dtype in _KERNEL_DTYPES
            and dtype in _KERNEL_DTYPES and ref.numel() == x.numel()):
        return None
    # under torch.compile the torch path is what gets compiled (PARITY_KIT_COMPILE=1)
    if torch.compiler.is_compiling() or os.environ.get("PARITY_KIT_KERNEL", "1") == "0":
        return None
    if _kernel_state == "unloaded":
        try:
            from .kernels import pair_reductions_triton
        except ImportError:  # no Triton in this environment
            _kernel_state = "unavailable"
        else:
            _kernel_state = pair_reductions_triton
    return None if isinstance(_kernel_state, str) else _kernel_state


def _pair_reductions_torch(ref: torch.Tensor, x: torch.Tensor, dtype: torch.dtype,
                           floor_from_candidate: bool = False) -> torch.Tensor:
    r, c = ref.detach().reshape(-1), x.detach().reshape(-1)
    if r.numel() == 0:
        return torch.zeros(len(REDUCTIONS), dtype=torch.float64, device=r.device)
    r64, c64 = r.double(), c.double()
    ok, bad = _finite_split(r64, c64)
    rz, cz = torch.where(ok, r64, 0.0), torch.where(ok, c64, 0.0)
    d = cz - rz
    ad = d.abs()
    # ULPs are counted on both tensors rounded to the unit's dtype
    rt, ct = r.to(dtype), c.to(dtype)
    ok_t, bad_t = _finite_split(rt, ct)
    a, b = _ordered_ints(torch.where(ok_t, rt, 0)), _ordered_ints(torch.where(ok_t, ct, 0))
    opposite = (a < 0) != (b < 0)
    dist = torch.where(opposite, (a.double() - b.double()).abs(), (a - b).abs().double())
    # the floor: the reference (or the candidate) against itself rounded to the dtype
    side, q = (c64, ct.double()) if floor_from_candidate else (r64, rt.double())
    ok_f, bad_f = _finite_split(side, q)
    rf = torch.where(ok_f, side, 0.0)
    e = torch.where(ok_f, q, 0.0) - rf
    return torch.stack([
        ad.max(), ad.sum(), (d * d).sum(), (rz * rz).sum(), (cz * cz).sum(), (rz * cz).sum(),
        (ok | bad).sum().double(), bad.sum().double(), (~torch.isfinite(c64)).sum().double(),
        dist.max(), bad_t.sum().double(), ok_t.sum().double(),
        (e * e).sum(), (rf * rf).sum(), bad_f.sum().double(),
    ])


_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _pair_reductions_finite(ref: torch.Tensor, x: torch.Tensor, dtype: torch.dtype,
                            floor_from_candidate: bool) -> torch.Tensor | None:
    """:func:`_pair_reductions_torch`'s numbers in few passes, for the usual pair: fp32/fp16/bf16 tensors (and
    unit) whose values are all finite, also once rounded to the unit; None for any other pair (which the general
    path then reduces). Sums of squares and products are BLAS dot products in fp64, the absolute differences two
    norms of one fp64 difference; ULPs are counted on the bit patterns in their own width: two values of one
    sign are ``|a - b|`` apart, two of opposite signs the sum of their magnitudes. Whether everything is finite
    is read off the results (an fp64 sum of fp32 squares cannot overflow), so the finite case pays no mask.
    The pair is walked in pieces of ``_FINITE_PIECE`` elements, so the fp64 copies and temporaries of a piece
    stay in cache (whole tensors made every pass a trip to memory). On the CPU, where the general path's
    forty-odd full-size fp64 passes per pair dominated a comparison.
    """
    if not (ref.dtype in _INT_VIEW and x.dtype in _INT_VIEW and dtype in _INT_VIEW) or ref.numel() == 0:
        return None
    r, c = ref.detach().reshape(-1), x.detach().reshape(-1)
    view, magnitude = _INT_VIEW[dtype], (1 << (torch.finfo(dtype).bits - 1)) - 1
    pieces = []
    for rp, cp in zip(r.split(_FINITE_PIECE), c.split(_FINITE_PIECE)):
        r64, c64 = rp.double(), cp.double()
        d = c64 - r64
        rt, ct = rp.to(dtype), cp.to(dtype)  # no copy when already in the unit
        # rounding to the unit overflowed: counted here, refused below
        overflow = [(~torch.isfinite(t)).sum().double() for t, t0 in ((rt, rp), (ct, cp)) if t is not t0]
        a, b = rt.contiguous().view(view), ct.contiguous().view(view)
        opposite = (a ^ b) < 0  # sign bits differ
        same = (a - b).abs_().masked_fill_(opposite, 0).max().double()  # opposite signs may wrap: masked
        across = ((a[opposite].long() & magnitude) + (b[opposite].long() & magnitude)).max().double() \
            if bool(opposite.any()) else same
        side, side64, q = (cp, c64, ct) if floor_from_candidate else (rp, r64, rt)
        e = q.double() - side64 if q is not side else None  # already in the unit: rounding changes nothing
        pieces.append(torch.stack([
            torch.dot(d, d), torch.dot(r64, r64), torch.dot(c64, c64), torch.dot(r64, c64),
            torch.linalg.vector_norm(d, 1), torch.dot(e, e) if e is not None else d.new_zeros(()),
            torch.linalg.vector_norm(d, math.inf), torch.maximum(same, across), sum(overflow, d.new_zeros(()))]))
    table = torch.stack(pieces)  # [pieces, 9]
    sum_d2, sum_r2, sum_c2, dot, sum_abs, floor_err = table[:, :6].sum(0).tolist()
    max_abs, ulp, overflowed = table[:, 6:].max(0).values.tolist()
    if overflowed or not all(math.isfinite(v) for v in (sum_d2, sum_r2, sum_c2, dot, sum_abs)):
        return None  # NaN or Inf somewhere: the general path sorts agreeing from broken values
    n = float(r.numel())
    return torch.tensor([max_abs, sum_abs, sum_d2, sum_r2, sum_c2, dot, n, 0.0, 0.0, ulp, 0.0, n,
                         floor_err, sum_c2 if floor_from_candidate else sum_r2, 0.0], dtype=torch.float64)


_FINITE_PIECE = 2**18  # elements: a piece's fp64 copies and difference are 2 MiB each


def _ratio_rms(err: float, norm: float) -> float:
    if norm == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return math.sqrt(err / norm)


def metrics_from_reductions(values: list[float], unit: DtypeLike = "fp32") -> dict[str, float]:
    """:func:`all_metrics` (plus ``nonfinite``, the candidate's NaN/Inf count) from :func:`pair_reductions`;
    ``unit`` is the dtype the reductions counted ULPs in (it sets the spacing of the scaled ``max_ulp``).

    >>> v = pair_reductions(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]), torch.float32).tolist()
    >>> metrics_from_reductions(v)["max_abs"]
    0.5
    """
    v = dict(zip(REDUCTIONS, values))
    out: dict[str, float] = {}
    if v["bad"]:
        out.update(max_abs=math.inf, mean_abs=math.inf, rel_rms=math.inf, cosine=math.nan, sqnr_db=-math.inf)
    else:
        kept = v["kept"]
        out["max_abs"] = v["max_abs"] if kept else 0.0
        out["mean_abs"] = v["sum_abs"] / kept if kept else 0.0
        out["rel_rms"] = _ratio_rms(v["sum_d2"], v["sum_r2"])
        nr, nc = math.sqrt(v["sum_r2"]), math.sqrt(v["sum_c2"])
        if nr == 0.0 and nc == 0.0:
            out["cosine"] = 1.0
        elif nr == 0.0 or nc == 0.0:
            out["cosine"] = 0.0
        else:
            out["cosine"] = max(-1.0, min(1.0, v["dot"] / (nr * nc)))
        if v["sum_d2"] == 0.0:
            out["sqnr_db"] = math.inf
        elif v["sum_r2"] == 0.0:
            out["sqnr_db"] = -math.inf
        else:
            out["sqnr_db"] = 10.0 * math.log10(v["sum_r2"] / v["sum_d2"])
    finite_kept = v["kept"] - v["bad"]
    rms_ref = math.sqrt(v["sum_r2"] / finite_kept) if finite_kept else 0.0
    out["max_ulp"] = _scaled_ulp(out["max_abs"], rms_ref, unit) if finite_kept else (math.inf if v["bad"] else 0.0)
    out["max_ulp_raw"] = math.inf if v["ulp_bad"] else (v["ulp"] if v["ulp_ok"] else 0.0)
    out["floor"] = math.inf if v["floor_bad"] else _ratio_rms(v["floor_err"], v["floor_r2"])
    out["nonfinite"] = int(v["nonfinite"])
    return out
