"""Two configured runs of a model, captured, compared and localised in one call — the flow behind the
quickstart and the bug-report template (``parity_kit/notebooks/00_quickstart.ipynb``, ``parity_kit/notebooks/05_bug_report.ipynb``).

A run is a :class:`RunSpec` (model, dtype, device, attention implementation). :func:`compare_runs`
loads both runs (cached in :data:`parity_kit.models.cache.MODELS`), feeds them the same prompt (or token ids),
records every selected module with :func:`parity_kit.record`, compares with
:func:`parity_kit.compare` (noise-floor verdicts) and localises with :func:`parity_kit.first_divergence`
and :func:`parity_kit.first_nonfinite`. The returned :class:`RunComparison` holds the table, plots,
the computed conclusion and the figures for the findings file, and saves both recordings.

>>> from parity_kit.analyses.runs import RunSpec, compare_runs
>>> result = compare_runs(RunSpec(FROM_CONFIG_LLAMA, "fp32"), RunSpec(FROM_CONFIG_LLAMA, "bf16"),
...                       input_ids=[[1, 2, 3, 4]], modules="model.layers.*", layers=2, show_progress=False)
>>> result.summary.n_modules > 0
True
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from tqdm.auto import tqdm

from ..capture import record
from ..comparison import compare, first_divergence, first_nonfinite, per_token_error
from ..comparison.floor import (ABOVE, COMPUTES_DIFFERENTLY, OWN, PRECISION_SENSITIVE, Floor, culprits, describe_verdict,
                                run_verdict)
from ..comparison.mapping import internlm2_to_llama
from ..dtypes import check_dtype_on_device, dtype_name, parse_dtype
from ..errors import ParityKitError
from ..models.cache import MODELS
from ..models.from_config import FROM_CONFIG_LLAMA, build_tiny_llama
from .calibration import compare_models
from .provenance import token_provenance

RECORDINGS_SUFFIX = ".recordings"
"""``<reports_dir>/<notebook>.recordings/{reference,candidate}``: where :meth:`RunComparison.save_recordings` writes."""

Progress = Callable[[float, str], None]
TABLE_COLUMNS = ["order", "module", "cand_module", "tensor", "shape", "ref_dtype", "cand_dtype", "rel_rms", "floor",
                 "verdict", "own_rel_rms", "own_floor", "diagnosis", "own_cause", "max_ulp", "status", "nonfinite"]


@dataclass(frozen=True)
class RunSpec:
    """One configured run: which model, in which dtype, on which device, with which attention.

    >>> RunSpec("tiny-internlm2", "bf16", attn_implementation="sdpa").label
    'tiny-internlm2 bf16 cpu sdpa'
    """

    model: str
    dtype: str = "fp32"
    device: str = "cpu"
    attn_implementation: str | None = None
    trust_remote_code: bool = False

    @property
    def label(self) -> str:
        parts = [Path(self.model).name if os.sep in self.model else self.model,
                 dtype_name(parse_dtype(self.dtype)), self.device]
        return " ".join([*parts, *([self.attn_implementation] if self.attn_implementation else [])])


def _build_from_config(name: str, *, dtype: str, device: str, attn_implementation: str | None,
                       seed: int, layers: int) -> tuple[torch.nn.Module, None]:
    model = build_tiny_llama(seed, layers)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model.to(device=device, dtype=check_dtype_on_device(dtype, device)), None


def load_run(spec: RunSpec, *, seed: int = 0, layers: int = 4) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` of a run, cached in :data:`parity_kit.models.cache.MODELS` by its settings.

    :data:`FROM_CONFIG_LLAMA` builds the seeded tiny Llama (``seed``, ``layers``; no tokenizer: ``None``);
    any other name goes to :func:`parity_kit.models.load` (built-in name or local folder).

    >>> model, tokenizer = load_run(RunSpec(FROM_CONFIG_LLAMA, "bf16"), layers=2)
    >>> next(model.parameters()).dtype, tokenizer
    (torch.bfloat16, None)
    """
    check_dtype_on_device(spec.dtype, spec.device)
    if spec.model == FROM_CONFIG_LLAMA:
        return MODELS.load(spec.model, spec.dtype, spec.device, spec.attn_implementation,
                           loader=_build_from_config, seed=seed, layers=layers)
    return MODELS.load(spec.model, spec.dtype, spec.device, spec.attn_implementation,
                       trust_remote_code=spec.trust_remote_code)


