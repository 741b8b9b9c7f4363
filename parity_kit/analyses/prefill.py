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
or from a real forward with :func:`capture_wkv_inputs`.

>>> import torch
>>> from parity_kit.models.wkv import random_wkv_inputs
>>> x = random_wkv_inputs(1, 96, 2, 8, dtype=torch.float64, seed=0)
>>> result = compare_prefill(x, dtypes=("bf16",), modes=("recurrent_fp32_state", "chunk_low"), chunk_size=32)
>>> sorted(result.summary["reference"].unique())
['fp64', 'fp64_rounded', 'recurrent']
"""

from __future__ import annotations

import copy
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
    "MODES", "OUR_MODES", "FLA_MODES", "WKVInputs", "ModeRun", "PrefillComparison", "ModelModeComparison",
    "fla_unavailable_reason", "boundary_positions", "run_mode", "compare_prefill", "sweep", "prefill_then_decode",
    "capture_wkv_inputs", "model_mode_comparison", "lastword_by_mode",
    # story 03 notebook helpers
    "REPORTED_FIGURES", "StoryPlan", "story_plan", "error_pivot", "reference_scale", "state_growth", "length_table",
    "chunk_size_table", "decode_comparison", "StoryModel", "load_story_model", "lastword_prompt_ids",
    "StoredKernelFigures", "stored_kernel_figures", "stored_kernel_table", "reported_vs_measured", "conclude_prefill",
    "explore",
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
# the same modes as switches of parity_kit.models.rwkv7.set_wkv_mode
_MODEL_MODES: dict[str, dict[str, str]] = {
    "recurrent_fp32_state": {"mode": "recurrent", "state_dtype": "fp32"},
    "recurrent_low_state": {"mode": "recurrent", "state_dtype": "model"},
    "chunk_fp32": {"mode": "chunk", "intermediate_dtype": "fp32"},
    "chunk_low": {"mode": "chunk", "intermediate_dtype": "input"},
}


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


def _check_inputs(inputs: Sequence[torch.Tensor]) -> WKVInputs:
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
    x = _check_inputs(inputs)
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
    return tuple(t.detach().to(torch.float64) for t in _check_inputs(inputs))  # type: ignore[return-value]


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


# ----------------------------------------------------------------------------------------------- model level
def _wkv_module_name(model: torch.nn.Module, layer: int) -> str:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(layers[0].attn, "wkv"):
        raise ParityKitError(f"{type(model).__name__} has no model.layers[i].attn.wkv module; pass a parity_kit "
                             "RWKV7ForCausalLM (pk.models.load('tiny-rwkv7') or a local RWKV-7 folder)")
    if not -len(layers) <= layer < len(layers):
        raise ParityKitError(f"layer={layer} is out of range: the model has {len(layers)} layers (0…{len(layers) - 1})")
    return f"model.layers.{layer % len(layers)}.attn.wkv"


def capture_wkv_inputs(model: torch.nn.Module, input_ids: torch.Tensor, layer: int = 0) -> WKVInputs:
    """The WKV inputs ``(r, w, k, v, a, b)`` of one layer during a real forward of ``model`` on ``input_ids``.

    They come back in the model's dtype; run the model in fp32 or fp64 so they can serve as the
    "unrounded" inputs of :func:`compare_prefill`.

    >>> import torch
    >>> from parity_kit.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
    >>> cfg = RWKV7Config(hidden_size=32, num_hidden_layers=2, head_dim=16, vocab_size=20, decay_low_rank_dim=8,
    ...                   gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8)
    >>> r, w, k, v, a, b = capture_wkv_inputs(RWKV7ForCausalLM(cfg).eval(), torch.tensor([[0, 3, 4]]), layer=1)
    >>> tuple(r.shape)
    (1, 3, 2, 16)
    """
    from ..capture.recorder import record

    name = _wkv_module_name(model, layer)
    with torch.no_grad(), record(model, modules=[name], inputs=True) as rec:
        model(input_ids, use_cache=False)
    call = rec[name][0]
    return tuple(call.tensors[f"input.{i}"] for i in range(6))  # type: ignore[return-value]


@dataclass
class ModelModeComparison:
    """Result of :func:`model_mode_comparison`.

    ``summary``: per (dtype, mode) and tensor (``logits``; ``layer i wkv output``, ``layer i wkv state``,
    ``layer i block output``) the errors against the reference, with ``layer`` (None for logits).
    ``tables``: the full :func:`parity_kit.compare` table per ``(dtype, mode)``.
    """

    summary: pd.DataFrame
    tables: dict[tuple[str, str], pd.DataFrame]
    reference: str

    def _repr_html_(self) -> str:
        return self.summary._repr_html_()  # type: ignore[operator]


def _model_variant(master: torch.nn.Module, dtype: torch.dtype, mode: str, chunk_size: int) -> torch.nn.Module:
    from ..models.rwkv7 import set_wkv_mode

    model = copy.deepcopy(master).to(dtype).eval()
    if mode == "reference":
        set_wkv_mode(model, "fp64")
    else:
        set_wkv_mode(model, chunk_size=chunk_size, **_MODEL_MODES[mode])
    return model


def _check_model_modes(modes: Sequence[str]) -> None:
    for mode in modes:
        if mode not in _MODEL_MODES:
            raise ParityKitError(f"model mode {mode!r} is not one of {list(_MODEL_MODES)} (FLA modes run on "
                                 "kernels only, not inside parity_kit's model)")


def model_mode_comparison(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    dtypes: Iterable[DtypeLike] = ("bf16", "fp16"),
    modes: Iterable[str] = ("recurrent_fp32_state", "chunk_low"),
    chunk_size: int = 64,
    reference_dtype: DtypeLike = "fp64",
) -> ModelModeComparison:
    """Forward ``model`` in every (dtype, WKV mode) and compare logits and every layer's WKV output,
    WKV state and block output with a reference forward (``reference_dtype`` weights, WKV in fp64),
    through :func:`parity_kit.compare`. ``model`` itself is not modified (copies are cast).

    >>> import torch
    >>> from parity_kit.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
    >>> cfg = RWKV7Config(hidden_size=32, num_hidden_layers=2, head_dim=16, vocab_size=20, decay_low_rank_dim=8,
    ...                   gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8)
    >>> res = model_mode_comparison(RWKV7ForCausalLM(cfg).eval(), torch.tensor([[0, 3, 4, 5]]), dtypes=["fp32"],
    ...                             chunk_size=2)
    >>> sorted(res.summary["mode"].unique())
    ['chunk_low', 'recurrent_fp32_state']
    """
    from ..capture.recorder import record
    from ..comparison.compare import compare

    modes = list(modes)
    _check_model_modes(modes)
    layers = len(model.model.layers)  # type: ignore[union-attr]
    _wkv_module_name(model, 0)
    names = ["", *[f"model.layers.{i}" for i in range(layers)], *[f"model.layers.{i}.attn.wkv" for i in range(layers)]]
    master = _model_variant(model, parse_dtype(reference_dtype), "reference", chunk_size)
    device = next(model.parameters()).device
    ids = input_ids.to(device)

    def recorded(m: torch.nn.Module) -> Any:
        with torch.no_grad(), record(m, modules=names) as rec:
            m(ids, use_cache=False)
        return rec

    ref_rec = recorded(master)
    rows, tables = [], {}
    for dtype in dtypes:
        torch_dtype = parse_dtype(dtype)
        for mode in modes:
            cand = _model_variant(master, torch_dtype, mode, chunk_size)
            table = compare(ref_rec, recorded(cand))
            del cand
            tables[(dtype_name(torch_dtype), mode)] = table
            for _, row in table[table["status"] == "ok"].iterrows():
                module, leaf = row["module"], row["tensor"]
                if module == "":
                    if leaf != "output.logits":
                        continue
                    label, layer = "logits", None
                else:
                    layer = int(module.split(".")[2])
                    if module.endswith(".attn.wkv"):
                        label = {"output.0": "wkv output", "output.1": "wkv state"}.get(leaf)
                    else:
                        label = "block output" if leaf == "output.0" else None
                    if label is None:
                        continue
                rows.append({"dtype": dtype_name(torch_dtype), "mode": mode, "tensor": label, "layer": layer,
                             "max_abs": row["max_abs"], "mean_abs": row["mean_abs"], "rel_rms": row["rel_rms"],
                             "floor": row["floor"], "verdict": row["verdict"]})
    return ModelModeComparison(pd.DataFrame(rows), tables, dtype_name(parse_dtype(reference_dtype)))


def lastword_by_mode(
    model: torch.nn.Module,
    tokenizer: Any,
    path: Any,
    *,
    dtypes: Iterable[DtypeLike] = ("bf16", "fp16"),
    modes: Iterable[str] = ("recurrent_fp32_state", "chunk_low"),
    chunk_size: int = 64,
    reference_dtype: DtypeLike = "fp64",
    limit: int | None = None,
    n_bootstrap: int = 10_000,
) -> pd.DataFrame:
    """Last-word perplexity and accuracy of every (dtype, mode), plus the reference (``reference_dtype``
    weights, fp64 WKV), via :func:`parity_kit.evaluate_lastword` (BOS prepended); with the paired
    difference in mean log-likelihood against the reference and its z score. A mode whose logits overflow
    gets ``status`` "non-finite logits" and NaN figures instead of stopping the whole table.

    >>> table = lastword_by_mode(model, tok, "data/eval/lastword.jsonl", limit=20)  # doctest: +SKIP
    >>> list(table.columns)[:4]  # doctest: +SKIP
    ['dtype', 'mode', 'ppl', 'ppl_stderr']
    """
    from .evaluation import evaluate_lastword, paired_comparison

    modes = list(modes)
    _check_model_modes(modes)
    master = _model_variant(model, parse_dtype(reference_dtype), "reference", chunk_size)
    ref = evaluate_lastword(master, tokenizer, path, limit=limit, n_bootstrap=n_bootstrap, progress=False,
                            label="reference")
    rows = [{"dtype": dtype_name(parse_dtype(reference_dtype)), "mode": "reference", "ppl": ref.ppl,
             "ppl_stderr": ref.ppl_stderr, "acc": ref.acc, "acc_stderr": ref.acc_stderr, "n": ref.n,
             "mean_ll_diff": 0.0, "z": math.nan, "status": "ok"}]
    for dtype in dtypes:
        torch_dtype = parse_dtype(dtype)
        for mode in modes:
            cand = _model_variant(master, torch_dtype, mode, chunk_size)
            head = {"dtype": dtype_name(torch_dtype), "mode": mode}
            try:
                res = evaluate_lastword(cand, tokenizer, path, limit=limit, n_bootstrap=n_bootstrap, progress=False,
                                        label=f"{dtype_name(torch_dtype)} {mode}")
            except ParityKitError as e:
                if "non-finite" not in str(e):
                    raise
                # an overflowing mode is a result of this comparison, not a reason to lose the others
                rows.append({**head, "ppl": math.nan, "ppl_stderr": math.nan, "acc": math.nan,
                             "acc_stderr": math.nan, "n": ref.n, "mean_ll_diff": math.nan, "z": math.nan,
                             "status": "non-finite logits"})
                continue
            finally:
                del cand
            paired = paired_comparison(ref, res, n_bootstrap=min(n_bootstrap, 2000))
            rows.append({**head, "ppl": res.ppl, "ppl_stderr": res.ppl_stderr, "acc": res.acc,
                         "acc_stderr": res.acc_stderr, "n": res.n, "mean_ll_diff": paired["mean_ll_diff"],
                         "z": paired["z"], "status": "ok"})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------- story 03
# The helpers below back notebooks/03_prefill_modes.ipynb: each one is the logic of one of its cells, so the
# cells stay short and the interactive panel runs the same code as the static path.

# Figures quoted from elsewhere (FLA issue #198, notes/anchors.md): inputs of the side-by-side table, not
# measured by this package. Columns: source, T, comparison, output max, output mean, state max, state mean.
REPORTED_FIGURES: tuple[tuple[str, int | None, str, float, float, float, float], ...] = (
    ("FLA #198 (real model)", None, "chunk vs recurrent", 1.0, 0.052, 0.043, 0.007),
    ("anchors.md H200", 1024, "fla_chunk vs fp64", 0.475, 0.0285, 0.0389, 0.00222),
    ("anchors.md H200", 1024, "fla_fused_recurrent vs fp64", 0.475, 0.0231, 0.0353, 0.00192),
    ("anchors.md H200", 4096, "fla_chunk vs fp64", 0.663, 0.0285, 0.0392, 0.00222),
    ("anchors.md H200", 4096, "fla_fused_recurrent vs fp64", 0.401, 0.0231, 0.0380, 0.00193),
)
_SIDE_COLUMNS = ["source", "T", "comparison", "output max", "output mean", "state max", "state mean"]
# a chunked prefill is recommended when its output error is within this factor of the recurrent one
_ACCEPTABLE_CHUNK_RATIO = 1.5


@dataclass(frozen=True)
class StoryPlan:
    """The work sizes of story 03, derived from the notebook's parameters (see :func:`story_plan`)."""

    dtypes: list[str]
    lengths: list[int]
    longest: int
    chunk_sizes: list[int]
    chunk_sweep_len: int
    decode_len: int
    model_tokens: int
    lastword_limit: int | None
    fla_reason: str | None
    modes: list[str]

    def describe(self, chunk_size: int, heads: int, head_dim: int) -> str:
        """Two lines: what runs, and whether FLA's kernels run live."""
        fla = "running live" if self.fla_reason is None else f"not run here ({self.fla_reason}); our implementation only"
        return (f"dtypes {self.dtypes}, lengths {self.lengths}, chunk size {chunk_size}, H={heads}, N={head_dim}\n"
                f"FLA kernels: {fla}")


