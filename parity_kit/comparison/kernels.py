"""Fused Triton kernels: :func:`pair_reductions_triton` for :func:`parity_kit.comparison.metrics.pair_reductions`
(one pass over a (reference, candidate) pair computes every reduction the metrics derive from) and
:func:`row_statistics_triton` and :func:`tensor_statistics_triton` for
:class:`parity_kit.recording.model.StatsBatch` (per-row statistics of many tensors in one launch, and each
tensor's totals in one more).

Imported only where Triton is installed (``metrics.pair_reductions`` and ``StatsBatch`` use them for
CUDA tensors of fp16/bf16/fp32 and fall back to their torch paths otherwise). With
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

Row statistics: one launch per (device, dtype) group, reading the tensors where they lie. Stats-mode
capture reduces every module output of a forward, a few hundred tensors per batch, and the forward is
host-bound: concatenating them (a copy of the whole batch) and a handful of torch reductions per row
width cost milliseconds of host time per batch. Instead the host writes one small int64 table, a row
per tensor (element offset from a base tensor, rows, row length, first output row, first work item),
and the kernel addresses every tensor as ``base + offset``. A work item is a tile of rows of one tensor;
a program finds its tensor by binary search over the first-work-item column, so programs are spent
only where rows are, however unequal the tensors (a prefill call next to thousands of decode steps).
Each program walks its rows in column blocks, keeps one fp32 accumulator per lane for Σx, Σx², min and
max, and writes the row's ``[‖x‖₂, Σx, min, max]``: what ``vector_norm``/``sum`` with fp32 accumulation
and ``aminmax`` give, NaN propagating into min and max as in torch. The row addresses come from memory,
so the compiler cannot see that they are aligned; a variant told so (``tl.multiple_of``) issues 16-byte
loads instead of one element at a time. Tensors whose rows do not all start on 16 bytes (a 0-d loss, a
width of 1, a view at an odd offset) go to a second launch of the plain variant, so one of them does
not slow down the rest. :func:`tensor_statistics_triton` adds one launch, a program per tensor, that
sums the tensor's rows in fp64 in a fixed order (its totals) and writes each row's rms; the tables of
all launches go to the device in one upload.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from ..errors import ParityKitError

__all__ = ["pair_reductions_triton", "row_statistics_triton", "tensor_statistics_triton", "KERNEL_DTYPES"]

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


@triton.jit(do_not_specialize=["tiles_per_program", "num_programs"])
def _pair_partials(ref_ptr, cand_ptr, part_ptr, n, tiles_per_program, num_programs,
                   UNIT: tl.constexpr, ROUND_REF: tl.constexpr, ROUND_CAND: tl.constexpr, BLOCK: tl.constexpr):
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
        # the floor: the reference against itself rounded to the unit dtype
        if ROUND_REF:
            ok_f, bad_f, _, _ = _finite_split(r, rt)
            rf = tl.where(ok_f, r, 0.0).to(tl.float64)
            e = tl.where(ok_f, rt, 0.0).to(tl.float64) - rf
            floor_err += e * e
            floor_bad += (valid & bad_f).to(tl.int32)
        else:
            # rounding is exact: every finite value matches itself, every non-finite one agrees
            rf = tl.where(fin_r, r, 0.0).to(tl.float64)
        floor_r2 += rf * rf
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


def pair_reductions_triton(ref: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`parity_kit.comparison.metrics.pair_reductions` in one fused pass: fp64 ``[15]`` on the tensors'
    device, queued without waiting. ``ref`` and ``x`` are fp16/bf16/fp32 tensors of one numel on one
    CUDA device (any layout), ``dtype`` the ULP unit and floor dtype (fp16/bf16/fp32).

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
    if r.is_cuda and r.device.index != torch.cuda.current_device():
        with torch.cuda.device(r.device):
            _launch(r, c, partials, out, n, tiles, programs, unit, round_ref, round_cand)
    else:
        _launch(r, c, partials, out, n, tiles, programs, unit, round_ref, round_cand)
    return out


def _needs_rounding(source: torch.dtype, unit: torch.dtype) -> bool:
    return source != unit and not (unit == torch.float32 and source in (torch.float16, torch.bfloat16))


def _launch(r: torch.Tensor, c: torch.Tensor, partials: torch.Tensor, out: torch.Tensor, n: int, tiles: int,
            programs: int, unit: int, round_ref: bool, round_cand: bool) -> None:
    _pair_partials[(programs,)](r, c, partials, n, triton.cdiv(tiles, programs), programs,
                                UNIT=unit, ROUND_REF=round_ref, ROUND_CAND=round_cand, BLOCK=_BLOCK,
                                num_warps=_WARPS)
    _finish[(1,)](partials, out, programs, COUNT=_REDUCTION_COUNT, ROWS=_MAX_PROGRAMS, num_warps=4)


# elements per program and step (rows × columns), warps, and the widest column block (longer rows are
# walked in steps of it): chosen by `benchmarks/row_stats_throughput.py --sweep` on the H200, where
# small tiles read a 7B-shaped forward's outputs fastest
_ROW_TILE = 1024
_ROW_WARPS = 4
_ROW_STAGES = 3  # Triton's software pipelining of the column loop
_ROW_BLOCK_MAX = 256
_ROW_BLOCK_MIN = 16


@triton.jit(do_not_specialize=["n_tensors", "search_steps", "total_rows"])
def _row_stats(base_ptr, table_ptr, out_ptr, n_tensors, search_steps, total_rows,
               ROWS: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    # table[5, tensor]: element offset from the base, rows, row length, first output row, first work item
    work = tl.program_id(0)
    # the tensor whose work items include this one: the last row of the table whose first item <= work
    lo = work * 0  # a tensor, not 0: a loop-carried value keeps one type
    hi = n_tensors
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        before = tl.load(table_ptr + 4 * n_tensors + mid) <= work
        lo = tl.where(before, mid, lo)
        hi = tl.where(before, hi, mid)
    entry = table_ptr + lo
    offset = tl.load(entry)
    n_rows = tl.load(entry + n_tensors)
    n_cols = tl.load(entry + 2 * n_tensors)
    first_row = tl.load(entry + 3 * n_tensors)
    first_work = tl.load(entry + 4 * n_tensors)
    if ALIGNED:  # every row starts on 16 bytes, checked on the host
        offset = tl.multiple_of(offset, VEC)
        n_cols = tl.multiple_of(n_cols, VEC)
    rows = (work - first_work) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    row_ok = rows < n_rows
    starts = offset + rows * n_cols  # [ROWS], elements from the base
    cols = tl.arange(0, BLOCK)
    total = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    squares = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    low = tl.full([ROWS, BLOCK], float("inf"), tl.float32)
    high = tl.full([ROWS, BLOCK], float("-inf"), tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        c = c0 + cols
        m = row_ok[:, None] & (c < n_cols)[None, :]  # [ROWS, BLOCK]
        x = tl.load(base_ptr + starts[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
        total += x
        squares += x * x
        low = tl.minimum(low, tl.where(m, x, float("inf")), propagate_nan=tl.PropagateNan.ALL)
        high = tl.maximum(high, tl.where(m, x, float("-inf")), propagate_nan=tl.PropagateNan.ALL)
    # tl.min/tl.max skip NaN (minnum/maxnum), so a row's NaN, kept per lane above, is put back
    row_nan = tl.sum((low != low).to(tl.int32), axis=1) > 0  # [ROWS]
    out = out_ptr + first_row + rows  # [ROWS], in row 0 of out[4, total_rows]
    total_rows = total_rows.to(tl.int64)  # 3 * total_rows may pass 2**31
    tl.store(out, tl.sqrt_rn(tl.sum(squares, axis=1)), mask=row_ok)
    tl.store(out + total_rows, tl.sum(total, axis=1), mask=row_ok)
    tl.store(out + 2 * total_rows, tl.where(row_nan, float("nan"), tl.min(low, axis=1)), mask=row_ok)
    tl.store(out + 3 * total_rows, tl.where(row_nan, float("nan"), tl.max(high, axis=1)), mask=row_ok)


def row_statistics_triton(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-row ``[L2 norm, sum, min, max]`` of many tensors in one launch (two when some rows do not
    start on 16 bytes): fp32 ``[4, R]`` on their device, queued without waiting (no host synchronisation).

    ``tensors``: non-empty fp16/bf16/fp32 tensors of one dtype on one CUDA device (CPU under
    ``TRITON_INTERPRET=1``), any shapes. Each is viewed as rows ``t.reshape(-1, t.shape[-1])`` (a 0-d
    tensor as one row of one element); their rows, in order, are the R columns of the result. Norms
    and sums accumulate in fp32; a NaN makes every statistic of its row NaN, an infinity the norm,
    the sum (or NaN, with the opposite infinity) and the extreme on its side, as in torch. Tensors are
    read in place; only a non-contiguous one (or one not aligned to its dtype) is copied first.

    >>> import torch
    >>> if torch.cuda.is_available():  # the kernel needs a GPU (or TRITON_INTERPRET=1 and CPU tensors)
    ...     x = torch.tensor([[3.0, 4.0], [0.0, -2.0]], device="cuda")
    ...     stats = row_statistics_triton([x, torch.tensor(6.0, device="cuda")]).tolist()
    ...     assert stats == [[5.0, 2.0, 6.0], [7.0, -2.0, 6.0], [3.0, -2.0, 6.0], [4.0, 0.0, 6.0]]
    """
    plan = _plan(tensors)
    return plan.launch_rows(plan.upload())


