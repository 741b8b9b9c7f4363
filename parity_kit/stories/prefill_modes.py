"""Story 03 (``parity_kit/notebooks/03_prefill_modes.ipynb``): the same WKV recurrence in chunked-parallel and in token-by-token
recurrent form gives different outputs and states in low precision; by how much, where, and how does it grow?

The plan: the error of each mode against fp64 (on raw and on rounded inputs) by position, sequence length, chunk
size and dtype; states at chunk boundaries; prefill-then-decode against a full prefill; the model-level
comparison and its last-word score; FLA's real kernels beside ours (stored H200 figures on a CPU). The
conclusion recommends a prefill mode from those figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from .. import models
from .._util.paths import data_dir, package_folder
from ..analyses.calibration import ModelComparison
from ..analyses.evaluation import load_lastword_items
from ..analyses.prefill import (FLA_MODES, OUR_MODES, check_inputs, compare_prefill, fla_unavailable_reason,
                                prefill_then_decode, sweep)
from ..comparison.floor import describe_verdict
from ..dtypes import DtypeLike, check_dtype_on_device, dtype_name, parse_dtype
from ..errors import ParityKitError
from ..models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
from ..models.wkv import random_wkv_inputs, wkv_reference
from ..present import plots
from .wording import ulp_note


# Figures quoted from elsewhere (FLA issue #198, https://github.com/fla-org/flash-linear-attention/issues/198, and
# an earlier H200 measurement of the kernels): inputs of the side-by-side table, not
# measured by this package. Columns: source, T, comparison, output max, output mean, state max, state mean.
REPORTED_FIGURES: tuple[tuple[str, int | None, str, float, float, float, float], ...] = (
    ("FLA #198 (real model)", None, "chunk vs recurrent", 1.0, 0.052, 0.043, 0.007),
    ("H200 anchors", 1024, "fla_chunk vs fp64", 0.475, 0.0285, 0.0389, 0.00222),
    ("H200 anchors", 1024, "fla_fused_recurrent vs fp64", 0.475, 0.0231, 0.0353, 0.00192),
    ("H200 anchors", 4096, "fla_chunk vs fp64", 0.663, 0.0285, 0.0392, 0.00222),
    ("H200 anchors", 4096, "fla_fused_recurrent vs fp64", 0.401, 0.0231, 0.0380, 0.00193),
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
    out, state = wkv_reference(*check_inputs(inputs))
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
    prefix = tuple(t[:, :seq_len] for t in check_inputs(inputs))
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

    try:
        model, tokenizer = models.load(name, dtype="fp32", device=device)
        return StoryModel(model, tokenizer, name)
    except ParityKitError as e:
        from transformers import PreTrainedTokenizerFast


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

    >>> ids = lastword_prompt_ids(tok, "parity_kit/data/eval/lastword.jsonl", 128)  # doctest: +SKIP
    >>> ids.shape  # doctest: +SKIP
    torch.Size([1, 128])
    """

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
    """Read the stored H200 kernel figures (default ``parity_kit/data/stored/wkv_kernels_h200.json``, shipped with the
    package; ``benchmarks/wkv_kernels.py`` writes it).

    >>> stored_kernel_figures().found
    True
    """
    import json
    from pathlib import Path


    path = Path(path) if path is not None else package_folder("data") / "stored" / "wkv_kernels_h200.json"
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


@dataclass(frozen=True)
class PrefillChoice:
    """The prefill mode story 03 recommends in one dtype, and the ratios it is chosen from.

    ``mode``: "chunk_low" (chunked with ``dtype`` intermediates, FLA-like) when its long-run output rel_rms vs
    fp64 stays within 1.5x that of the recurrent form with an fp32 state, else "chunk_fp32" when chunked with
    fp32 intermediates does, else "recurrent_fp32_state". ``chunk_low_ratio`` / ``chunk_fp32_ratio``: those
    output errors over the recurrent one (NaN: the mode produced no finite values); ``low_state_ratio``: a
    ``dtype`` decode state's state error over an fp32 state's.
    """

    dtype: str
    mode: str
    chunk_low_ratio: float
    chunk_fp32_ratio: float
    low_state_ratio: float


def _choose(figures: Mapping[str, float], seq_len: int, d: str) -> PrefillChoice:
    k = f"{d}_T{seq_len}_"
    rec, c32, low = (figures[k + m + "_output_rel_rms"] for m in ("recurrent_fp32_state", "chunk_fp32", "chunk_low"))
    if not math.isnan(low) and low <= _ACCEPTABLE_CHUNK_RATIO * rec:
        mode = "chunk_low"
    elif c32 <= _ACCEPTABLE_CHUNK_RATIO * rec:
        mode = "chunk_fp32"
    else:
        mode = "recurrent_fp32_state"
    return PrefillChoice(dtype=d, mode=mode, chunk_low_ratio=low / rec, chunk_fp32_ratio=c32 / rec,
                         low_state_ratio=figures[k + "recurrent_low_state_state_rel_rms"]
                         / figures[k + "recurrent_fp32_state_state_rel_rms"])