def story_plan(dtype: DtypeLike, lengths: Sequence[int], *, smoke: bool, device: str) -> StoryPlan:
    """The dtypes (the chosen 16-bit format first, then the other), lengths and sweep sizes of story 03;
    ``smoke`` shrinks them for CI; FLA modes join only on ``device="cuda"`` with fla installed.

    >>> plan = story_plan("fp16", [256, 1024], smoke=True, device="cpu")
    >>> plan.dtypes, plan.lengths, plan.longest, plan.fla_reason
    (['fp16', 'bf16'], [128, 256], 256, "device is not 'cuda'")
    """
    if not lengths or min(int(t) for t in lengths) < 1:
        raise ParityKitError(f"lengths must be positive token counts; got {list(lengths)}")
    name = dtype_name(parse_dtype(dtype))
    dtypes = [name] + [d for d in ("bf16", "fp16") if d != name]
    if smoke:
        lengths = sorted({min(int(t), 256) for t in lengths} | {128})
        sizes: tuple[list[int], int, int, int, int | None] = ([16, 64], 256, 256, 128, 24)
    else:
        lengths = [int(t) for t in lengths]
        sizes = ([16, 32, 64, 128, 256], 1024, 1024, 512, None)
    fla_reason = fla_unavailable_reason() if device == "cuda" else "device is not 'cuda'"
    modes = list(OUR_MODES) + (list(FLA_MODES) if fla_reason is None else [])
    return StoryPlan(dtypes, list(lengths), max(lengths), *sizes, fla_reason=fla_reason, modes=modes)