def tensor_statistics_triton(tensors: list[torch.Tensor], per_token: bool = True, *,
                             layout: tuple[list[int], list[int], list[int]] | None = None,
                             ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Each tensor's totals and each row's rms, from :func:`row_statistics_triton`'s rows and one more
    launch: ``(totals, row_rms, rows, widths)``.

    ``totals`` is fp64 ``[4, n]``: per tensor the sum of its rows' squared norms, the sum of its row
    sums, the least row minimum and the greatest row maximum (NaN when any of its rows has one), summed
    in fp64 in a fixed order (deterministic). ``row_rms`` is fp32 ``[R]``, each row's norm divided by
    the square root of its length (computed in fp64, then rounded), or empty without ``per_token``.
    ``rows`` and ``widths`` are the row count and row length of each tensor, as the kernel viewed it.
    Both results stay on the device, queued without waiting; the inputs are as for
    :func:`row_statistics_triton`. A caller that has already read every tensor's address, row count
    and row length passes them as ``layout`` (three lists) and vouches that the tensors are dense,
    start on whole elements and share one dtype and device; that saves a pass over the tensors.

    >>> import torch
    >>> if torch.cuda.is_available():
    ...     x = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, -2.0, 0.0, 0.0]], device="cuda")
    ...     totals, rms, rows, widths = tensor_statistics_triton([x])
    ...     assert totals.tolist() == [[29.0], [5.0], [-2.0], [4.0]] and (rows, widths) == ([2], [4])
    ...     assert rms.tolist() == [2.5, 1.0]
    """
    plan = _plan(tensors) if layout is None else _RowPlan(tensors, *layout)
    table = plan.upload()
    packed = plan.launch_rows(table)  # [4, R]
    n = len(plan.rows)
    totals = torch.empty((4, n), dtype=torch.float64, device=packed.device)  # [4, n]
    row_rms = torch.empty(packed.shape[1] if per_token else 0, dtype=torch.float32, device=packed.device)
    with plan.on_device():
        _tensor_totals[(n,)](packed, plan.segments(table), totals, row_rms, n, packed.shape[1],
                             PER_TOKEN=per_token, BLOCK=_TOTALS_BLOCK, num_warps=4)
    return totals, row_rms, plan.rows, plan.widths


_TOTALS_BLOCK = 256  # rows per step of a tensor's totals: most tensors have a few hundred to thousands


@triton.jit(do_not_specialize=["n_tensors", "total_rows"])
def _tensor_totals(rows_ptr, segments_ptr, totals_ptr, rms_ptr, n_tensors, total_rows,
                   PER_TOKEN: tl.constexpr, BLOCK: tl.constexpr):
    # segments[3, tensor]: first row in rows[4, R], rows, row length; one program per tensor
    tensor = tl.program_id(0)
    first = tl.load(segments_ptr + tensor)
    count = tl.load(segments_ptr + n_tensors + tensor)
    width = tl.load(segments_ptr + 2 * n_tensors + tensor).to(tl.float64)
    total_rows = total_rows.to(tl.int64)
    squares = tl.zeros([BLOCK], dtype=tl.float64)
    sums = tl.zeros([BLOCK], dtype=tl.float64)
    low = tl.full([BLOCK], float("inf"), tl.float32)
    high = tl.full([BLOCK], float("-inf"), tl.float32)
    offsets = tl.arange(0, BLOCK)
    for r0 in range(0, count, BLOCK):
        r = r0 + offsets
        m = r < count
        at = rows_ptr + first + r
        norm = tl.load(at, mask=m, other=0.0).to(tl.float64)
        squares += norm * norm
        sums += tl.load(at + total_rows, mask=m, other=0.0).to(tl.float64)
        low = tl.minimum(low, tl.load(at + 2 * total_rows, mask=m, other=float("inf")),
                         propagate_nan=tl.PropagateNan.ALL)
        high = tl.maximum(high, tl.load(at + 3 * total_rows, mask=m, other=float("-inf")),
                          propagate_nan=tl.PropagateNan.ALL)
        if PER_TOKEN:
            tl.store(rms_ptr + first + r, (norm / tl.sqrt(width)).to(tl.float32), mask=m)
    # tl.min/tl.max skip NaN, so a NaN kept per lane above is put back
    any_nan = tl.sum((low != low).to(tl.int32), axis=0) > 0
    tl.store(totals_ptr + tensor, tl.sum(squares, axis=0))
    tl.store(totals_ptr + n_tensors + tensor, tl.sum(sums, axis=0))
    tl.store(totals_ptr + 2 * n_tensors + tensor, tl.where(any_nan, float("nan"), tl.min(low, axis=0)).to(tl.float64))
    tl.store(totals_ptr + 3 * n_tensors + tensor, tl.where(any_nan, float("nan"), tl.max(high, axis=0)).to(tl.float64))


def _plan(tensors: list[torch.Tensor]) -> _RowPlan:
    """Check ``tensors`` for the kernels and read where their rows lie; non-contiguous (or misaligned)
    ones are copied first."""
    if not tensors:
        raise ParityKitError("row_statistics_triton got no tensors; pass at least one")
    dtype, device = tensors[0].dtype, tensors[0].device
    if dtype not in KERNEL_DTYPES:
        raise ParityKitError(f"the row statistics kernel reads fp16/bf16/fp32 tensors, not {dtype}; "
                             "use TensorStats.of (or StatsBatch, which falls back to torch for it)")
    itemsize, index = tensors[0].element_size(), tensors[0].get_device()
    dense = list(tensors)
    ptrs: list[int] = []
    rows: list[int] = []
    widths: list[int] = []
    for i, t in enumerate(tensors):
        if t.dtype is not dtype or t.get_device() != index:
            raise ParityKitError(f"tensor {i} is {t.dtype} on {t.device}, tensor 0 {dtype} on {device}; "
                                 "call row_statistics_triton once per (device, dtype) group")
        n = t.numel()
        if n == 0:
            raise ParityKitError(f"tensor {i} (shape {tuple(t.shape)}) is empty and has no row statistics; "
                                 "leave empty tensors out")
        ptr = t.data_ptr()
        if ptr % itemsize or not t.is_contiguous():
            # rows must be dense and offsets from the base whole elements: a fresh allocation is both
            t = dense[i] = t.clone(memory_format=torch.contiguous_format)
            ptr = t.data_ptr()
        width = t.shape[-1] if t.dim() else 1
        ptrs.append(ptr)
        rows.append(n // width)
        widths.append(width)
    return _RowPlan(dense, ptrs, rows, widths)


class _RowPlan:
    """Where the rows of a batch of tensors lie: the int64 tables the kernels read, built with NumPy.

    From the tensors' addresses, row counts and row lengths (one Python pass, :func:`_plan`, or the
    caller's), offsets, first rows and work items are computed on arrays. The tables of both row
    launches (rows aligned to 16 bytes and the others) and the per-tensor segments go to the device
    in one upload.
    """

    def __init__(self, tensors: list[torch.Tensor], ptrs: list[int], rows: list[int], widths: list[int]) -> None:
        """``tensors`` dense, each starting on a whole element, of one kernel dtype on one device; their
        addresses, row counts and row lengths already read (:func:`_plan` reads and checks them)."""
        self.device, self.itemsize = tensors[0].device, tensors[0].element_size()
        self.tensors = tensors  # alive until launched: private copies of non-contiguous inputs among them
        self.rows, self.widths = rows, widths
        self.ptrs = np.array(ptrs, dtype=np.int64)
        self.row_counts = np.array(rows, dtype=np.int64)
        self.width_arr = np.array(widths, dtype=np.int64)
        self.first_rows = self.row_counts.cumsum() - self.row_counts
        self.total_rows = int(self.first_rows[-1] + self.row_counts[-1])

    def upload(self) -> torch.Tensor:
        """Both launches' tables and the segments, one int64 tensor on the device; keeps each launch's
        (table start, base tensor, members, work items, column block, rows per item, aligned) for
        :meth:`launch_rows`.

        Every table is column-major (``[5, members]``, segments ``[3, n]``), so the whole upload is one
        concatenation of 1-d arrays: every NumPy call has a fixed host cost, and at the end of a capture
        block the host is what the caller waits for.
        """
        itemsize, ptrs, widths, rows = self.itemsize, self.ptrs, self.width_arr, self.row_counts
        aligned = (ptrs % 16 == 0) & (widths % (16 // itemsize) == 0)
        groups: list[tuple[Any, bool]]
        if aligned.all():  # the usual case (allocator blocks, even row lengths): one launch, no index arrays
            groups = [(slice(None), True)]
        else:
            groups = [(m, hint) for m, hint in ((np.flatnonzero(aligned), True), (np.flatnonzero(~aligned), False))
                      if len(m)]
        parts: list[np.ndarray] = []
        self.launches: list[tuple[int, torch.Tensor, int, int, int, int, bool]] = []
        start = 0
        for members, hint in groups:
            member_ptrs, member_rows, member_widths = ptrs[members], rows[members], widths[members]
            lowest = int(member_ptrs.argmin())  # the lowest address as base keeps every offset >= 0
            base = self.tensors[lowest if isinstance(members, slice) else int(members[lowest])]
            widest = int(member_widths.max())
            # plain integer maths here: triton.cdiv and next_power_of_2 cost microseconds a call on the host
            block = min(_ROW_BLOCK_MAX, max(_ROW_BLOCK_MIN, 1 << (widest - 1).bit_length()))
            rows_per_item = _ROW_TILE // block
            items = (member_rows + (rows_per_item - 1)) // rows_per_item
            ends = items.cumsum()
            parts += [(member_ptrs - member_ptrs[lowest]) // itemsize, member_rows, member_widths,
                      self.first_rows[members], ends - items]  # [5, members]
            self.launches.append((start, base, len(member_ptrs), int(ends[-1]), block, rows_per_item, hint))
            start += 5 * len(member_ptrs)
        self.segments_start = start
        parts += [self.first_rows, rows, widths]  # [3, n]
        host = torch.from_numpy(np.concatenate(parts))
        if self.device.type == "cuda":
            # from pinned memory the upload is queued on the stream, ahead of the kernels, without waiting
            return host.pin_memory().to(self.device, non_blocking=True)
        return host

    def segments(self, table: torch.Tensor) -> torch.Tensor:
        return table[self.segments_start:]

    def on_device(self) -> Any:
        if self.device.type == "cuda" and self.device.index != torch.cuda.current_device():
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def launch_rows(self, table: torch.Tensor) -> torch.Tensor:
        out = torch.empty((4, self.total_rows), dtype=torch.float32, device=self.device)  # [4, R]: norm, sum, min, max
        with self.on_device():
            for start, base, members, work_items, block, rows_per_item, hint in self.launches:
                _row_stats[(work_items,)](base, table[start:], out, members, (members - 1).bit_length(),
                                          self.total_rows, ROWS=rows_per_item, BLOCK=block,
                                          VEC=16 // self.itemsize, ALIGNED=hint, num_warps=_ROW_WARPS,
                                          num_stages=_ROW_STAGES)
        return out
