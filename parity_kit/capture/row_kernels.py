"""Fused Triton kernels of :class:`parity_kit.capture.stats_batch.StatsBatch`: :func:`row_statistics_triton`
(per-row statistics of many tensors in one launch) and :func:`tensor_statistics_triton` (each tensor's totals in
one more).

Imported only where Triton is installed (``StatsBatch`` uses them for CUDA tensors of fp16/bf16/fp32 and falls
back to its torch path otherwise). With ``TRITON_INTERPRET=1`` set before this module is imported, the same
kernels run on CPU tensors through Triton's interpreter (how the tests check them without a GPU).

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

__all__ = ["KERNEL_DTYPES", "row_statistics_triton", "tensor_statistics_triton"]

#: The dtypes the kernels read.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Elements per program and step (rows × columns), warps, pipelining depth (Triton's software pipelining of
# the column loop) and the widest column block (longer rows are walked in steps of it). On the H200,
# `benchmarks/row_stats_throughput.py --sweep` measured these 1.35 ms for a 7B-shaped forward's outputs
# against 1.265 ms for the fastest of its 63 settings (results/row_stats_throughput_h200.json), a gap within
# the sweep's run-to-run noise, so they stay.
_ROW_TILE = 1024
_ROW_WARPS = 4
_ROW_STAGES = 3
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