def random_input_ids(vocab_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``[1, seq_len]`` token ids drawn uniformly from ``seed`` (for numerical parity the text does not matter).

    >>> random_input_ids(100, 5).shape
    torch.Size([1, 5])
    """
    if seq_len < 1:
        raise ParityKitError(f"seq_len={seq_len}: the input needs at least one token")
    return torch.randint(0, vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seed))


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The ids a run's own tokenizer makes of ``prompt`` (with its special tokens, e.g. BOS).

    >>> encode_prompt(lambda text: {"input_ids": [0, 5, 6]}, "hi")
    [0, 5, 6]
    """
    if not prompt:
        raise ParityKitError("prompt is empty; give the text that shows the problem")
    ids = [int(t) for t in tokenizer(prompt)["input_ids"]]
    if not ids:
        size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        if size is not None and size <= len(getattr(tokenizer, "all_special_ids", [])) + 1:
            raise ParityKitError(f"the tokenizer has no vocabulary ({size} entries), so prompt {prompt!r} became no "
                                 "tokens; the checkpoint is missing its tokenizer files: copy them from the "
                                 "checkpoint it came from")
        raise ParityKitError(f"the tokenizer turned prompt {prompt!r} into no tokens; use a longer prompt")
    return ids


def capture(model: torch.nn.Module, input_ids: torch.Tensor, modules: Any = "*") -> Any:
    """Record every selected module's outputs (full tensors, on the CPU) during one forward pass.

    >>> rec = capture(build_tiny_llama(layers=2), torch.tensor([[1, 2, 3]]), ["model.layers.0", "model.layers.1"])
    >>> rec.names
    ['model.layers.0', 'model.layers.1']
    """
    device = next(model.parameters()).device
    with torch.no_grad(), record(model, modules=modules, mode="tensors") as rec:
        model(input_ids.to(device))
    return rec


def auto_mapping(ref_model: torch.nn.Module, cand_model: torch.nn.Module) -> tuple[Any, str]:
    """The module mapping between two architectures we know, and its name (``"identity"`` when none is needed).

    An InternLM2 reference against a Llama candidate gets :func:`parity_kit.comparison.mapping.internlm2_to_llama`.

    >>> auto_mapping(build_tiny_llama(layers=1), build_tiny_llama(layers=1))[1]
    'identity'
    """
    ref_type = getattr(getattr(ref_model, "config", None), "model_type", None)
    cand_type = getattr(getattr(cand_model, "config", None), "model_type", None)
    if ref_type == "internlm2" and cand_type == "llama":
        return internlm2_to_llama(ref_model.config), "internlm2_to_llama"
    return None, "identity"


@dataclass
class Summary:
    """Headline numbers of a comparison table (see :func:`summarise`); ``judgement`` is
    :func:`parity_kit.comparison.floor.run_verdict` of the table (verdict "not judged" for a plain compare table)."""

    threshold: float
    n_rows: int                      # comparable ("ok") rows
    n_not_comparable: int            # rows missing on one side or with a shape mismatch
    n_modules: int
    n_within: int                    # modules whose every row is within its floor (the table's verdict column)
    first: pd.Series | None          # first row over the threshold, execution order
    worst: pd.Series | None          # row with the largest rel_rms
    last: pd.Series | None           # first row of the last recorded module
    first_nonfinite: pd.Series | None
    rel_rms_by_row: list[float] = field(default_factory=list)
    judgement: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """The run's verdict: "healthy", "computes differently", "precision-sensitive", ... (see ``judgement``)."""
        return str(self.judgement.get("verdict", "not judged"))

    def _verdict_sentence(self, cand_label: str) -> str:
        if self.verdict not in ("healthy", COMPUTES_DIFFERENTLY, PRECISION_SENSITIVE, OWN, ABOVE):
            return ""  # not judged / not comparable; NaN/Inf has a sentence of its own
        return describe_verdict(self.judgement, cand_label) + " "

    def describe(self, cand_label: str) -> str:
        """The computed conclusion, one sentence per finding.

        >>> t = pd.DataFrame({"order": [0], "module": ["a"], "tensor": "output", "rel_rms": [0.5],
        ...                   "verdict": ["above floor ×9"], "status": "ok", "nonfinite": [0]})
        >>> summarise(t, 0.01).describe("bf16")
        'bf16 first exceeds rel_rms 0.01 at a (rel_rms 0.5, above floor ×9); 0 of 1 modules stay within the floor; the largest error is rel_rms 0.5 at a; the last module (a) ends at rel_rms 0.5.'
        """
        if self.n_rows == 0:
            return (f"no module of the two runs could be compared ({self.n_not_comparable} rows missing or with "
                    "different shapes); check the module pattern, the mapping and the token ids of both runs.")
        if self.first is None:
            where = f"{cand_label} never exceeds rel_rms {self.threshold:g} in any of the {self.n_modules} compared modules"
        else:
            where = (f"{cand_label} first exceeds rel_rms {self.threshold:g} at {self.first['module']} "
                     f"(rel_rms {self.first['rel_rms']:.3g}, {self.first['verdict']})")
        text = self._verdict_sentence(cand_label) + (
            f"{where}; {self.n_within} of {self.n_modules} modules stay within the floor; "
            f"the largest error is rel_rms {self.worst['rel_rms']:.3g} at {self.worst['module']}; "
            f"the last module ({self.last['module']}) ends at rel_rms {self.last['rel_rms']:.3g}.")
        if self.first_nonfinite is not None:
            text += (f" The candidate first produces NaN/Inf at {self.first_nonfinite['module']} "
                     f"({int(self.first_nonfinite['nonfinite'])} values).")
        if self.n_not_comparable:
            text += f" {self.n_not_comparable} rows could not be compared (missing on one side or different shapes)."
        return text

    def judgements(self) -> dict[str, Any]:
        """The categorical judgements :meth:`describe` makes: the verdict, the culprits (innermost modules with own
        error above their floor, worst first), their causes and the precision-sensitive modules. (Findings files
        hold numbers only, so :meth:`figures` carries their counts and ratios; the names are in the conclusion.)"""
        j = self.judgement
        return {"verdict": self.verdict, "culprits": list(j.get("culprits", [])),
                "culprit_causes": list(j.get("culprit_causes", [])),
                "precision_sensitive": list(j.get("precision_sensitive", []))}

    def figures(self) -> dict[str, Any]:
        """Every number :meth:`describe` relies on, for :func:`parity_kit.write_findings`."""
        def num(row: pd.Series | None, column: str) -> float | int | None:
            if row is None:
                return None
            return int(row[column]) if column in ("order", "nonfinite") else float(row[column])

        j = self.judgement
        return {
            "threshold": self.threshold,
            "n_rows": self.n_rows,
            "n_rows_not_comparable": self.n_not_comparable,
            "n_modules": self.n_modules,
            "n_modules_within_floor": self.n_within,
            "n_modules_consistent": j.get("n_modules_consistent"),
            "n_culprits": len(j.get("culprits", [])),
            "culprit_own_floor_ratios": j.get("culprit_own_floor_ratios", []),
            "n_precision_sensitive": len(j.get("precision_sensitive", [])),
            "n_rows_by_diagnosis": j.get("n_rows_by_diagnosis", {}),
            "first_divergence_order": num(self.first, "order"),
            "first_divergence_rel_rms": num(self.first, "rel_rms"),
            "max_rel_rms": num(self.worst, "rel_rms"),
            "last_module_rel_rms": num(self.last, "rel_rms"),
            "first_nonfinite_order": num(self.first_nonfinite, "order"),
            "first_nonfinite_count": num(self.first_nonfinite, "nonfinite"),
            "rel_rms_by_row": self.rel_rms_by_row,
        }


def summarise(table: pd.DataFrame, threshold: float = 1e-2) -> Summary:
    """Headline numbers of a :func:`parity_kit.compare` table (calibrated or not): first divergence, modules
    within the floor, largest error, last module, first non-finite value, and the run's verdict.

    >>> t = pd.DataFrame({"order": [0, 1], "module": ["a", "b"], "tensor": "output", "rel_rms": [1e-4, 0.2],
    ...                   "verdict": ["within floor", "above floor ×50"], "status": "ok", "nonfinite": [0, 0]})
    >>> s = summarise(t, 0.01)
    >>> s.first["module"], s.n_within, s.n_modules, s.verdict
    ('b', 1, 2, 'not judged')
    """
    comparable = table[table["status"] == "ok"]
    within = comparable.groupby("module", sort=False)["verdict"].agg(lambda v: bool((v == "within floor").all()))
    has_rows = len(comparable) > 0
    last_module = comparable["module"].iloc[-1] if has_rows else None
    return Summary(
        threshold=float(threshold),
        n_rows=len(comparable),
        n_not_comparable=len(table) - len(comparable),
        n_modules=len(within),
        n_within=int(within.sum()),
        first=first_divergence(table, metric="rel_rms", threshold=threshold) if has_rows else None,
        worst=comparable.loc[comparable["rel_rms"].astype(float).idxmax()] if has_rows else None,
        last=comparable[comparable["module"] == last_module].iloc[0] if has_rows else None,
        first_nonfinite=first_nonfinite(table),
        rel_rms_by_row=comparable["rel_rms"].astype(float).tolist(),
        judgement=run_verdict(table),
    )


@dataclass
class RunComparison:
    """Everything :func:`compare_runs` found; ``summary.describe`` is the computed conclusion."""

    ref: RunSpec
    cand: RunSpec
    ref_rec: Any
    cand_rec: Any
    table: pd.DataFrame
    per_token: pd.DataFrame | None
    summary: Summary
    mapping: str
    input_ids: dict[str, list[int]]
    provenance: Any = None                 # evaluation.TokenProvenance when the two runs' token ids differ
    ref_nonfinite: dict[str, Any] | None = None   # first NaN/Inf of the reference recording itself
    floor: Floor | None = None             # the calibrated floor (None when the token ids differ: not judged)

    def culprits(self, top: int | None = None) -> pd.DataFrame:
        """The innermost modules whose own error is above their floor, worst first
        (:func:`parity_kit.comparison.floor.culprits`)."""
        return culprits(self.table, top)

    @property
    def conclusion(self) -> str:
        text = ""
        if self.provenance is not None and self.provenance.first_difference is not None:
            text += (f"The two runs do not see the same token ids ({self.provenance.summary}); every difference "
                     "below may come from the inputs, not the numerics. ")
        if self.ref_nonfinite is not None:
            text += (f"The reference itself produces NaN/Inf at {self.ref_nonfinite['module']} "
                     f"({self.ref_nonfinite['tensor']}). ")
        return text + self.summary.describe(self.cand.label)

    def figures(self) -> dict[str, Any]:
        """The numbers behind :attr:`conclusion`, for the findings file."""
        first_token_difference = None if self.provenance is None else self.provenance.first_difference
        return {
            **self.summary.figures(),
            "n_tokens_reference": len(self.input_ids["reference"]),
            "n_tokens_candidate": len(self.input_ids["candidate"]),
            "first_token_difference": first_token_difference,
            "reference_first_nonfinite_order": None if self.ref_nonfinite is None else int(self.ref_nonfinite["order"]),
        }

    def view(self, rows: int = 24) -> pd.DataFrame:
        """The comparison table's most useful columns, first ``rows`` rows."""
        hidden = {"cand_module"} if self.mapping == "identity" else set()
        return self.table[[c for c in TABLE_COLUMNS if c in self.table.columns and c not in hidden]].head(rows)

    def save_recordings(self, reports_dir: str | os.PathLike[str], notebook: str) -> tuple[Path, Path]:
        """Save both recordings to ``<reports_dir>/<notebook>.recordings/{reference,candidate}`` (the folder
        ``parity-kit report`` archives)."""
        folder = Path(reports_dir) / f"{notebook}{RECORDINGS_SUFFIX}"
        return self.ref_rec.save(folder / "reference"), self.cand_rec.save(folder / "candidate")


def _token_ids(spec: RunSpec, model: torch.nn.Module, tokenizer: Any, prompt: str | None,
               input_ids: Any, seed: int, seq_len: int) -> list[int]:
    if input_ids is not None:
        ids = torch.as_tensor(input_ids)
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ParityKitError(f"input_ids has shape {tuple(ids.shape)}; pass one sequence, shape [1, T]")
        return ids[0].tolist()
    if prompt is not None and tokenizer is not None:
        return encode_prompt(tokenizer, prompt)
    if prompt is not None and spec.model != FROM_CONFIG_LLAMA:
        raise ParityKitError(f"{spec.model!r} has no tokenizer to encode the prompt; pass input_ids instead")
    return random_input_ids(model.config.vocab_size, seq_len, seed)[0].tolist()


def compare_runs(
    ref: RunSpec,
    cand: RunSpec,
    *,
    prompt: str | None = None,
    input_ids: Any = None,
    modules: Any = "*",
    threshold: float = 1e-2,
    seq_len: int = 64,
    seed: int = 0,
    layers: int = 4,
    progress: Progress | None = None,
    show_progress: bool = True,
) -> RunComparison:
    """Load both runs, feed them the same input, record, compare, judge by the calibrated floor and localise.

    Input: ``input_ids`` (``[1, T]``) if given, else ``prompt`` encoded by each run's own tokenizer
    (their ids are diffed with :func:`parity_kit.token_provenance` when they differ), else ``seq_len``
    random ids from ``seed`` (a model without tokenizer, e.g. :data:`FROM_CONFIG_LLAMA`). When both runs see the
    same ids, :func:`parity_kit.compare_models` records, compares and judges every row against the calibrated
    floor (own error, "consistent with rounding" / "inherited" / "own error above floor", the run's verdict);
    when they do not, the recordings are compared with the one-rounding floor only (verdict "not judged").
    ``progress(fraction, message)`` is called between steps (a panel's progress bar); without it a tqdm bar
    shows the steps (``show_progress=False`` turns it off). An InternLM2 reference and a Llama candidate are
    aligned with the InternLM2 → Llama module mapping.

    >>> r = compare_runs(RunSpec(FROM_CONFIG_LLAMA), RunSpec(FROM_CONFIG_LLAMA, "fp16"), seq_len=4, layers=1,
    ...                  modules=["model.layers.0"], show_progress=False)
    >>> r.summary.n_modules, r.mapping, r.summary.verdict
    (1, 'identity', 'healthy')
    """
    steps = ["load reference", "load candidate", "compare", "done"]
    bar = None
    if progress is None and show_progress:
        bar = tqdm(total=len(steps) - 1, desc="compare_runs")

    def step(i: float, message: str) -> None:
        if progress is not None:
            progress(i / (len(steps) - 1), message)
        if bar is not None:
            bar.set_postfix_str(message)
            bar.n = int(i)
            bar.refresh()

    try:
        step(0, steps[0])
        ref_model, ref_tok = load_run(ref, seed=seed, layers=layers)
        step(1, steps[1])
        cand_model, cand_tok = load_run(cand, seed=seed, layers=layers)
        ids = {"reference": _token_ids(ref, ref_model, ref_tok, prompt, input_ids, seed, seq_len),
               "candidate": _token_ids(cand, cand_model, cand_tok, prompt, input_ids, seed, seq_len)}
        provenance = None
        if ids["reference"] != ids["candidate"]:
            if prompt is not None and input_ids is None and ref_tok is not None and cand_tok is not None:
                pipelines: dict[str, Any] = {"reference": (ref_tok, {}), "candidate": (cand_tok, {})}
            else:
                pipelines = {name: (lambda _text, seq=seq: seq) for name, seq in ids.items()}
            provenance = token_provenance(prompt or "", pipelines, tokenizer=ref_tok)
        step(2, steps[2])
        mapping, mapping_name = auto_mapping(ref_model, cand_model)
        floor = None
        if provenance is None:
            judged = compare_models(ref_model, cand_model, torch.tensor([ids["reference"]]), modules=modules,
                                    mapping=mapping, show_progress=False,
                                    progress=lambda f, message: step(2 + f, f"compare: {message}"))
            ref_rec, cand_rec, table, floor = judged.ref_rec, judged.cand_rec, judged.table, judged.floor
        else:  # different inputs: no module can be replayed on the other run's inputs
            ref_rec = capture(ref_model, torch.tensor([ids["reference"]]), modules)
            cand_rec = capture(cand_model, torch.tensor([ids["candidate"]]), modules)
            table = compare(ref_rec, cand_rec, mapping)
        per_token = None
        if ids["reference"] == ids["candidate"] and (table["status"] == "ok").any():
            per_token = per_token_error(ref_rec, cand_rec, mapping)
        summary = summarise(table, threshold)
        step(3, steps[3])
    finally:
        if bar is not None:
            bar.close()
    return RunComparison(ref, cand, ref_rec, cand_rec, table, per_token, summary, mapping_name, ids, provenance,
                         first_nonfinite(ref_rec), floor)