def error_pivot(table: pd.DataFrame, index: Sequence[str] = ("dtype", "mode"),
                columns: Sequence[str] = ("reference", "tensor"),
                values: Sequence[str] = ("max_abs", "mean_abs")) -> pd.DataFrame:
    """A harness table pivoted for reading: rows ``index``, columns ``values`` × ``columns``, in table order.

    >>> import torch
    >>> from parity_kit.models.wkv import random_wkv_inputs
    >>> s = compare_prefill(random_wkv_inputs(1, 32, 1, 4, dtype=torch.float64), modes=["chunk_low"], chunk_size=16).summary
    >>> error_pivot(s).index.tolist()
    [('bf16', 'reference_rounded'), ('bf16', 'chunk_low')]
    """
    return table.pivot_table(index=list(index), columns=list(columns), values=list(values), sort=False)


def reference_scale(inputs: Sequence[torch.Tensor]) -> dict[str, float]:
    """The rms of the fp64 reference output and final state: the scale every absolute error is read against.

    >>> from parity_kit.models.wkv import random_wkv_inputs
    >>> sorted(reference_scale(random_wkv_inputs(1, 8, 1, 4)))
    ['output rms', 'state rms']
    """
    out, state = wkv_reference(*_check_inputs(inputs))
    return {"output rms": float(out.pow(2).mean().sqrt()), "state rms": float(state.pow(2).mean().sqrt())}