def choose_prefill_modes(lengths: pd.DataFrame, *, dtypes: Sequence[str], seq_len: int) -> dict[str, PrefillChoice]:
    """Per dtype, the :class:`PrefillChoice` :func:`conclude_prefill` states, from the same :func:`length_table`.

    >>> rows = [{"T": 8, "dtype": "bf16", "mode": m, "reference": "fp64", "tensor": t, "rel_rms": v, "status": "ok"}
    ...         for m, v in (("recurrent_fp32_state", 1.0), ("chunk_fp32", 1.1), ("chunk_low", 3.0),
    ...                      ("recurrent_low_state", 4.0), ("reference_rounded", 0.5)) for t in ("output", "state")]
    >>> choose_prefill_modes(pd.DataFrame(rows), dtypes=["bf16"], seq_len=8)["bf16"].mode
    'chunk_fp32'
    """
    return {d: _choose(_dtype_figures(lengths, seq_len, d)[0], seq_len, d) for d in dtypes}


def _decide(figures: dict[str, float], seq_len: int, d: str) -> str:
    """The recommendation sentence of :func:`_choose`'s choice in ``d``."""
    c = _choose(figures, seq_len, d)
    if c.mode == "chunk_low":
        mode = f"chunk mode even with {d} intermediates (FLA-like; {c.chunk_low_ratio:.2f}x the recurrent error)"
    elif c.mode == "chunk_fp32":
        mode = (f"chunk mode with fp32 intermediates ({c.chunk_fp32_ratio:.2f}x the recurrent error), not {d} "
                "intermediates " + ("(they overflow)" if math.isnan(c.chunk_low_ratio) else f"({c.chunk_low_ratio:.2f}x)"))
    else:
        mode = (f"the recurrent form with an fp32 state (chunk is {c.chunk_fp32_ratio:.2f}x worse even with fp32 "
                "intermediates)")
    return (f"For {d} prefill use {mode}; keep the decode state in fp32 (a {d} state is {c.low_state_ratio:.1f}x "
            "worse on the state).")


def conclude_prefill(
    lengths: pd.DataFrame,
    lastword: pd.DataFrame,
    model_summary: pd.DataFrame,
    stored: pd.DataFrame,
    *,
    dtypes: Sequence[str],
    seq_len: int,
    output_rms: float,
    verdicts: Mapping[str, ModelComparison] | None = None,
) -> tuple[str, dict[str, float]]:
    """Story 03's conclusion and the figures it relies on, from the measured tables.

    ``lengths``: :func:`length_table` (the long run is ``seq_len`` tokens); ``lastword``:
    :func:`lastword_by_mode`; ``model_summary``: :attr:`ModelModeComparison.summary`; ``stored``: the
    stored GPU figures (:attr:`StoredKernelFigures.summary`, may be empty); ``output_rms``: the fp64
    reference output's rms (:func:`reference_scale`). Per dtype the recommendation is a chunked prefill
    (low or fp32 intermediates) when its output rel_rms is within 1.5x that of the recurrent form with an
    fp32 state, else the recurrent form. ``verdicts``: :func:`parity_kit.analyses.prefill_model.mode_verdicts`
    of the story dtype (every module of each mode judged by the calibrated floor).

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
                     f"{fr:.2e} for fused_recurrent_rwkv7 ({fc / fr:.2f}x); in fp16 {f16c:.2e}; in fp32 {f32c:.2e}"
                     + (" (fp32 less accurate than fp16: the stored figures do not measure why; Triton's tl.dot, "
                        "which FLA's chunk kernels use, multiplies fp32 inputs in TF32 unless told otherwise, which "
                        "would explain it)" if f32c > f16c else "") + ".")
    failed = lastword[lastword["status"] != "ok"]
    lw_line = (f" On tiny-rwkv7 ({figures['lastword_n']} documents, paired against the fp64 model) the largest last-word "
               f"|z| of any finite mode is {max(z_max(d) for d in dtypes):.2f} (|z| > 3 would mark a real difference)"
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
                         f"model, whose activations we do not have; our synthetic outputs have rms {output_rms:.3g})"
                         + ulp_note((ours_o, float(reported[3])), "bf16") + ".")
        if len(stored):
            fo = _pick(stored, 4096, "bf16", "fla_chunk", "recurrent", "output", "max_abs")
            fs = _pick(stored, 4096, "bf16", "fla_chunk", "recurrent", "state", "max_abs")
            figures.update({"stored_h200_bf16_T4096_fla_chunk_vs_fused_output_max": fo,
                            "stored_h200_bf16_T4096_fla_chunk_vs_fused_state_max": fs})
            reported_line += f" FLA's own kernels on the H200 (stored, T=4096): {fo:.3g} and {fs:.3g}."
    verdict_line = _verdict_line(verdicts or {}, figures)
    conclusion = " ".join(lines) + reported_line + h200_line + verdict_line + lw_line + " " + recommendation
    return conclusion, figures


def _verdict_line(verdicts: Mapping[str, ModelComparison], figures: dict[str, Any]) -> str:
    """The calibrated verdict of each mode's modules, its numbers added to ``figures``."""
    for mode, result in verdicts.items():
        figures.update(result.figures(f"verdict_{mode}_"))
    if not verdicts:
        return ""
    return (" Module by module against the calibrated floor (what a rounding-only run in the dtype shows at each "
            "module, against the fp64 model): " + " ".join(describe_verdict(r.verdict, f"WKV mode {mode}")
                                                           for mode, r in verdicts.items()))


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
