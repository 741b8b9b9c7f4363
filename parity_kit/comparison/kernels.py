"""The fused Triton kernel of :func:`parity_kit.comparison.metrics.pair_reductions`: one pass over a (reference,
candidate) pair computes every reduction the metrics derive from.

Imported only where Triton is installed (``metrics.pair_reductions`` uses it for CUDA tensors of
fp16/bf16/fp32 and falls back to its torch path otherwise). With
``TRITON_INTERPRET=1`` set before this module is imported, the same kernels run on CPU tensors through
Triton's interpreter (how the tests check them without a GPU).

Pair reductions: two launches per pair. The first streams the pair once: every program walks its
share of tiles and keeps one accumulator per lane for each reduction, then writes one partial per
reduction (``partials[reduction, program]``). The second, a single program, reduces those partials in
a fixed order, so results are deterministic (no atomics).

Precision: the inputs are widened to fp32 (exact for fp16/bf16/fp32); the difference, the products
and all sums are computed and accumulated in fp64, as in the torch path, because a pair's error can be
far below its magnitude (Σ(c - r)² of a bf16 rounding is ~1e-5 of Σr²) and accumulating millions of
squares in fp32 would cost ~1e-4 relative. Maxima (|d| in fp64, ULP distance in int64) and counts
(int32 per lane, int64 per program) are exact. The fp64 work is a handful of operations per element
(a subtraction, a maximum, an addition and five fused multiply-adds), which Hopper's fp64 units
sustain at a large fraction of memory bandwidth; benchmarks/compare_throughput.py measures the rate.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from ..errors import ParityKitError

__all__ = ["pair_reductions_triton", "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_UNIT_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_REDUCTION_COUNT = 15  # len(metrics.REDUCTIONS), in that order
_BLOCK = 1024  # elements per tile: 4 per thread at 8 warps, so 15 per-lane accumulators fit in registers
_WARPS = 8
_MAX_PROGRAMS = 1024  # enough programs to fill an H200 (132 SMs) several times; the finish step reads them all


@triton.jit
def _finite_split(a, b):
    """(both finite, broken) for fp32 values: broken marks a non-finite value not matched by the same
    non-finite value (both NaN, or the same infinity) on the other side."""
    mag_a = a.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    mag_b = b.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    fin_a = mag_a < 0x7F800000
    fin_b = mag_b < 0x7F800000
    ok = fin_a & fin_b
    agree = (~fin_a) & (~fin_b) & ((a == b) | ((mag_a > 0x7F800000) & (mag_b > 0x7F800000)))
    return ok, ~(ok | agree), fin_a, fin_b


@triton.jit
def _round_to_unit(x, UNIT: tl.constexpr):
    """fp32 ``x`` rounded to the unit dtype (round to nearest even, like torch's casts), as fp32."""
    if UNIT == 0:
        y = x.to(tl.float16).to(tl.float32)
    elif UNIT == 1:
        # on the bit pattern: add half a bf16 ulp, minus one unless the kept last bit is odd, then cut
        # (Triton's interpreter truncates instead); NaN payloads could carry into inf, so NaN stays NaN
        bits = x.to(tl.int32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        y = tl.where(x != x, x, rounded)
    else:
        y = x
    return y


@triton.jit
def _ordered(x, UNIT: tl.constexpr):
    """The unit dtype's bit pattern of fp32 ``x`` (exactly representable in it) as an integer on which
    neighbouring floats are neighbouring integers; -0 and +0 map to 0."""
    if UNIT == 0:
        bits = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        mag = bits & 0x7FFF
    elif UNIT == 1:
        bits = x.to(tl.int32, bitcast=True) >> 16  # the bf16 pattern, sign-extended: the low half is zero
        mag = bits & 0x7FFF
    else:
        bits = x.to(tl.int32, bitcast=True)
        mag = bits & 0x7FFFFFFF
    return tl.where(bits < 0, -mag, bits).to(tl.int64)


@triton.jit
def _floor_terms(side, side_t, side_fin, valid, ROUNDED: tl.constexpr):
    """Per lane: the squared rounding error of ``side`` (fp32) rounded to the unit (``side_t``), its square and
    whether the rounding broke a value (overflow to inf)."""
    if ROUNDED:
        ok_f, bad_f, _, _ = _finite_split(side, side_t)
        rf = tl.where(ok_f, side, 0.0).to(tl.float64)
        e = tl.where(ok_f, side_t, 0.0).to(tl.float64) - rf
        return e * e, rf * rf, (valid & bad_f).to(tl.int32)
    # rounding is exact: every finite value matches itself, every non-finite one agrees
    rf = tl.where(side_fin, side, 0.0).to(tl.float64)
    return tl.zeros_like(rf), rf * rf, tl.zeros_like(valid).to(tl.int32)


# Long on purpose: a Triton kernel is one compiled body, and its fifteen per-lane accumulators
# live in registers only while they stay in one function's scope.
@triton.jit(do_not_specialize=["tiles_per_program", "num_programs"])
def _pair_partials(ref_ptr, cand_ptr, part_ptr, n, tiles_per_program, num_programs,
                   UNIT: tl.constexpr, ROUND_REF: tl.constexpr, ROUND_CAND: tl.constexpr,
                   FLOOR_FROM_CAND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.float64)
    max_abs, sum_abs, sum_d2, sum_r2, sum_c2, dot, floor_err, floor_r2 = zero, zero, zero, zero, zero, zero, zero, zero
    kept = tl.zeros([BLOCK], dtype=tl.int32)
    bad_n, nonfinite, ulp_bad, ulp_ok, floor_bad = kept, kept, kept, kept, kept
    ulp = tl.zeros([BLOCK], dtype=tl.int64)
    # programs take tiles round-robin, so at any moment they stream neighbouring memory
    start = pid.to(tl.int64) * BLOCK
    stride = num_programs.to(tl.int64) * BLOCK
    r_raw = tl.load(ref_ptr + start + lanes, mask=start + lanes < n, other=0.0)
    c_raw = tl.load(cand_ptr + start + lanes, mask=start + lanes < n, other=0.0)
    for i in range(0, tiles_per_program):
        valid = start + lanes < n
        # the next tile's loads go out before this tile's arithmetic, so memory latency overlaps it
        next_offs = start + stride + lanes
        r_next = tl.load(ref_ptr + next_offs, mask=next_offs < n, other=0.0)
        c_next = tl.load(cand_ptr + next_offs, mask=next_offs < n, other=0.0)
        r = r_raw.to(tl.float32)
        c = c_raw.to(tl.float32)
        ok, bad, fin_r, fin_c = _finite_split(r, c)
        # padded lanes read 0 and are "ok": they add nothing to a sum or a maximum, only counts mask them
        kept += (valid & (ok | bad)).to(tl.int32)
        bad_n += (valid & bad).to(tl.int32)
        nonfinite += (valid & ~fin_c).to(tl.int32)
        r64 = tl.where(ok, r, 0.0).to(tl.float64)
        c64 = tl.where(ok, c, 0.0).to(tl.float64)
        d = c64 - r64
        ad = tl.abs(d)
        max_abs = tl.maximum(max_abs, ad)
        sum_abs += ad
        sum_d2 += d * d
        sum_r2 += r64 * r64
        sum_c2 += c64 * c64
        dot += r64 * c64
        # ULPs: both sides rounded to the unit dtype first
        if ROUND_REF:
            rt = _round_to_unit(r, UNIT)
        else:
            rt = r
        if ROUND_CAND:
            ct = _round_to_unit(c, UNIT)
        else:
            ct = c
        if ROUND_REF or ROUND_CAND:
            ok_t, bad_t, _, _ = _finite_split(rt, ct)
        else:
            ok_t, bad_t = ok, bad
        ulp_bad += (valid & bad_t).to(tl.int32)
        ulp_ok += (valid & ok_t).to(tl.int32)
        a = _ordered(tl.where(ok_t, rt, 0.0), UNIT)
        b = _ordered(tl.where(ok_t, ct, 0.0), UNIT)
        ulp = tl.maximum(ulp, tl.abs(a - b))
        # the floor: the reference (or, for a wider candidate, the candidate) against itself rounded to the unit
        if FLOOR_FROM_CAND:
            e2, s2, fb = _floor_terms(c, ct, fin_c, valid, ROUND_CAND)
        else:
            e2, s2, fb = _floor_terms(r, rt, fin_r, valid, ROUND_REF)
        floor_err += e2
        floor_r2 += s2
        floor_bad += fb
        start += stride
        r_raw, c_raw = r_next, c_next
    # partials[reduction, program], in metrics.REDUCTIONS order
    base = part_ptr + pid
    tl.store(base + 0 * num_programs, tl.max(max_abs, axis=0))
    tl.store(base + 1 * num_programs, tl.sum(sum_abs, axis=0))
    tl.store(base + 2 * num_programs, tl.sum(sum_d2, axis=0))
    tl.store(base + 3 * num_programs, tl.sum(sum_r2, axis=0))
    tl.store(base + 4 * num_programs, tl.sum(sum_c2, axis=0))
    tl.store(base + 5 * num_programs, tl.sum(dot, axis=0))
    tl.store(base + 6 * num_programs, tl.sum(kept.to(tl.int64), axis=0).to(tl.float64))
    tl.store(base + 7 * num_programs, tl.sum(bad_n.to(tl.int64), axis=0).to(tl.float64))
    tl.store(base + 8 * num_programs, tl.sum(nonfinite.to(tl.int64), axis=0).to(tl.float64))
    tl.store(base + 9 * num_programs, tl.max(ulp, axis=0).to(tl.float64))
    tl.store(base + 10 * num_programs, tl.sum(ulp_bad.to(tl.int64), axis=0).to(tl.float64))
    tl.store(base + 11 * num_programs, tl.sum(ulp_ok.to(tl.int64), axis=0).to(tl.float64))
    tl.store(base + 12 * num_programs, tl.sum(floor_err, axis=0))
    tl.store(base + 13 * num_programs, tl.sum(floor_r2, axis=0))
    tl.store(base + 14 * num_programs, tl.sum(floor_bad.to(tl.int64), axis=0).to(tl.float64))


@triton.jit(do_not_specialize=["num_programs"])
def _finish(part_ptr, out_ptr, num_programs, COUNT: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.arange(0, ROWS)
    present = rows < num_programs
    for k in tl.static_range(COUNT):
        # every partial is >= 0, so the padding 0 is neutral for the maxima too
        v = tl.load(part_ptr + k * num_programs + rows, mask=present, other=0.0)
        if k == 0:  # max_abs
            tl.store(out_ptr + k, tl.max(v, axis=0))
        elif k == 9:  # ulp
            tl.store(out_ptr + k, tl.max(v, axis=0))
        else:
            tl.store(out_ptr + k, tl.sum(v, axis=0))


def pair_reductions_triton(ref: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, *,
                           floor_from_candidate: bool = False) -> torch.Tensor:
    """:func:`parity_kit.comparison.metrics.pair_reductions` in one fused pass: fp64 ``[15]`` on the tensors'
    device, queued without waiting. ``ref`` and ``x`` are fp16/bf16/fp32 tensors of one numel on one
    CUDA device (any layout), ``dtype`` the ULP unit and floor dtype (fp16/bf16/fp32); the floor sums round
    the candidate instead of the reference with ``floor_from_candidate``.

    >>> import torch
    >>> from parity_kit.comparison.metrics import metrics_from_reductions
    >>> if torch.cuda.is_available():  # the kernel needs a GPU (or TRITON_INTERPRET=1 and CPU tensors)
    ...     ref = torch.tensor([3.0, 4.0], device="cuda"); x = torch.tensor([3.0, 4.5], device="cuda")
    ...     print(metrics_from_reductions(pair_reductions_triton(ref, x, torch.float32).tolist())["rel_rms"])
    """
    for name, t in (("reference", ref), ("candidate", x)):
        if t.dtype not in KERNEL_DTYPES:
            raise ParityKitError(f"the fused comparison kernel takes fp16/bf16/fp32 tensors, but the {name} is "
                                 f"{t.dtype}; use metrics.pair_reductions, which falls back to torch for it")
    if dtype not in _UNIT_CODE:
        raise ParityKitError(f"the fused comparison kernel counts ULPs of fp16/bf16/fp32, not {dtype}; "
                             "use metrics.pair_reductions, which falls back to torch for it")
    if ref.numel() != x.numel() or ref.device != x.device:
        raise ParityKitError(f"the pair must have one numel on one device, got {ref.numel()} on {ref.device} "
                             f"vs {x.numel()} on {x.device}; compare tensors of one shape, moved to one device")
    # [*] -> [n]; a copy only for layouts that flatten to no strided view
    r = ref.detach().reshape(-1).contiguous()
    c = x.detach().reshape(-1).contiguous()
    n = r.numel()
    if n == 0:
        return torch.zeros(_REDUCTION_COUNT, dtype=torch.float64, device=r.device)
    tiles = triton.cdiv(n, _BLOCK)
    programs = min(tiles, _MAX_PROGRAMS)
    # one buffer: the partials [15, programs], then the result [15]
    buffer = torch.empty(_REDUCTION_COUNT * (programs + 1), dtype=torch.float64, device=r.device)
    partials, out = buffer[: _REDUCTION_COUNT * programs], buffer[_REDUCTION_COUNT * programs:]
    unit = _UNIT_CODE[dtype]
    # rounding to the unit is skipped (at compile time) where the unit holds every value of the input dtype
    round_ref = _needs_rounding(r.dtype, dtype)
    round_cand = _needs_rounding(c.dtype, dtype)
    flags = (unit, round_ref, round_cand, floor_from_candidate)
    if r.is_cuda and r.device.index != torch.cuda.current_device():
        with torch.cuda.device(r.device):
            _launch(r, c, partials, out, n, tiles, programs, flags)
    else:
        _launch(r, c, partials, out, n, tiles, programs, flags)
    return out


def _needs_rounding(source: torch.dtype, unit: torch.dtype) -> bool:
    return source != unit and not (unit == torch.float32 and source in (torch.float16, torch.bfloat16))


def _launch(r: torch.Tensor, c: torch.Tensor, partials: torch.Tensor, out: torch.Tensor, n: int, tiles: int,
            programs: int, flags: tuple[int, bool, bool, bool]) -> None:
    unit, round_ref, round_cand, floor_from_cand = flags
    _pair_partials[(programs,)](r, c, partials, n, triton.cdiv(tiles, programs), programs,
                                UNIT=unit, ROUND_REF=round_ref, ROUND_CAND=round_cand,
                                FLOOR_FROM_CAND=bool(floor_from_cand), BLOCK=_BLOCK, num_warps=_WARPS)
    _finish[(1,)](partials, out, programs, COUNT=_REDUCTION_COUNT, ROWS=_MAX_PROGRAMS, num_warps=4)