def state_growth(boundaries: pd.DataFrame, dtype: str, *, reference: str = "fp64_rounded",
                 metric: str = "max_abs") -> pd.DataFrame:
    """Per mode, the state error at the first chunk boundary after the start, the middle one and the last one.

    >>> import torch
    >>> from parity_kit.models.wkv import random_wkv_inputs
    >>> b = compare_prefill(random_wkv_inputs(1, 64, 1, 4, dtype=torch.float64), modes=["chunk_low"], chunk_size=16).boundaries
    >>> state_growth(b, "bf16").columns.tolist()
    ['first boundary', 'middle boundary', 'last boundary']
    """
    rows = boundaries[(boundaries["tensor"] == "state") & (boundaries["reference"] == reference)
                      & (boundaries["dtype"] == dtype)]
    if rows.empty:
        raise ParityKitError(f"no state rows for dtype={dtype!r}, reference={reference!r} in the boundaries table; "
                             "pass compare_prefill(...).boundaries of a run that includes that dtype")
    growth = {}
    for mode, group in rows.groupby("mode", sort=True):
        values = group.sort_values("position")[metric]
        growth[mode] = {"first boundary": values.iloc[1], "middle boundary": values.iloc[len(values) // 2],
                        "last boundary": values.iloc[-1]}
    return pd.DataFrame.from_dict(growth, orient="index").rename_axis("mode")


def length_table(long_summary: pd.DataFrame, inputs: Sequence[torch.Tensor], lengths: Iterable[int], *,
                 dtypes: Iterable[DtypeLike], modes: Iterable[str], chunk_size: int) -> pd.DataFrame:
    """The summary of every length: a :func:`sweep` over the lengths shorter than the long run (prefixes of
    ``inputs``), followed by the long run's own summary (which is not recomputed).

    >>> import torch
    >>> from parity_kit.models.wkv import random_wkv_inputs
    >>> x = random_wkv_inputs(1, 64, 1, 4, dtype=torch.float64)
    >>> long = compare_prefill(x, modes=["chunk_low"], chunk_size=16).summary
    >>> length_table(long, x, [32, 64], dtypes=["bf16"], modes=["chunk_low"], chunk_size=16)["T"].unique().tolist()
    [32, 64]
    """
    longest = int(long_summary["T"].max())
    shorter = [t for t in lengths if t < longest]
    head = (sweep(shorter, dtypes=dtypes, modes=modes, chunk_sizes=[chunk_size], inputs=inputs, progress=False)
            if shorter else long_summary.iloc[:0])
    return pd.concat([head, long_summary], ignore_index=True)


def chunk_size_table(inputs: Sequence[torch.Tensor], seq_len: int, chunk_sizes: Iterable[int], *,
                     dtypes: Iterable[DtypeLike], modes: Iterable[str]) -> pd.DataFrame:
    """A chunk-size sweep at one length over the chunked modes among ``modes`` and their recurrent partners
    (the only modes whose results depend on the chunk size or serve as their direct comparison).

    >>> import torch
    >>> from parity_kit.models.wkv import random_wkv_inputs
    >>> x = random_wkv_inputs(1, 64, 1, 4, dtype=torch.float64)
    >>> t = chunk_size_table(x, 64, [16, 32], dtypes=["bf16"], modes=OUR_MODES)
    >>> sorted(t["mode"].unique())
    ['chunk_fp32', 'chunk_low', 'recurrent_fp32_state', 'reference_rounded']
    """
    wanted = {"chunk_fp32", "chunk_low", "recurrent_fp32_state", "fla_chunk", "fla_fused_recurrent"}
    return sweep([seq_len], dtypes=dtypes, modes=[m for m in modes if m in wanted], chunk_sizes=chunk_sizes,
                 inputs=inputs, progress=False)


def decode_comparison(inputs: Sequence[torch.Tensor], seq_len: int, *, dtype: DtypeLike, chunk_size: int,
                      with_fla: bool = False) -> pd.DataFrame:
    """:func:`prefill_then_decode` of the first ``seq_len`` tokens, prefilling ¾ of them, for chunk_low and
    chunk_fp32 (decoded with an fp32 state) and, ``with_fla``, FLA's chunk kernel decoded by its fused one.

    >>> import torch
    >>> from parity_kit.models.wkv import random_wkv_inputs
    >>> t = decode_comparison(random_wkv_inputs(1, 32, 1, 4, dtype=torch.float64), 32, dtype="bf16", chunk_size=8)
    >>> sorted(t["prefill_mode"].unique())
    ['chunk_fp32', 'chunk_low']
    """
    prefix = tuple(t[:, :seq_len] for t in _check_inputs(inputs))
    pairs = [("chunk_low", "recurrent_fp32_state"), ("chunk_fp32", "recurrent_fp32_state")]
    if with_fla:
        pairs.append(("fla_chunk", "fla_fused_recurrent"))
    return pd.concat([prefill_then_decode(prefix, seq_len * 3 // 4, dtype=dtype, prefill_mode=p, decode_mode=d,
                                          chunk_size=chunk_size) for p, d in pairs], ignore_index=True)


@dataclass
class StoryModel:
    """The model story 03 runs on: the model, its tokenizer, where it came from, and why the named
    checkpoint could not be loaded (``None`` when it was)."""

    model: torch.nn.Module
    tokenizer: Any
    source: str
    load_error: str | None = None


def load_story_model(name: str, device: str = "cpu") -> StoryModel:
    """Load ``name`` in fp32; when it cannot be loaded (e.g. the checkpoint is not trained yet), fall back to a
    random-init RWKV-7 of the tiny model's shape (seed 0) with the project's tokenizer, and say so.

    >>> story = load_story_model("no-such-model")  # doctest: +SKIP
    >>> story.source  # doctest: +SKIP
    'random init (hidden 128, 4 layers, head_dim 64), seed 0'
    """
    from .. import models

    try:
        model, tokenizer = models.load(name, dtype="fp32", device=device)
        return StoryModel(model, tokenizer, name)
    except ParityKitError as e:
        from transformers import PreTrainedTokenizerFast

        from ..models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
        from .._util.paths import data_dir

        torch.manual_seed(0)
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(data_dir() / "tokenizer" / "tokenizer.json"),
                                            bos_token="<s>", eos_token="</s>")
        model = RWKV7ForCausalLM(RWKV7Config(hidden_size=128, num_hidden_layers=4, head_dim=64,
                                             vocab_size=len(tokenizer), decay_low_rank_dim=16, gate_low_rank_dim=32,
                                             a_low_rank_dim=16, v_low_rank_dim=8)).eval().to(device)
        return StoryModel(model, tokenizer, "random init (hidden 128, 4 layers, head_dim 64), seed 0", str(e))


