"""Chunked vs recurrent prefill of the RWKV-7 WKV recurrence: output and state error, where, and how it grows.

The harness runs the same WKV inputs through several *modes* and measures each one against two fp64
yardsticks:

- ``fp64`` — the fp64 recurrence on the *unrounded* inputs: the total error a user sees;
- ``fp64_rounded`` — the fp64 recurrence on the inputs rounded to the low dtype: the algorithm's own
  error, with the rounding of its inputs taken out (the difference between the two is the noise floor
  the inputs' dtype already imposes; it is reported as mode ``reference_rounded`` against ``fp64``);
- ``recurrent`` — chunked modes are also compared directly with the recurrent mode of the same family
  (ours with ours, FLA's with FLA's), the comparison FLA issue #198 reported.

Modes (:data:`MODES`): ``recurrent_fp32_state``, ``recurrent_low_state``, ``chunk_fp32``, ``chunk_low``
(ours, :mod:`parity_kit.models.wkv`), ``fla_chunk`` and ``fla_fused_recurrent`` (flash-linear-attention's
Triton kernels, CUDA only: without fla or a GPU they return a ``"skipped: <reason>"`` result) and
``reference`` (fp64). Every mode also yields the state at every chunk boundary (positions 0, L, 2L, …, T):
chunk modes through ``return_chunk_states``, recurrent modes by running the recurrence segment by
segment and carrying the state, which is the same arithmetic as one run.

Inputs come from :func:`parity_kit.models.wkv.random_wkv_inputs` (decays, ``a = -kk`` and ``b = kk·rate``
drawn like the model's: ``w = -e^{-0.5}σ(2z)``, ``kk`` unit-norm per head, ``r, k, v`` standard normal)
or from a real forward with :func:`parity_kit.analyses.prefill_model.capture_wkv_inputs`.

>>> import torch
>>> from parity_kit.models.wkv import random_wkv_inputs
>>> x = random_wkv_inputs(1, 96, 2, 8, dtype=torch.float64, seed=0)
>>> result = compare_prefill(x, dtypes=("bf16",), modes=("recurrent_fp32_state", "chunk_low"), chunk_size=32)
>>> sorted(result.summary["reference"].unique())
['fp64', 'fp64_rounded', 'recurrent']
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..dtypes import DtypeLike, dtype_name, parse_dtype
from ..errors import ParityKitError
from ..models.wkv import random_wkv_inputs, wkv_chunk, wkv_recurrent, wkv_reference

__all__ = [
    "MODES", "OUR_MODES", "FLA_MODES", "WKVInputs", "ModeRun", "PrefillComparison",
    "fla_unavailable_reason", "boundary_positions", "check_inputs", "run_mode", "compare_prefill", "sweep", "prefill_then_decode",
]

WKVInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

MODES: dict[str, str] = {
    "recurrent_fp32_state": "token by token, state and arithmetic in fp32 (like FLA's fused recurrent kernel)",
    "recurrent_low_state": "token by token, every operation in the input dtype (state rounded every step)",
    "chunk_fp32": "chunked-parallel, every intermediate in fp32",
    "chunk_low": "chunked-parallel, intermediates rounded to the input dtype where FLA's Triton path stores them",
    "fla_chunk": "flash-linear-attention chunk_rwkv7 (Triton, CUDA)",
    "fla_fused_recurrent": "flash-linear-attention fused_recurrent_rwkv7 (Triton, CUDA)",
    "reference": "fp64 recurrence (inputs upcast to fp64)",
}
OUR_MODES = ("recurrent_fp32_state", "recurrent_low_state", "chunk_fp32", "chunk_low")
FLA_MODES = ("fla_chunk", "fla_fused_recurrent")
# the recurrent mode each chunked mode is compared with directly
_RECURRENT_PARTNER = {"chunk_fp32": "recurrent_fp32_state", "chunk_low": "recurrent_fp32_state",
                      "fla_chunk": "fla_fused_recurrent"}
# RWKV-7's log decay lies in (-e^{-0.5}, 0); FLA's chunk kernel uses the bound to pick its fast, centred scheme
_DECAY_LOWER_BOUND = -math.exp(-0.5)


def fla_unavailable_reason() -> str | None:
    """Why FLA's kernels cannot run here (``None`` when they can).

    >>> reason = fla_unavailable_reason()
    >>> reason is None or isinstance(reason, str)
    True
    """
    if importlib.util.find_spec("fla") is None:
        return "flash-linear-attention is not installed (pip install flash-linear-attention==0.6.0 fla-core==0.6.0)"
    if not torch.cuda.is_available():
        return "no CUDA GPU: FLA's RWKV-7 kernels are Triton kernels and need one"
    return None


def boundary_positions(seq_len: int, chunk_size: int) -> list[int]:
    """Token counts at which states are compared: 0, L, 2L, … and always ``seq_len`` last.

    >>> boundary_positions(100, 32)
    [0, 32, 64, 96, 100]
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ParityKitError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    if seq_len < 1:
        raise ParityKitError(f"the sequence has {seq_len} tokens; prefill needs at least one")
    return [*range(0, seq_len, chunk_size), seq_len]


