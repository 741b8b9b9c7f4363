"""The data model of a recording: one :class:`Call` per module call, each tensor leaf kept as a tensor
(``mode="tensors"``) or summarised as :class:`TensorStats` (``mode="stats"``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..dtypes import dtype_name, parse_dtype
from ..errors import ParityKitError

Mode = Literal["tensors", "stats"]


def torch_dtype(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name` for every dtype a recording can hold (floats, ints, bool)."""
    try:
        return parse_dtype(name)
    except ParityKitError:
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            return dtype
        raise


@dataclass
class TensorStats:
    """Summary of one captured tensor when the tensor itself is not kept (``mode="stats"``).

    ``min, max, mean, rms, absmax`` are computed in fp32 over the finite values only; ``nan`` and
    ``inf`` count the non-finite ones. ``per_token_rms`` (fp32, CPU) has one value per row of the last
    dimension, i.e. ``shape[:-1]`` flattened; statistics of an empty tensor or of a tensor without any
    finite value are NaN.

    >>> s = TensorStats.of(torch.tensor([[3.0, 4.0], [float("nan"), 1.0]]))
    >>> (s.max, s.nan, s.per_token_rms.tolist()[0])
    (4.0, 1, 3.535533905029297)
    """

    shape: tuple[int, ...]
    dtype: str
    min: float
    max: float
    mean: float
    rms: float
    absmax: float
    nan: int
    inf: int
    per_token_rms: torch.Tensor | None = None

    @classmethod
    def of(cls, tensor: torch.Tensor, per_token: bool = True) -> TensorStats:
        """Statistics of ``tensor`` with one host synchronisation (two when it holds NaN/Inf)."""
        if not isinstance(tensor, torch.Tensor):
            raise ParityKitError(f"TensorStats.of takes a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != "cpu":
            return cls._of(tensor, per_token)
        # A handful of small reductions per module: on a busy CPU every multi-threaded op waits at a
        # thread barrier, and those waits, not the arithmetic, dominated the stats-mode overhead.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return cls._of(tensor, per_token)
        finally:
            torch.set_num_threads(threads)

    @classmethod
    def _of(cls, tensor: torch.Tensor, per_token: bool) -> TensorStats:
        t = tensor.detach()
        shape, dtype = tuple(t.shape), dtype_name(t.dtype)
        if t.numel() == 0:
            nan_ = float("nan")
            return cls(shape, dtype, nan_, nan_, nan_, nan_, nan_, 0, 0, None)
        x = t.float() if t.dtype != torch.float64 else t
        rows = x.reshape(-1, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1)  # [tokens, last]
        # Fast path: aminmax propagates NaN/Inf, so finite extremes prove the tensor is finite and
        # the plain sums are the finite sums; only otherwise do we pay for masks.
        lo, hi = torch.aminmax(rows)
        row_sq = torch.linalg.vector_norm(rows, dim=-1).square()
        summary = torch.stack([lo, hi, rows.sum(), row_sq.sum()]).tolist()
        if all(math.isfinite(v) for v in summary):
            n_nan = n_inf = 0
            count = rows.numel()
            lo_v, hi_v, total, total_sq = summary
            row_count = torch.full((rows.shape[0],), rows.shape[1], dtype=rows.dtype, device=rows.device)
        else:
            rows = rows.double()  # rare path; fp64 also rescues sums of squares that overflowed fp32
            finite = torch.isfinite(rows)
            zeroed = torch.where(finite, rows, 0.0)
            row_count = finite.sum(-1).to(rows.dtype)
            row_sq = zeroed.square().sum(-1)
            big = torch.finfo(rows.dtype).max
            packed = torch.stack([
                torch.isnan(rows).sum().to(rows.dtype), finite.sum().to(rows.dtype),
                torch.where(finite, rows, big).min(), torch.where(finite, rows, -big).max(),
                zeroed.sum(), row_sq.sum(),
            ]).tolist()
            n_nan, count = int(packed[0]), int(packed[1])
            n_inf = rows.numel() - count - n_nan
            lo_v, hi_v, total, total_sq = packed[2:]
            if count == 0:
                lo_v = hi_v = total = total_sq = float("nan")
        mean = total / count if count else float("nan")
        rms = math.sqrt(total_sq / count) if count else float("nan")
        per_token_rms = None
        if per_token and t.dim() > 0:
            per_token_rms = (row_sq / row_count).sqrt().float().cpu()
        return cls(shape, dtype, float(lo_v), float(hi_v), float(mean), float(rms),
                   float(max(abs(lo_v), abs(hi_v))), n_nan, n_inf, per_token_rms)

    def _to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "min": self.min, "max": self.max,
                "mean": self.mean, "rms": self.rms, "absmax": self.absmax, "nan": self.nan, "inf": self.inf}


@dataclass
class Call:
    """One completed call of one module: its tensor leaves (or their statistics).

    ``orig_dtypes`` maps a leaf to the dtype the model produced when ``record(dtype=...)`` cast it on
    capture; comparisons use it for the noise floor and ULPs. A leaf not listed kept its dtype.

    >>> c = Call("mlp", 0, 0, {"output": torch.ones(2), "input.0": torch.zeros(2)})
    >>> list(c.outputs), list(c.inputs), c.output.tolist()
    (['output'], ['input.0'], [1.0, 1.0])
    """

    module: str
    index: int
    order: int
    tensors: dict[str, torch.Tensor | TensorStats]
    orig_dtypes: dict[str, str] = field(default_factory=dict)

    @property
    def outputs(self) -> dict[str, torch.Tensor | TensorStats]:
        """The output leaves ("output", "output.0", "output.logits", ...)."""
        return {k: v for k, v in self.tensors.items() if k == "output" or k.startswith("output.")}

    @property
    def inputs(self) -> dict[str, torch.Tensor | TensorStats]:
        """The input leaves ("input.0", "input.hidden_states", ...), captured with ``inputs=True``."""
        return {k: v for k, v in self.tensors.items() if k.startswith("input.")}

    @property
    def output(self) -> torch.Tensor | TensorStats:
        """The primary output: leaf "output" if the module returned one tensor, else the first output leaf."""
        outs = self.outputs
        if not outs:
            raise ParityKitError(
                f"call {self.index} of module {self.module!r} has no tensor output "
                "(it returned None or only non-tensor objects); use call.inputs or another module"
            )
        return outs.get("output", next(iter(outs.values())))

    def orig_dtype(self, leaf: str) -> str:
        """Dtype name of ``leaf`` as the model produced it (before any cast on capture)."""
        if leaf in self.orig_dtypes:
            return self.orig_dtypes[leaf]
        value = self.tensors[leaf]
        return value.dtype if isinstance(value, TensorStats) else dtype_name(value.dtype)