def lastword_prompt_ids(tokenizer: Any, path: Any, tokens: int, *, documents: int = 40) -> torch.Tensor:
    """A ``[1, tokens]`` prompt: BOS (id 0, as RWKV-7 was trained) then the first ``documents`` last-word
    passages joined by spaces, cut to length.

    >>> ids = lastword_prompt_ids(tok, "data/eval/lastword.jsonl", 128)  # doctest: +SKIP
    >>> ids.shape  # doctest: +SKIP
    torch.Size([1, 128])
    """
    from .evaluation import load_lastword_items

    if tokens < 1:
        raise ParityKitError(f"tokens={tokens} must be at least 1 (the BOS token)")
    items = load_lastword_items(path, limit=documents)
    text_ids = tokenizer(" ".join(i.context + i.target for i in items), add_special_tokens=False)["input_ids"]
    return torch.tensor([[0] + text_ids[: tokens - 1]])


@dataclass
class StoredKernelFigures:
    """Figures of ``benchmarks/wkv_kernels.py`` stored from a GPU run: the ``ok`` rows of its summary
    (columns of :attr:`PrefillComparison.summary`), its command and environment. Empty when no file exists."""

    path: Any
    summary: pd.DataFrame
    command: str | None = None
    environment: Any = None

    @property
    def found(self) -> bool:
        """Whether stored figures exist."""
        return self.command is not None


def stored_kernel_figures(path: Any = None) -> StoredKernelFigures:
    """Read the stored H200 kernel figures (default ``benchmarks/results/wkv_kernels_h200.json``).

    >>> stored = stored_kernel_figures()
    >>> stored.found in (True, False)
    True
    """
    import json
    from pathlib import Path

    from .._util.paths import repo_root

    path = Path(path) if path is not None else repo_root() / "benchmarks" / "results" / "wkv_kernels_h200.json"
    if not path.exists():
        return StoredKernelFigures(path, pd.DataFrame())
    try:
        stored = json.loads(path.read_text())
        summary = pd.DataFrame(stored["errors"]["summary"])
    except (ValueError, KeyError, TypeError) as e:
        raise ParityKitError(f"{path} is not a wkv_kernels benchmark result ({e}); re-run benchmarks/wkv_kernels.py "
                             "on a GPU or delete the file") from e
    return StoredKernelFigures(path, summary[summary["status"] == "ok"], stored.get("command", ""),
                               stored.get("environment"))


