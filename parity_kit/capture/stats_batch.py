"""Statistics of many captured tensors at once, without a host synchronisation per tensor.

A :class:`StatsBatch` is filled with the outputs of a forward's modules and reduced in few launches (Triton
kernels on CUDA, :mod:`parity_kit.capture.row_kernels`; torch reductions elsewhere); its results are the
:class:`~parity_kit.recording.TensorStats` of each tensor, computed on the first read.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..dtypes import dtype_name
from ..errors import ParityKitError
from ..recording import TensorStats


_TotalsKernel = Callable[..., tuple[torch.Tensor, torch.Tensor, list[int], list[int]]]  # tensor_statistics_triton


_ITEMSIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}  # the kernel dtypes

_HOST_DTYPES = (torch.float32, torch.float64, torch.float16)  # CPU tensors that NumPy reduces (it has no bf16)
_HOST_CHUNK = 2**24  # elements reduced on the host at once: their fp64 copy and squares are 256 MiB


def _chunks(members: list[int], numels: list[int], limit: int) -> list[list[int]]:
    """``members`` in order, cut into runs of at most ``limit`` elements (a larger tensor alone in its run)."""
    out: list[list[int]] = [[]]
    size = 0
    for i in members:
        if out[-1] and size + numels[i] > limit:
            out.append([])
            size = 0
        out[-1].append(i)
        size += numels[i]
    return out


class StatsBatch:
    """Statistics of many tensors, reduced together: a few kernels per group of rows, one transfer.

    Every row (``reshape(-1, shape[-1])``) yields its norm and sum (fp32 accumulation, fp64 for fp64
    tensors) and its min and max; each tensor's totals (fp64) and each row's rms follow from those on
    the device, so the host reads a few numbers per tensor. CUDA tensors of fp16/bf16/fp32 are grouped
    by (device, dtype) and each group takes two Triton launches (three if some rows are not 16-byte
    aligned) that read the tensors in place, whatever their row lengths
    (:func:`parity_kit.capture.row_kernels.tensor_statistics_triton`). The others (CPU tensors, other dtypes, no
    Triton, ``PARITY_KIT_KERNEL=0``) are grouped by (device, dtype, last dimension), each group's rows
    are concatenated and reduced by a handful of torch launches, and segment reductions give the
    totals. On CUDA the reductions and the copy of their results into pinned host memory are queued
    without waiting: nothing blocks until :meth:`result`.
    A tensor whose totals are not finite (NaN/Inf present, or squares that overflowed fp32) is
    recomputed exactly by :meth:`TensorStats.of`, which is why the tensors are held until
    :meth:`result`.

    ``versions`` (optional, one per tensor) are the tensors' ``_version`` counters when they were
    produced; a tensor modified in place since then raises ParityKitError instead of yielding
    statistics of values the module never returned.

    >>> batch = StatsBatch([torch.tensor([[3.0, 4.0]]), torch.arange(4.0)])
    >>> [(s.max, round(s.rms, 6)) for s in batch.result()]
    [(4.0, 3.535534), (3.0, 1.870829)]
    """

    _KERNEL_DTYPES = tuple(_ITEMSIZE)
    _kernel_state: str | _TotalsKernel = "unloaded"  # or "unavailable", "failed", row_kernels.tensor_statistics_triton

    def __init__(self, tensors: list[torch.Tensor], per_token: bool = True,
                 versions: list[int | None] | None = None, labels: Sequence[str] | None = None):
        self.tensors = [t.detach() if t.requires_grad else t for t in tensors]
        self.per_token = per_token
        self.versions = versions
        self.labels = labels
        self._check_versions()
        kernel = self._kernel() if any(t.is_cuda for t in self.tensors) else None
        # The shapes are kept as one flat list of ints and the ranks (no object per tensor left for the
        # garbage collector).
        shapes = [t.shape for t in self.tensors]
        self._shapes = ([size for shape in shapes for size in shape], [len(shape) for shape in shapes])
        numels = [t.numel() for t in self.tensors]
        widths = [shape[-1] if shape else 1 for shape in shapes]
        self._empty = [i for i, n in enumerate(numels) if not n]  # nothing to reduce: exact when settled
        fused, others = self._groups(kernel, numels, widths)
        # per group: device, where its totals and row rms start in the device's flat results, members,
        # rows per member, row length per member, dtype name
        self._layout: list[tuple[torch.device, int, int, list[int], list[int], list[int], str]] = []
        self._host: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._event: dict[torch.device, Any] = {}
        self._settled: dict[int, TensorStats] | None = None  # once settled: exact statistics by position
        self._parts: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._starts: dict[torch.device, tuple[int, int]] = {}
        for (_, dtype), (members, dense, ptrs, rows, row_widths) in fused.items():
            totals, row_rms, counts, lasts = self._fused(kernel, dense, self.per_token,  # type: ignore[arg-type]
                                                         (ptrs, rows, row_widths))
            self._add(dense[0].device, dtype, totals, row_rms, members, counts, lasts)
        on_host: dict[torch.dtype, list[int]] = {}  # CPU tensors NumPy reads: one pass per dtype, any row length
        for (device, dtype, last), members in others.items():
            if device.type == "cpu" and dtype in _HOST_DTYPES:
                on_host.setdefault(dtype, []).extend(members)
                continue
            group = [self.tensors[i] for i in members]
            counts, lasts = [t.numel() // last for t in group], [last] * len(group)
            row_views = [t.reshape(-1, last) for t in group]  # [rows_i, last]
            packed = self._reduce_rows(torch.cat(row_views) if len(row_views) > 1 else row_views[0])  # [4, R]
            totals, row_rms = self._segment_totals(packed, counts, lasts, self.per_token)
            self._add(device, dtype, totals, row_rms, members, counts, lasts)
        for dtype, members in on_host.items():
            for part in _chunks(members, numels, _HOST_CHUNK):
                counts, lasts = [numels[i] // widths[i] for i in part], [widths[i] for i in part]
                totals, row_rms = self._reduce_on_host([self.tensors[i] for i in part], counts, lasts, self.per_token)
                self._add(torch.device("cpu"), dtype, totals, row_rms, part, counts, lasts)
        self._copy_to_host()

    #: a kernel group, keyed (device index, dtype): members, tensors (private dense copies where needed),
    #: addresses, rows, row lengths
    _Fused = dict[tuple[int, torch.dtype], tuple[list[int], list[torch.Tensor], list[int], list[int], list[int]]]

    def _groups(self, kernel: _TotalsKernel | None, numels: list[int],
                widths: list[int]) -> tuple[_Fused, dict[tuple[torch.device, torch.dtype, int], list[int]]]:
        """Kernel groups, one launch each whatever their members' row lengths; the other tensors grouped by
        (device, dtype, row length) for the torch path."""
        tensors, kernel_dtypes = self.tensors, self._KERNEL_DTYPES
        fused: StatsBatch._Fused = {}
        others: dict[tuple[torch.device, torch.dtype, int], list[int]] = {}
        dtypes = [t.dtype for t in tensors]
        dtype = dtypes[0] if dtypes else None
        if (kernel is not None and dtype in kernel_dtypes and not self._empty and dtypes.count(dtype) == len(dtypes)
                and len({t.get_device() for t in tensors}) == 1 and tensors[0].is_cuda):
            # the usual batch, a forward's outputs: one dtype on one GPU, one pass per attribute
            ptrs = [t.data_ptr() for t in tensors]
            if all([t.is_contiguous() for t in tensors]) and not any([p % _ITEMSIZE[dtype] for p in ptrs]):
                rows = [n // w for n, w in zip(numels, widths)]
                fused[(tensors[0].get_device(), dtype)] = (list(range(len(tensors))), tensors, ptrs, rows, widths)
                return fused, others
        for i, t in enumerate(tensors):
            n, width, dtype = numels[i], widths[i], dtypes[i]
            if not n:
                continue
            if kernel is not None and t.is_cuda and dtype in kernel_dtypes:
                group = fused.get((t.get_device(), dtype))
                if group is None:
                    group = fused[(t.get_device(), dtype)] = ([], [], [], [], [])
                ptr = t.data_ptr()
                if ptr % _ITEMSIZE[dtype] or not t.is_contiguous():
                    # the kernels read dense rows at whole-element offsets: a fresh allocation has both
                    t = t.clone(memory_format=torch.contiguous_format)
                    ptr = t.data_ptr()
                group[0].append(i)
                group[1].append(t)
                group[2].append(ptr)
                group[3].append(n // width)
                group[4].append(width)
            else:
                members = others.get((t.device, dtype, width))
                if members is None:
                    others[(t.device, dtype, width)] = [i]
                else:
                    members.append(i)
        return fused, others

    def _add(self, device: torch.device, dtype: torch.dtype, totals: torch.Tensor, row_rms: torch.Tensor,
             members: list[int], counts: list[int], lasts: list[int]) -> None:
        """Register one group's queued results: where they start in the device's flat results."""
        t_start, r_start = self._starts.get(device, (0, 0))
        self._layout.append((device, t_start, r_start, members, counts, lasts, dtype_name(dtype)))
        self._starts[device] = (t_start + totals.numel(), r_start + row_rms.numel())
        totals_parts, rms_parts = self._parts.setdefault(device, ([], []))
        totals_parts.append(totals.reshape(-1))
        rms_parts.append(row_rms)

    def _copy_to_host(self) -> None:
        """Queue each device's results into pinned host memory (CUDA), or keep them (CPU); nothing waits."""
        for device, (totals_parts, rms_parts) in self._parts.items():
            flat = [torch.cat(x) if len(x) > 1 else x[0] for x in (totals_parts, rms_parts)]
            if device.type == "cuda":
                host = tuple(torch.empty(f.shape, dtype=f.dtype, pin_memory=True) for f in flat)
                for h, f in zip(host, flat):
                    h.copy_(f, non_blocking=True)
                event = torch.cuda.Event()  # a device's last event also covers its earlier copies (one stream)
                event.record(torch.cuda.current_stream(device))
                self._event[device] = event
                self._host[device] = host  # type: ignore[assignment]
            else:
                self._host[device] = (flat[0], flat[1])
        self._parts, self._starts = {}, {}

    @staticmethod
    def _segment_totals(packed: torch.Tensor, counts: list[int], lasts: list[int],
                        per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Row statistics ``[4, R]`` -> each member's totals, fp64 ``[4, n]`` (sum of squares, sum, min,
        max), and the per-row rms, fp32 ``[R]`` (empty without ``per_token``), queued on their device."""
        n, rows = len(counts), packed.shape[1]
        meta = torch.tensor([*counts, *lasts], dtype=torch.int64)  # [2n]
        if packed.is_cuda:
            meta = meta.pin_memory().to(packed.device, non_blocking=True)
        lengths, widths = meta[:n], meta[n:]
        norm, sums, lo, hi = packed.double()  # fp64 from here on: sums of many fp32 squares lose digits
        totals = torch.stack([
            torch.segment_reduce(norm.square(), "sum", lengths=lengths, unsafe=True),
            torch.segment_reduce(sums, "sum", lengths=lengths, unsafe=True),
            torch.segment_reduce(lo, "min", lengths=lengths, unsafe=True),
            torch.segment_reduce(hi, "max", lengths=lengths, unsafe=True),
        ])  # [4, n]
        if not per_token:
            return totals, packed.new_empty(0, dtype=torch.float32)
        row_width = torch.repeat_interleave(widths, lengths, output_size=rows)  # [R]
        return totals, (norm / row_width.double().sqrt()).float()

    @staticmethod
    def _reduce_on_host(group: list[torch.Tensor], counts: list[int], lasts: list[int],
                        per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """CPU tensors of one NumPy dtype -> each one's totals, fp64 ``[4, n]``, and the per-row rms, fp32 ``[R]``
        (empty without ``per_token``), as :meth:`_segment_totals` gives them, from NumPy: one flat fp64 copy of
        every tensor and ``reduceat`` over its rows, then over each tensor's rows. A few calls whatever the number
        of tensors and their row lengths, where torch takes a dozen launches per row length (the decode-step
        case: a few dozen small outputs, each of a few rows)."""
        flat = np.concatenate([t.numpy() for t in group], axis=None, dtype=np.float64)  # [E]
        rows, widths = np.asarray(counts, dtype=np.int64), np.asarray(lasts, dtype=np.int64)  # [n]
        row_widths = np.repeat(widths, rows)  # [R]
        row_starts = np.cumsum(row_widths) - row_widths  # [R]
        squares = np.add.reduceat(flat * flat, row_starts)  # [R], fp64 from the first square on
        packed = (squares, np.add.reduceat(flat, row_starts), np.minimum.reduceat(flat, row_starts),
                  np.maximum.reduceat(flat, row_starts))  # 4 × [R]
        firsts = np.cumsum(rows) - rows  # [n]
        totals = np.stack([np.add.reduceat(packed[0], firsts), np.add.reduceat(packed[1], firsts),
                           np.minimum.reduceat(packed[2], firsts), np.maximum.reduceat(packed[3], firsts)])  # [4, n]
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite tensors are recomputed when settled
            row_rms = np.sqrt(squares / row_widths).astype(np.float32) if per_token else np.empty(0, np.float32)
        return torch.from_numpy(totals), torch.from_numpy(row_rms)

    @classmethod
    def _kernel(cls) -> _TotalsKernel | None:
        """The statistics kernels where they can run, else None (no Triton, ``PARITY_KIT_KERNEL=0``, or
        an earlier failure)."""
        if os.environ.get("PARITY_KIT_KERNEL", "1") == "0":
            return None
        if cls._kernel_state == "unloaded":
            try:
                from .row_kernels import tensor_statistics_triton
            except ImportError:  # no Triton in this environment
                cls._kernel_state = "unavailable"
            else:
                cls._kernel_state = tensor_statistics_triton
        return None if isinstance(cls._kernel_state, str) else cls._kernel_state

    @classmethod
    def _fused(cls, kernel: _TotalsKernel, tensors: list[torch.Tensor], per_token: bool,
               layout: tuple[list[int], list[int], list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
        """``(totals, row rms, rows, row lengths)`` of ``tensors`` (dense, one dtype and device; their
        addresses, rows and row lengths in ``layout``) from the kernels, or from torch if they fail."""
        try:
            return kernel(tensors, per_token, layout=layout)
        except (ParityKitError, torch.OutOfMemoryError):
            raise
        except Exception as e:  # a GPU or Triton build the kernel cannot run on: torch gives the same numbers
            cls._kernel_state = "failed"
            warnings.warn(f"the row statistics kernel failed ({type(e).__name__}: {e}); reducing with torch "
                          "(same results, slower)", RuntimeWarning, stacklevel=3)
            lasts = [t.shape[-1] if t.dim() else 1 for t in tensors]
            counts = [t.numel() // n for t, n in zip(tensors, lasts)]
            packed = torch.cat([cls._reduce_rows(t.reshape(-1, n)) for t, n in zip(tensors, lasts)], dim=1)
            return (*cls._segment_totals(packed, counts, lasts, per_token), counts, lasts)

    @staticmethod
    def _reduce_rows(block: torch.Tensor) -> torch.Tensor:
        """``[R, last]`` -> ``[4, R]``: row norms and sums (fp32 accumulation, fp64 for fp64), min, max."""
        if not block.is_floating_point():
            block = block.float()
        acc = torch.float64 if block.dtype == torch.float64 else torch.float32
        lo, hi = torch.aminmax(block, dim=-1)
        return torch.stack([torch.linalg.vector_norm(block, dim=-1, dtype=acc),
                            block.sum(-1, dtype=acc), lo.to(acc), hi.to(acc)])

    def _check_versions(self) -> None:
        if self.versions is None:
            return
        now = [None if v is None else t._version for t, v in zip(self.tensors, self.versions)]
        if now == self.versions:
            return
        for i, (t, v) in enumerate(zip(self.tensors, self.versions)):
            if v is not None and t._version != v:
                what = self.labels[i] if self.labels else f"tensor {i}"
                raise ParityKitError(
                    f"{what} was modified in place after its module returned it, so its statistics "
                    "cannot be deferred; pass stats_batch=0 to record() to reduce each output inside its hook"
                )

    def ready(self) -> bool:
        """Whether the queued reductions have finished (always True for CPU tensors)."""
        return all(event.query() for event in self._event.values())

    def settle(self) -> None:
        """Wait for the queued reductions, then let the tensors go: the few whose totals are not finite
        (and empty ones) get their exact statistics now, the others keep only their shapes. Cheap: no
        Python object per tensor; :meth:`result` builds those."""
        if self._settled is not None:
            return

        tensors, exact = self.tensors, {}
        for event in self._event.values():
            event.synchronize()
        for device, t_start, _, members, _, _, _ in self._layout:
            n = len(members)
            totals = self._host[device][0][t_start:t_start + 4 * n].numpy().reshape(4, n)
            for k in np.flatnonzero(~np.isfinite(totals).all(axis=0)).tolist():  # NaN/Inf present: rare
                if self.versions is not None:
                    self._check_versions()
                exact[members[k]] = TensorStats.of(tensors[members[k]], self.per_token)  # exact masked path
        for i in self._empty:
            exact[i] = TensorStats.of(tensors[i], self.per_token)
        self._settled = exact
        self.tensors = []  # what is left to compute is on the host
        if self._event:  # out of pinned memory, which an unread recording should not hold
            self._host = {device: (totals.clone(), rms.clone()) for device, (totals, rms) in self._host.items()}

    def result(self) -> list[TensorStats]:
        """The statistics, in the order of the tensors given; waits for the queued reductions."""

        self.settle()
        sizes, dims = self._shapes
        exact: dict[int, TensorStats] = self._settled  # type: ignore[assignment]
        ends = np.cumsum(dims).tolist()
        shapes = [tuple(sizes[end - dim:end]) for end, dim in zip(ends, dims)]
        per_token = self.per_token
        out: list[TensorStats | None] = [None] * len(shapes)
        for device, t_start, r_start, members, counts, lasts, dtype in self._layout:
            n = len(members)
            totals_host, rms_host = self._host[device]
            total_sq, total, lo_t, hi_t = totals_host[t_start:t_start + 4 * n].numpy().reshape(4, n)
            elements = np.asarray(counts, dtype=np.float64) * np.asarray(lasts, dtype=np.float64)
            with np.errstate(invalid="ignore", over="ignore"):
                mean, rms = (total / elements).tolist(), np.sqrt(total_sq / elements).tolist()
                absmax = np.maximum(np.abs(lo_t), np.abs(hi_t)).tolist()
            token_rms = rms_host[r_start:r_start + sum(counts)].split(counts) if per_token else [None] * n
            for i, lo, hi, mean_, rms_, absmax_, rows in zip(members, lo_t.tolist(), hi_t.tolist(), mean, rms,
                                                              absmax, token_rms):
                out[i] = TensorStats(shapes[i], dtype, lo, hi, mean_, rms_, absmax_, 0, 0, rows if dims[i] else None)
        for i, stats in exact.items():  # non-finite and empty tensors
            out[i] = stats
        return out  # type: ignore[return-value]