@dataclass
class ModeRun:
    """One mode's result: output ``[B, T, H, V]``, final state ``[B, H, N, V]``, the states at
    ``positions`` (``[B, P, H, N, V]``), wall time, and ``skipped`` ("skipped: <reason>") when it could not run.

    ``segmentation_gap`` (FLA modes): max |difference| between the final state of one kernel call and
    that of the chunk-by-chunk calls used for the boundary states (0 when segmenting is exact).
    """

    mode: str
    dtype: str
    chunk_size: int
    positions: list[int]
    output: torch.Tensor | None = None
    final_state: torch.Tensor | None = None
    boundary_states: torch.Tensor | None = None
    seconds: float = math.nan
    skipped: str | None = None
    segmentation_gap: float | None = None

    @property
    def status(self) -> str:
        """``"ok"`` or the skip reason."""
        return self.skipped or "ok"


def check_inputs(inputs: Sequence[torch.Tensor]) -> WKVInputs:
    """The six WKV tensors (r, w, k, v, a, b) as a tuple, checked for count, layout and matching shapes."""
    if not isinstance(inputs, (tuple, list)) or len(inputs) != 6:
        raise ParityKitError(
            "WKV inputs must be the 6 tensors (r, w, k, v, a, b) in FLA layout [B, T, H, N]; "
            "build them with parity_kit.models.wkv.random_wkv_inputs or capture_wkv_inputs"
        )
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ParityKitError("every WKV input must be a torch.Tensor (r, w, k, v, a, b)")
    return tuple(inputs)  # type: ignore[return-value]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _segmented(step: Callable[[WKVInputs, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
               inputs: WKVInputs, positions: list[int], initial_state: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``step`` segment by segment between ``positions``, carrying the state; returns
    (output [B,T,H,V], final state, states at positions [B,P,H,N,V])."""
    bsz, _, heads, n = inputs[0].shape
    vdim = inputs[3].shape[-1]
    state = initial_state
    states = [state if state is not None else inputs[0].new_zeros(bsz, heads, n, vdim, dtype=torch.float32)]
    outputs = []
    for start, stop in zip(positions[:-1], positions[1:]):
        o, state = step(tuple(t[:, start:stop] for t in inputs), state)  # type: ignore[arg-type]
        outputs.append(o)
        states.append(state)
    # the zero initial state takes the dtype the recurrence chose for the first carried state
    states[0] = states[0].to(states[-1].dtype)
    return torch.cat(outputs, dim=1), state, torch.stack(states, dim=1)  # type: ignore[return-value]


def _fla_functions() -> tuple[Callable[..., Any], Callable[..., Any]]:
    from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
    return chunk_rwkv7, fused_recurrent_rwkv7


def run_mode(inputs: Sequence[torch.Tensor], mode: str, *, chunk_size: int = 64,
             initial_state: torch.Tensor | None = None) -> ModeRun:
    """Run one mode on ``inputs`` (already in the dtype under test) and keep the states at every chunk boundary.

    FLA modes move the inputs to CUDA and are called with ``scale=1.0`` (their default would be
    1/√N); when fla or CUDA is missing the result is ``skipped`` instead of an error.

    >>> import torch
    >>> from parity_kit.models.wkv import random_wkv_inputs
    >>> x = random_wkv_inputs(1, 10, 2, 4, dtype=torch.bfloat16, seed=0)
    >>> run = run_mode(x, "chunk_low", chunk_size=4)
    >>> run.positions, tuple(run.boundary_states.shape)
    ([0, 4, 8, 10], (1, 4, 2, 4, 4))
    """
    x = check_inputs(inputs)
    if mode not in MODES:
        raise ParityKitError(f"unknown prefill mode {mode!r}; choose one of {list(MODES)}")
    seq = x[0].shape[1]
    positions = boundary_positions(seq, chunk_size)
    run = ModeRun(mode, dtype_name(x[0].dtype), chunk_size, positions)
    if mode in FLA_MODES:
        reason = fla_unavailable_reason()
        if reason is not None:
            run.skipped = f"skipped: {reason}"
            return run
        return _run_fla(run, x, mode, chunk_size, initial_state)
    device = x[0].device
    _sync(device)
    start = time.perf_counter()
    if mode in ("chunk_fp32", "chunk_low"):
        low = x[0].dtype if mode == "chunk_low" else None
        o, state, entering = wkv_chunk(*x, initial_state, chunk_size=chunk_size, intermediate_dtype=low,
                                       return_chunk_states=True)
        boundary = torch.cat([entering, state.unsqueeze(1)], dim=1)
    else:
        if mode == "reference":
            def step(seg: WKVInputs, s: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
                return wkv_reference(*seg, s)
        else:
            state_dtype = torch.float32 if mode == "recurrent_fp32_state" else None

            def step(seg: WKVInputs, s: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
                return wkv_recurrent(*seg, s, state_dtype=state_dtype)
        o, state, boundary = _segmented(step, x, positions, initial_state)
    _sync(device)
    run.seconds = time.perf_counter() - start
    run.output, run.final_state, run.boundary_states = o, state, boundary
    return run


def _run_fla(run: ModeRun, x: WKVInputs, mode: str, chunk_size: int,
             initial_state: torch.Tensor | None) -> ModeRun:
    chunk_rwkv7, fused_recurrent_rwkv7 = _fla_functions()
    cuda = torch.device("cuda")
    x = tuple(t.to(cuda).contiguous() for t in x)  # type: ignore[assignment]
    h0 = None if initial_state is None else initial_state.to(cuda, torch.float32).contiguous()

    def step(seg: WKVInputs, s: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        seg = tuple(t.contiguous() for t in seg)  # type: ignore[assignment]
        if mode == "fla_chunk":
            return chunk_rwkv7(*seg, scale=1.0, initial_state=s, output_final_state=True, safe_gate=True,
                               lower_bound=_DECAY_LOWER_BOUND, chunk_size=chunk_size)
        return fused_recurrent_rwkv7(*seg, scale=1.0, initial_state=s, output_final_state=True)

    with torch.no_grad():
        _sync(cuda)
        start = time.perf_counter()
        o, state = step(x, h0)
        _sync(cuda)
        run.seconds = time.perf_counter() - start
        _, seg_state, boundary = _segmented(step, x, run.positions, h0)
    run.output, run.final_state, run.boundary_states = o, state, boundary
    run.segmentation_gap = float((seg_state.double() - state.double()).abs().max())
    return run


# ----------------------------------------------------------------------------------------------- errors
def _errors(ref: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    r = ref.detach().to("cpu", torch.float64)
    d = x.detach().to("cpu", torch.float64) - r
    norm = float(r.square().mean().sqrt())
    rms = float(d.square().mean().sqrt())
    return {"max_abs": float(d.abs().max()), "mean_abs": float(d.abs().mean()),
            "rel_rms": rms / norm if norm > 0 else (0.0 if rms == 0 else math.inf)}


def _per_token(ref: torch.Tensor, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-token sums over batch, heads and channels of |d|, d², ref² and max |d| ([T] each)."""
    r = ref.detach().to("cpu", torch.float64)
    d = x.detach().to("cpu", torch.float64) - r
    dims = (0, 2, 3)
    return {"max": d.abs().amax(dim=dims).numpy(), "abs": d.abs().sum(dim=dims).numpy(),
            "sq": d.square().sum(dim=dims).numpy(), "ref_sq": r.square().sum(dim=dims).numpy(),
            "count": np.full(d.shape[1], d.numel() // d.shape[1], dtype=np.float64)}


def _boundary_errors(ref: ModeRun, run: ModeRun, token: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """State error at each boundary and output error of the tokens since the previous boundary."""
    r = ref.boundary_states.detach().to("cpu", torch.float64)  # type: ignore[union-attr]
    d = run.boundary_states.detach().to("cpu", torch.float64) - r  # type: ignore[union-attr]
    dims = (0, 2, 3, 4)
    s_max = d.abs().amax(dim=dims).numpy()
    s_mean = d.abs().mean(dim=dims).numpy()
    s_rel = (d.square().sum(dim=dims) / r.square().sum(dim=dims).clamp_min(1e-300)).sqrt().numpy()
    starts = np.asarray(run.positions[:-1])
    o_max = np.maximum.reduceat(token["max"], starts)
    o_abs = np.add.reduceat(token["abs"], starts) / np.add.reduceat(token["count"], starts)
    o_rel = np.sqrt(np.add.reduceat(token["sq"], starts) / np.maximum(np.add.reduceat(token["ref_sq"], starts), 1e-300))
    rows = []
    for i, pos in enumerate(run.positions):
        rows.append({"position": pos, "boundary": i, "tensor": "state", "max_abs": float(s_max[i]),
                     "mean_abs": float(s_mean[i]), "rel_rms": float(s_rel[i])})
        if i:
            rows.append({"position": pos, "boundary": i, "tensor": "output", "max_abs": float(o_max[i - 1]),
                         "mean_abs": float(o_abs[i - 1]), "rel_rms": float(o_rel[i - 1])})
    return rows


@dataclass
class PrefillComparison:
    """Result of :func:`compare_prefill`.

    ``summary``: one row per (mode, dtype, reference, tensor) with ``max_abs, mean_abs, rel_rms``,
    ``seconds`` and ``status`` ("ok", "skipped: <reason>", or "non-finite values in the <tensor>"); ``tensor`` is ``output`` (all tokens) or ``state`` (final state).
    ``boundaries``: the state error at every chunk boundary and the output error of the tokens of the
    chunk that ends there. ``per_token``: the output error of every token (``max_abs``, ``rel_rms``).
    ``runs``: the :class:`ModeRun` objects, kept only with ``keep_runs=True``.
    """

    summary: pd.DataFrame
    boundaries: pd.DataFrame
    per_token: pd.DataFrame
    runs: dict[tuple[str, str], ModeRun] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        return self.summary._repr_html_()  # type: ignore[operator]


def _as_exact(inputs: Sequence[torch.Tensor]) -> WKVInputs:
    return tuple(t.detach().to(torch.float64) for t in check_inputs(inputs))  # type: ignore[return-value]


def compare_prefill(
    inputs: Sequence[torch.Tensor],
    *,
    dtypes: Iterable[DtypeLike] = ("bf16",),
    modes: Iterable[str] = OUR_MODES,
    chunk_size: int = 64,
    per_token: bool = True,
    keep_runs: bool = False,
) -> PrefillComparison:
    """Run every mode in every dtype on ``inputs`` and measure output and state error.

    ``inputs`` are taken as exact values (upcast to fp64; pass fp32 or fp64 tensors, e.g. captured from
    an fp32 forward). Per dtype they are rounded once; every mode runs on the rounded inputs and is
    compared with ``fp64`` (fp64 recurrence on the unrounded inputs), ``fp64_rounded`` (fp64 recurrence on
    the rounded inputs) and, for chunked modes, ``recurrent`` (the recurrent mode of the same family in
    the same dtype). Mode ``reference_rounded`` against ``fp64`` is the error the rounding of the inputs
    alone causes. FLA modes without fla/CUDA appear with ``status`` "skipped: <reason>".

    >>> import torch
    >>> from parity_kit.models.wkv import random_wkv_inputs
    >>> x = random_wkv_inputs(1, 64, 2, 8, dtype=torch.float64, seed=0)
    >>> res = compare_prefill(x, dtypes=("fp64",), modes=("chunk_fp32",), chunk_size=16)
    >>> float(res.summary["max_abs"].max()) < 1e-12
    True
    """
    exact = _as_exact(inputs)
    modes = list(modes)
    for mode in modes:
        if mode not in MODES or mode == "reference":
            raise ParityKitError(f"unknown prefill mode {mode!r}; choose from {list(OUR_MODES + FLA_MODES)}")
    seq = exact[0].shape[1]
    ref = run_mode(exact, "reference", chunk_size=chunk_size)
    summary: list[dict[str, Any]] = []
    bounds: list[dict[str, Any]] = []
    tokens: list[pd.DataFrame] = []
    kept: dict[tuple[str, str], ModeRun] = {}
    base = {"T": seq, "chunk_size": chunk_size}

    def measure(run: ModeRun, against: ModeRun, reference: str, dtype: str, label: str | None = None) -> None:
        head = {"mode": label or run.mode, "dtype": dtype, "reference": reference, **base}
        if run.skipped or against.skipped:
            for tensor in ("output", "state"):
                summary.append({**head, "tensor": tensor, "max_abs": math.nan, "mean_abs": math.nan,
                                "rel_rms": math.nan, "seconds": run.seconds, "status": run.skipped or against.skipped})
            return
        for tensor, (r, x) in {"output": (against.output, run.output),
                               "state": (against.final_state, run.final_state)}.items():
            # an overflow must read as a failure of the mode, not as a large but finite error
            finite = bool(torch.isfinite(x).all())  # type: ignore[arg-type]
            summary.append({**head, "tensor": tensor, **_errors(r, x), "seconds": run.seconds,
                            "status": "ok" if finite else f"non-finite values in the {tensor}",
                            "segmentation_gap": run.segmentation_gap})
        token = _per_token(against.output, run.output)  # type: ignore[arg-type]
        bounds.extend({**head, **row} for row in _boundary_errors(against, run, token))
        if per_token:
            rel = np.sqrt(token["sq"] / np.maximum(token["ref_sq"], 1e-300))
            tokens.append(pd.DataFrame({**head, "position": np.arange(seq), "max_abs": token["max"],
                                        "mean_abs": token["abs"] / token["count"], "rel_rms": rel}))

    for dtype in dtypes:
        low_dtype = parse_dtype(dtype)
        name = dtype_name(low_dtype)
        low = tuple(t.to(low_dtype) for t in exact)
        rounded = ref if low_dtype == torch.float64 else run_mode(low, "reference", chunk_size=chunk_size)
        measure(rounded, ref, "fp64", name, label="reference_rounded")
        runs = {mode: run_mode(low, mode, chunk_size=chunk_size) for mode in modes}
        for mode, run in runs.items():
            measure(run, ref, "fp64", name)
            measure(run, rounded, "fp64_rounded", name)
            partner = _RECURRENT_PARTNER.get(mode)
            if partner in runs:
                measure(run, runs[partner], "recurrent", name)
            if keep_runs:
                kept[(mode, name)] = run
        if keep_runs:
            kept[("reference_rounded", name)] = rounded
    if keep_runs:
        kept[("reference", "fp64")] = ref
    return PrefillComparison(
        summary=pd.DataFrame(summary),
        boundaries=pd.DataFrame(bounds),
        per_token=pd.concat(tokens, ignore_index=True) if tokens else pd.DataFrame(),
        runs=kept,
    )


def sweep(
    lengths: Iterable[int],
    *,
    dtypes: Iterable[DtypeLike] = ("bf16",),
    chunk_sizes: Iterable[int] = (64,),
    modes: Iterable[str] = OUR_MODES,
    heads: int = 16,
    head_dim: int = 64,
    seed: int = 0,
    inputs: Sequence[torch.Tensor] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Summary errors for every (length, chunk size, dtype, mode, reference, tensor), as one tidy DataFrame.

    All lengths are prefixes of one sequence (``inputs``, or ``random_wkv_inputs(1, max(lengths), heads,
    head_dim, dtype=fp64, seed=seed)``), so a longer prefill sees the same tokens plus more.
    Columns: those of :attr:`PrefillComparison.summary`.

    >>> table = sweep([32, 64], chunk_sizes=[16], heads=1, head_dim=8, modes=["chunk_low"], progress=False)
    >>> sorted(table["T"].unique().tolist())
    [32, 64]
    """
    lengths = sorted({int(t) for t in lengths})
    chunk_sizes = list(chunk_sizes)
    if not lengths or lengths[0] < 1:
        raise ParityKitError(f"lengths must be positive token counts; got {lengths}")
    if inputs is None:
        source = random_wkv_inputs(1, lengths[-1], heads, head_dim, dtype=torch.float64, seed=seed)
    else:
        source = _as_exact(inputs)
        if source[0].shape[1] < lengths[-1]:
            raise ParityKitError(f"the inputs have {source[0].shape[1]} tokens but lengths go up to {lengths[-1]}; "
                                 "capture a longer sequence or shorten lengths")
    dtypes, modes = list(dtypes), list(modes)
    tables = []
    jobs = [(t, c) for c in chunk_sizes for t in lengths]
    for seq, chunk in tqdm(jobs, desc="prefill sweep", disable=not progress):
        prefix = tuple(x[:, :seq] for x in source)
        tables.append(compare_prefill(prefix, dtypes=dtypes, modes=modes, chunk_size=chunk, per_token=False).summary)
    return pd.concat(tables, ignore_index=True)


def prefill_then_decode(
    inputs: Sequence[torch.Tensor],
    prefill_tokens: int,
    *,
    dtype: DtypeLike = "bf16",
    prefill_mode: str = "chunk_low",
    decode_mode: str = "recurrent_fp32_state",
    chunk_size: int = 64,
) -> pd.DataFrame:
    """Prefill ``prefill_tokens`` in ``prefill_mode``, then decode the rest one token per call in
    ``decode_mode`` (state carried as the decoder keeps it), vs one full prefill in ``prefill_mode``.

    Rows (``comparison``): ``prefill+decode vs full prefill``, ``prefill+decode vs fp64``,
    ``full prefill vs fp64``, ``prefill+decode vs fp64_rounded``, ``full prefill vs fp64_rounded``;
    ``tensor``: ``output`` (the decoded tokens only) and ``state`` (final).

    >>> import torch
    >>> from parity_kit.models.wkv import random_wkv_inputs
    >>> x = random_wkv_inputs(1, 40, 2, 8, dtype=torch.float64, seed=0)
    >>> t = prefill_then_decode(x, 32, dtype="fp64", chunk_size=16)
    >>> float(t["max_abs"].max()) < 1e-12
    True
    """
    exact = _as_exact(inputs)
    seq = exact[0].shape[1]
    if not 0 < prefill_tokens < seq:
        raise ParityKitError(f"prefill_tokens={prefill_tokens} must be between 1 and {seq - 1} (the sequence has "
                             f"{seq} tokens and at least one must be decoded)")
    for role, mode in (("prefill_mode", prefill_mode), ("decode_mode", decode_mode)):
        if mode not in MODES or mode == "reference":
            raise ParityKitError(f"{role}={mode!r} is not a mode; choose from {list(OUR_MODES + FLA_MODES)}")
    low_dtype = parse_dtype(dtype)
    low = tuple(t.to(low_dtype) for t in exact)
    full = run_mode(low, prefill_mode, chunk_size=chunk_size)
    first = run_mode(tuple(t[:, :prefill_tokens] for t in low), prefill_mode, chunk_size=chunk_size)
    skipped = full.skipped or first.skipped
    if skipped is None:
        state = first.final_state
        decoded = []
        for t in range(prefill_tokens, seq):
            # one call per token, as a decoder makes them; boundary states are not needed here
            step = run_mode(tuple(x[:, t:t + 1] for x in low), decode_mode, chunk_size=1, initial_state=state)
            if step.skipped:
                skipped = step.skipped
                break
            decoded.append(step.output)
            state = step.final_state
    ref = run_mode(exact, "reference", chunk_size=chunk_size)
    rounded = run_mode(low, "reference", chunk_size=chunk_size)
    head = {"T": seq, "prefill_tokens": prefill_tokens, "dtype": dtype_name(low_dtype), "prefill_mode": prefill_mode,
            "decode_mode": decode_mode, "chunk_size": chunk_size}
    rows = []
    if skipped is not None:
        for comparison in ("prefill+decode vs full prefill", "prefill+decode vs fp64", "full prefill vs fp64",
                           "prefill+decode vs fp64_rounded", "full prefill vs fp64_rounded"):
            for tensor in ("output", "state"):
                rows.append({**head, "comparison": comparison, "tensor": tensor, "max_abs": math.nan,
                             "mean_abs": math.nan, "rel_rms": math.nan, "status": skipped})
        return pd.DataFrame(rows)
    split = {"output": torch.cat([o.to("cpu") for o in decoded], dim=1), "state": state}
    tail = {"output": full.output[:, prefill_tokens:], "state": full.final_state}  # type: ignore[index]
    refs = {"fp64": {"output": ref.output[:, prefill_tokens:], "state": ref.final_state},  # type: ignore[index]
            "fp64_rounded": {"output": rounded.output[:, prefill_tokens:], "state": rounded.final_state}}  # type: ignore[index]
    pairs = [("prefill+decode vs full prefill", tail, split)]
    for name, r in refs.items():
        pairs += [(f"prefill+decode vs {name}", r, split), (f"full prefill vs {name}", r, tail)]
    for comparison, r, x in pairs:
        for tensor in ("output", "state"):
            rows.append({**head, "comparison": comparison, "tensor": tensor, **_errors(r[tensor], x[tensor]),
                         "status": "ok"})
    return pd.DataFrame(rows)