def stored_kernel_table(summary: pd.DataFrame, dtype: str, lengths: Sequence[int] = (1024, 4096)) -> pd.DataFrame:
    """The stored figures of one dtype at ``lengths`` against fp64 and fp64_rounded, pivoted by (T, mode).

    >>> stored = stored_kernel_figures()
    >>> table = stored_kernel_table(stored.summary, "bf16") if stored.found else None
    """
    if summary.empty:
        return pd.DataFrame()
    view = summary[(summary["dtype"] == dtype) & summary["reference"].isin(["fp64", "fp64_rounded"])
                   & summary["T"].isin(list(lengths))]
    return error_pivot(view, index=("T", "mode"))


def _pick(table: pd.DataFrame, seq_len: int, dtype: str, mode: str, reference: str, tensor: str,
          metric: str = "max_abs") -> float:
    """One figure of a harness table; NaN when it is missing, ambiguous or not ``ok``."""
    if table.empty:
        return math.nan
    t = table[(table["T"] == seq_len) & (table["dtype"] == dtype) & (table["mode"] == mode)
              & (table["reference"] == reference) & (table["tensor"] == tensor)]
    if len(t) != 1 or t["status"].iloc[0] != "ok":
        return math.nan
    return float(t[metric].iloc[0])


def _side_row(table: pd.DataFrame, source: str, seq_len: int, mode: str, reference: str) -> tuple[Any, ...] | None:
    t = table[(table["T"] == seq_len) & (table["dtype"] == "bf16") & (table["mode"] == mode)
              & (table["reference"] == reference)]
    if len(t) < 2:
        return None
    by_tensor = t.set_index("tensor")
    o, s = by_tensor.loc["output"], by_tensor.loc["state"]
    return (source, seq_len, f"{mode} vs {reference}", o["max_abs"], o["mean_abs"], s["max_abs"], s["mean_abs"])


def reported_vs_measured(lengths: pd.DataFrame, stored: pd.DataFrame, dtypes: Sequence[str]) -> pd.DataFrame:
    """bf16 figures side by side: :data:`REPORTED_FIGURES` (quoted), this run's (``lengths``, a
    :func:`length_table`) and the stored GPU run's (``stored``), at T = 1024 and 4096 where measured.

    >>> reported_vs_measured(pd.DataFrame(columns=["T", "dtype", "mode", "reference"]), pd.DataFrame(), ["fp16"])["source"].tolist()[:1]
    ['FLA #198 (real model)']
    """
    rows: list[tuple[Any, ...] | None] = list(REPORTED_FIGURES)
    for seq_len in (1024, 4096):
        if "bf16" in dtypes:
            for mode, ref in (("chunk_low", "recurrent"), ("chunk_low", "fp64"), ("recurrent_fp32_state", "fp64")):
                rows.append(_side_row(lengths, "this run (CPU, ours)", seq_len, mode, ref))
        if len(stored):
            for mode, ref in (("fla_chunk", "recurrent"), ("fla_chunk", "fp64"), ("fla_fused_recurrent", "fp64"),
                              ("chunk_low", "fp64")):
                rows.append(_side_row(stored, "stored H200", seq_len, mode, ref))
    return pd.DataFrame([r for r in rows if r is not None], columns=_SIDE_COLUMNS)


def _dtype_figures(lengths: pd.DataFrame, seq_len: int, d: str) -> tuple[dict[str, float], str]:
    """The long-run figures of one dtype and the sentence that reports them."""
    def rel(mode: str, tensor: str) -> float:
        return _pick(lengths, seq_len, d, mode, "fp64", tensor, "rel_rms")

    floor_o = rel("reference_rounded", "output")
    rec_o, rec_s = rel("recurrent_fp32_state", "output"), rel("recurrent_fp32_state", "state")
    low_o, low_s = rel("chunk_low", "output"), rel("chunk_low", "state")
    c32_o = rel("chunk_fp32", "output")
    lrs_o, lrs_s = rel("recurrent_low_state", "output"), rel("recurrent_low_state", "state")
    k = f"{d}_T{seq_len}_"
    figures = {k + "floor_output_rel_rms": floor_o,
               k + "recurrent_fp32_state_output_rel_rms": rec_o,
               k + "recurrent_fp32_state_state_rel_rms": rec_s,
               k + "recurrent_low_state_output_rel_rms": lrs_o,
               k + "recurrent_low_state_state_rel_rms": lrs_s,
               k + "chunk_fp32_output_rel_rms": c32_o,
               k + "chunk_low_output_rel_rms": low_o,
               k + "chunk_low_state_rel_rms": low_s,
               k + "chunk_low_vs_recurrent_output_max_abs": _pick(lengths, seq_len, d, "chunk_low", "recurrent",
                                                                  "output"),
               k + "chunk_low_vs_recurrent_state_max_abs": _pick(lengths, seq_len, d, "chunk_low", "recurrent",
                                                                 "state")}
    if math.isnan(low_o):  # the mode did not produce finite values
        verdict_low = f"chunk with {d} intermediates did not produce finite values (overflow): do not use it in {d}"
    else:
        verdict_low = (f"chunk with {d} intermediates (FLA-like) gives {low_o:.2e} ({low_o / rec_o:.2f}x the recurrent "
                       f"error) and state {low_s:.2e} ({low_s / rec_s:.2f}x)")
    line = (f"{d}, T={seq_len}: output rel_rms vs fp64 is {rec_o:.2e} for recurrent with an fp32 state (the inputs' "
            f"rounding alone: {floor_o:.2e}); chunk with fp32 intermediates {c32_o:.2e} ({c32_o / rec_o:.2f}x); "
            f"{verdict_low}; a {d} state gives {lrs_o:.2e} ({lrs_o / rec_o:.2f}x) and state {lrs_s:.2e} "
            f"({lrs_s / rec_s:.2f}x).")
    return figures, line


def _decide(figures: dict[str, float], seq_len: int, d: str) -> str:
    """The prefill mode to use in ``d``: chunked when its output error stays within 1.5x the recurrent one."""
    k = f"{d}_T{seq_len}_"
    rec, c32, low = (figures[k + m + "_output_rel_rms"] for m in ("recurrent_fp32_state", "chunk_fp32", "chunk_low"))
    lrs_state = figures[k + "recurrent_low_state_state_rel_rms"] / figures[k + "recurrent_fp32_state_state_rel_rms"]
    if not math.isnan(low) and low <= _ACCEPTABLE_CHUNK_RATIO * rec:
        mode = f"chunk mode even with {d} intermediates (FLA-like; {low / rec:.2f}x the recurrent error)"
    elif c32 <= _ACCEPTABLE_CHUNK_RATIO * rec:
        mode = (f"chunk mode with fp32 intermediates ({c32 / rec:.2f}x the recurrent error), not {d} intermediates "
                + ("(they overflow)" if math.isnan(low) else f"({low / rec:.2f}x)"))
    else:
        mode = f"the recurrent form with an fp32 state (chunk is {c32 / rec:.2f}x worse even with fp32 intermediates)"
    return f"For {d} prefill use {mode}; keep the decode state in fp32 (a {d} state is {lrs_state:.1f}x worse on the state)."


def conclude_prefill(
    lengths: pd.DataFrame,
    lastword: pd.DataFrame,
    model_summary: pd.DataFrame,
    stored: pd.DataFrame,
    *,
    dtypes: Sequence[str],
    seq_len: int,
    output_rms: float,
) -> tuple[str, dict[str, float]]:
    """Story 03's conclusion and the figures it relies on, from the measured tables.

    ``lengths``: :func:`length_table` (the long run is ``seq_len`` tokens); ``lastword``:
    :func:`lastword_by_mode`; ``model_summary``: :attr:`ModelModeComparison.summary`; ``stored``: the
    stored GPU figures (:attr:`StoredKernelFigures.summary`, may be empty); ``output_rms``: the fp64
    reference output's rms (:func:`reference_scale`). Per dtype the recommendation is a chunked prefill
    (low or fp32 intermediates) when its output rel_rms is within 1.5x that of the recurrent form with an
    fp32 state, else the recurrent form.

    >>> text, figures = conclude_prefill(lengths, lastword, ms, stored.summary, dtypes=["bf16", "fp16"],
    ...                                  seq_len=4096, output_rms=9.3)  # doctest: +SKIP
    >>> "bf16_T4096_chunk_low_output_rel_rms" in figures  # doctest: +SKIP
    True
    """
    dtypes = list(dtypes)
    figures: dict[str, float] = {}
    lines = []
    for d in dtypes:
        dtype_figures, line = _dtype_figures(lengths, seq_len, d)
        figures.update(dtype_figures)
        lines.append(line)
    for d in dtypes:
        by_mode = lastword[lastword["dtype"] == d].set_index("mode")
        for m in by_mode.index:
            figures[f"lastword_{d}_{m}_ppl"] = float(by_mode.loc[m, "ppl"])
            figures[f"lastword_{d}_{m}_z"] = float(by_mode.loc[m, "z"])
    figures["lastword_reference_ppl"] = float(lastword.iloc[0]["ppl"])
    figures["lastword_n"] = int(lastword["n"].iloc[0])
    logits = model_summary[model_summary["tensor"] == "logits"].set_index(["dtype", "mode"])["rel_rms"]
    for (d, m), v in logits.items():
        figures[f"logits_{d}_{m}_rel_rms"] = float(v)
    if len(stored):
        for d in ("bf16", "fp16", "fp32"):
            for m in FLA_MODES:
                for x in ("output", "state"):
                    figures[f"stored_h200_{d}_T4096_{m}_{x}_max_abs"] = _pick(stored, 4096, d, m, "fp64", x, "max_abs")
                    figures[f"stored_h200_{d}_T4096_{m}_{x}_rel_rms"] = _pick(stored, 4096, d, m, "fp64", x, "rel_rms")

    def z_max(d: str) -> float:
        z = lastword[(lastword["dtype"] == d) & (lastword["mode"] != "reference")]["z"].abs()
        return float(z.max()) if len(z) and z.notna().any() else math.nan

    recommendation = " ".join(_decide(figures, seq_len, d) for d in dtypes)
    h200_line = ""
    if len(stored) and "bf16" in dtypes:
        fc = _pick(stored, 4096, "bf16", "fla_chunk", "fp64", "output", "rel_rms")
        fr = _pick(stored, 4096, "bf16", "fla_fused_recurrent", "fp64", "output", "rel_rms")
        f16c = _pick(stored, 4096, "fp16", "fla_chunk", "fp64", "output", "rel_rms")
        f32c = _pick(stored, 4096, "fp32", "fla_chunk", "fp64", "output", "rel_rms")
        h200_line = (f" On the H200 (stored), FLA's chunk_rwkv7 in bf16 at T=4096 has output rel_rms {fc:.2e} vs "
                     f"{fr:.2e} for fused_recurrent_rwkv7 ({fc / fr:.2f}x); in fp16 {f16c:.2e}; in fp32 {f32c:.2e}.")
    failed = lastword[lastword["status"] != "ok"]
    lw_line = (f" On tiny-rwkv7 ({figures['lastword_n']} documents, paired against the fp64 model) the largest last-word "
               f"|z| of any finite mode is {max(z_max(d) for d in dtypes):.2f}"
               + (f"; non-finite logits in: {', '.join(failed['dtype'] + ' ' + failed['mode'])}" if len(failed) else "")
               + ".")
    figures["lastword_modes_nonfinite"] = len(failed)
    reported_line = ""
    if "bf16" in dtypes:
        reported = REPORTED_FIGURES[0]
        ours_o = _pick(lengths, seq_len, "bf16", "chunk_low", "recurrent", "output", "max_abs")
        ours_s = _pick(lengths, seq_len, "bf16", "chunk_low", "recurrent", "state", "max_abs")
        figures.update({"reported_198_output_max": reported[3], "reported_198_state_max": reported[5],
                        f"bf16_T{seq_len}_direct_output_max_over_output_rms": ours_o / output_rms})
        reported_line = (f" Chunk vs recurrent directly in bf16 (T={seq_len}): output max {ours_o:.3g}, state max "
                         f"{ours_s:.3g} here, against {reported[3]} and {reported[5]} reported in FLA #198 (a real "
                         f"model, whose activations we do not have; our synthetic outputs have rms {output_rms:.3g}).")
        if len(stored):
            fo = _pick(stored, 4096, "bf16", "fla_chunk", "recurrent", "output", "max_abs")
            fs = _pick(stored, 4096, "bf16", "fla_chunk", "recurrent", "state", "max_abs")
            figures.update({"stored_h200_bf16_T4096_fla_chunk_vs_fused_output_max": fo,
                            "stored_h200_bf16_T4096_fla_chunk_vs_fused_state_max": fs})
            reported_line += f" FLA's own kernels on the H200 (stored, T=4096): {fo:.3g} and {fs:.3g}."
    conclusion = " ".join(lines) + reported_line + h200_line + lw_line + " " + recommendation
    return conclusion, figures


def explore(dtype: DtypeLike = "bf16", chunk_size: int = 64, seq_len: int = 512, heads: int = 16, head_dim: int = 64,
            device: str = "cpu", *, seed: int = 0, modes: Iterable[str] = OUR_MODES,
            progress: Callable[[float, str], None] | None = None) -> list[Any]:
    """One interactive look at a prefill on random WKV inputs: the error summary of every mode (pivoted),
    the output error per token against fp64, and the state error at every chunk boundary against
    fp64 on the rounded inputs. ``progress(fraction, message)`` is called as the steps finish (a
    :class:`parity_kit.present.panels.ControlPanel` passes its own).

    >>> table, fig_position, fig_boundaries = explore("fp16", chunk_size=16, seq_len=48, heads=1, head_dim=8)
    >>> type(fig_position).__name__, "chunk_low" in table.index.get_level_values("mode")
    ('Figure', True)
    """
    from ..present import plots
    from ..dtypes import check_dtype_on_device

    for knob, value in (("chunk_size", chunk_size), ("seq_len", seq_len), ("heads", heads), ("head_dim", head_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ParityKitError(f"{knob}={value!r} must be a positive integer; set it in the panel and run again")
    name = dtype_name(check_dtype_on_device(dtype, device))
    report = progress or (lambda fraction, message: None)
    report(0.05, "inputs")
    inputs = random_wkv_inputs(1, seq_len, heads, head_dim, dtype=torch.float64, seed=seed, device=device)
    report(0.1, "prefill modes")
    run = compare_prefill(inputs, dtypes=[name], modes=modes, chunk_size=chunk_size)
    report(0.8, "figures")
    shape = f"T={seq_len}, L={chunk_size}, H={heads}, N={head_dim}"
    fig_position = plots.prefill_error_vs_position(run.per_token, metric="max_abs", reference="fp64",
                                                   title=f"{name}: output max error per token vs fp64 ({shape})")
    fig_boundaries = plots.prefill_state_at_boundaries(
        run.boundaries, metric="max_abs", reference="fp64_rounded",
        title=f"{name}: state max error at chunk boundaries vs fp64 on the rounded inputs ({shape})")
    report(1.0, "done")
    return [error_pivot(run.summary), fig_position, fig_boundaries]
