"""Triage: the whole investigation of two runs in one call, ending in a ranked verdict of causes.

:func:`triage` walks the decision tree users otherwise walk by hand, in order, and stops branches that are
settled:

1. **inputs** — token provenance of both pipelines (BOS/EOS, special tokens, length);
2. **config** — configuration fields that change numerics (eps, rope theta/scaling, head layout, tied
   embeddings, activation) and the settings under test (dtype, attention implementation); the environment;
3. **weights** — every parameter under the detected module mapping (same architecture, InternLM2 → Llama);
4. **precision or bug** — both models rerun in fp64 on the same token ids: does the difference fall to the
   floor (below one fp32 rounding)? If it does, the run's difference is precision; if not, the two compute
   different functions;
5. **where** — :func:`parity_kit.compare_models` (in fp32 for a bug, in the run dtypes for precision):
   calibrated verdicts, first divergence by own error, culprits (the modules that make the error);
6. **fix for precision** — :func:`parity_kit.sweep_by_class` and :func:`parity_kit.bisect_precision` on the
   narrower run, when the run is above its floor because of precision;
7. **consequences** — :func:`parity_kit.lockstep_greedy` and :func:`parity_kit.teacher_forced`, and a paired
   last-word evaluation (:func:`parity_kit.paired_comparison`) when an eval set is given.

Steps 6–7 are the costly ones; ``quick=True`` skips them. The numerics steps always run on the *reference's*
token ids for both models, so a difference of inputs and a difference of numerics are told apart.

>>> from parity_kit.testing import tiny_llama
>>> result = triage(tiny_llama(layers=1), tiny_llama(layers=1), input_ids=[[1, 2, 3, 4]], quick=True,
...                 show_progress=False)
>>> result.causes[0].kind
'rounding only'
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .._util.calling import call_model, model_device, model_dtype, prepare_inputs, primary_tensor
from .._util.environment import environment_capsule
from .._util.trees import map_tensors
from .._util.twins import twin, twin_device
from ..comparison import first_divergence
from ..comparison.floor import narrower
from ..comparison.metrics import nominal_floor, rel_rms
from ..dtypes import dtype_name, parse_dtype
from ..errors import ParityKitError
from .calibration import compare_models, rounding_only, without_cache
from .decoding import greedy_decode
from .evaluation import evaluate_lastword, load_lastword_items
from .generation import compare_traces, lockstep_greedy, summarize_teacher_forced, teacher_forced
from .paired import paired_comparison
from .precision import bisect_precision, sweep_by_class
from .provenance import token_provenance
from .runs import RunSpec, load_run
from .triage_checks import config_diff, detect_mapping, numerics_config, weight_diff
from .triage_verdict import Cause, rank_causes, verdict_text

STEPS = ("inputs", "config", "weights", "precision or bug", "where", "fix for precision", "consequences")
COSTLY_STEPS = ("fix for precision", "consequences")
DEFAULT_PROMPT = "User: who are you?\nAssistant: I am a small model. I answer questions about the corpus.\n"


@dataclass
class TriageSide:
    """One side of a triage: its model, how its text becomes token ids (``pipeline``: ``(tokenizer, kwargs)`` or
    a callable ``text -> ids``, as in :func:`parity_kit.token_provenance`) and its label."""

    model: nn.Module
    tokenizer: Any = None
    pipeline: Any = None
    label: str = ""


@dataclass
class TriageResult:
    """What :func:`triage` found: per step its findings (``steps[name]`` with ``status`` "done" | "skipped" |
    "not applicable" and the step's numbers), the ranked causes (most likely first) and the tables behind them.
    :attr:`verdict` is the printed text; :meth:`findings` the JSON-ready record (:meth:`save` writes it)."""

    reference: str
    candidate: str
    steps: dict[str, dict[str, Any]]
    causes: list[Cause]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """The ranked causes in words, each with its evidence and what to try."""
        return verdict_text(self.causes, self.reference, self.candidate)

    def findings(self) -> dict[str, Any]:
        """Everything the verdict relies on, JSON-ready: labels, causes, steps, seconds per step, environment."""
        return _jsonable({"reference": self.reference, "candidate": self.candidate,
                          "causes": [c.to_dict() for c in self.causes], "steps": self.steps,
                          "seconds": self.seconds, "environment": environment_capsule()})

    def save(self, path: str | os.PathLike[str]) -> Any:
        """Write :meth:`findings` as JSON (atomically) and return the path."""
        import json
        from pathlib import Path

        from .._util.atomic import atomic_write

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target) as f:
            f.write(json.dumps(self.findings(), indent=2))
        return target


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) else (str(value) if math.isinf(value) else value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _jsonable(value.item())
    return str(value)


# ---------------------------------------------------------------------------------------------- sides
def _side(obj: Any, tokenizer: Any, pipeline: Any, label: str | None, default_label: str, *, dtype: str | None,
          device: str) -> TriageSide:
    if isinstance(obj, (str, os.PathLike)):
        obj = RunSpec(str(obj), dtype or "fp32", device)
    if isinstance(obj, RunSpec):
        model, tok = load_run(obj)
        return TriageSide(model, tokenizer or tok, pipeline, label or obj.label)
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], nn.Module):
        obj, tokenizer = obj[0], tokenizer or obj[1]
    if not isinstance(obj, nn.Module):
        raise ParityKitError(f"the {default_label} is a {type(obj).__name__}; pass a model folder or built-in name, "
                             "a RunSpec, an nn.Module or (model, tokenizer)")
    return TriageSide(obj.eval(), tokenizer, pipeline, label or f"{default_label} ({type(obj).__name__}, "
                      f"{dtype_name(model_dtype(obj))})")


def _is_lm(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "vocab_size", None) is not None


def _bos_id(side: TriageSide) -> int | None:
    bos = getattr(side.tokenizer, "bos_token_id", None)
    return bos if bos is not None else getattr(getattr(side.model, "config", None), "bos_token_id", None)


# ---------------------------------------------------------------------------------------------- step 1
def _step_inputs(ref: TriageSide, cand: TriageSide, prompt: str | None, input_ids: Any,
                 inputs: Any) -> tuple[dict[str, Any], dict[str, list[int]] | None, Any]:
    """Findings, each side's token ids (None for a model that takes no ids) and the reference's model inputs."""
    if inputs is not None:
        return {"status": "not applicable", "source": "inputs given (the same for both models)"}, None, inputs
    if input_ids is not None:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ParityKitError(f"input_ids has shape {tuple(ids.shape)}; pass one sequence, shape [1, T]")
        seq = [int(t) for t in ids[0]]
        return {"status": "done", "source": "input_ids given (the same for both models)", "ids_differ": False,
                "n_tokens": len(seq), "reference_ids": seq}, {"reference": seq, "candidate": seq}, ids
    pipelines = {name: side.pipeline if side.pipeline is not None else (side.tokenizer, {})
                 for name, side in (("reference", ref), ("candidate", cand))}
    if any(p == (None, {}) for p in pipelines.values()):
        raise ParityKitError("a model has no tokenizer to encode the prompt; pass input_ids=[[...]] (or inputs= for a "
                             "model that takes no token ids), or give the tokenizer")
    text = prompt or DEFAULT_PROMPT
    prov = token_provenance(text, pipelines, tokenizer=ref.tokenizer or cand.tokenizer)
    ids = prov.ids
    bos = _bos_id(ref)
    found: dict[str, Any] = {
        "status": "done", "source": "prompt encoded by each side's pipeline", "prompt": text,
        "ids_differ": prov.first_difference is not None, "first_difference": prov.first_difference,
        "summary": prov.summary, "n_tokens_reference": len(ids["reference"]),
        "n_tokens_candidate": len(ids["candidate"]), "bos_token_id": bos,
        "reference_starts_with_bos": bos is not None and ids["reference"][:1] == [bos],
        "candidate_starts_with_bos": bos is not None and ids["candidate"][:1] == [bos],
        "reference_ids": ids["reference"], "candidate_ids": ids["candidate"],
    }
    eos = getattr(ref.tokenizer, "eos_token_id", None)
    if eos is not None:
        found["reference_eos_count"] = ids["reference"].count(eos)
        found["candidate_eos_count"] = ids["candidate"].count(eos)
    return found, ids, torch.tensor([ids["reference"]])


# ---------------------------------------------------------------------------------------------- steps 2-3
def _step_config(ref: TriageSide, cand: TriageSide) -> tuple[dict[str, Any], pd.DataFrame]:
    diff = config_diff(ref.model, cand.model)
    return {"status": "done", "reference": numerics_config(ref.model), "candidate": numerics_config(cand.model),
            "differences": diff.to_dict("records"),
            "environment": "both runs in this process: one environment capsule (in the findings)"}, diff


def _step_weights(ref: TriageSide, cand: TriageSide, mapping: Any, mapping_name: str) -> tuple[dict[str, Any],
                                                                                             pd.DataFrame]:
    table = weight_diff(ref.model, cand.model, mapping)
    counts = table["status"].value_counts().to_dict()
    bad = table[table["status"] != "same"]
    worst = bad.sort_values("rel_rms", ascending=False, na_position="last")
    return {"status": "done", "mapping": mapping_name, "n_tensors": len(table), "n_by_status": counts,
            "differing": worst.head(20).to_dict("records")}, table


# ---------------------------------------------------------------------------------------------- step 4
def _high_dtype(model: nn.Module) -> torch.dtype:
    device = next(model.parameters()).device
    return torch.float32 if device.type == "mps" else torch.float64


def _output(model: nn.Module, inputs: Any) -> torch.Tensor:
    if not callable(inputs) or isinstance(inputs, torch.Tensor):  # a twin may sit on the host (_copy_in)
        device = model_device(model)
        inputs = map_tensors(inputs, lambda _name, t: t.to(device))
    with torch.no_grad():
        out = call_model(model, prepare_inputs(model, without_cache(model, inputs)))
        return primary_tensor(out, type(model).__name__).detach().to("cpu", torch.float64)


def _narrow_dtype(ref: TriageSide, cand: TriageSide) -> torch.dtype:
    ref_dt, cand_dt = model_dtype(ref.model), model_dtype(cand.model)
    return cand_dt if narrower(cand_dt, ref_dt) else ref_dt


def _copy_in(model: nn.Module, dtype: torch.dtype, weights_in: torch.dtype, copies: int = 1) -> nn.Module:
    """A copy computing in ``dtype`` whose parameters were first rounded to ``weights_in`` (the narrower run's
    dtype), so that both sides of a high-precision comparison carry the same weight rounding and only what the
    two compute can differ (a correct bf16 conversion then agrees with its fp32 original). Buffers (rotary
    tables) are not rounded: each implementation keeps them in its own precision. Built on the model's device
    when ``copies`` such copies fit there, on the host otherwise (:func:`parity_kit._util.twins.twin`): an fp64
    copy of a 7B model does not fit one 80 GB GPU beside the two runs."""
    return twin(model, dtype, weights_in=weights_in, device=twin_device(model, dtype, copies))


def _fp32_output_floor(model: nn.Module, inputs: Any, tolerance: float) -> float:
    """``tolerance`` × the free floor of a correct fp32 run's output against fp64: a :func:`parity_kit.rounding_only`
    run of ``model`` in fp32 (the calibrated floor's run) against the model in fp64. It says how far two runs that
    compute the same function may still differ in "fp64" when parts of them compute in fp32 on purpose (rotary
    tables) — and it is never below one fp32 rounding."""
    baseline = _output(twin(model, torch.float64), inputs)
    gc.collect()  # free the fp64 twin before the rounding-only copy is made
    with rounding_only(model, torch.float32) as sim:
        rounded = _output(sim.eval(), inputs)
    return tolerance * max(float(rel_rms(baseline, rounded)), nominal_floor("fp32"))


def _step_precision(ref: TriageSide, cand: TriageSide, inputs: Any, tolerance: float) -> tuple[dict[str, Any],
                                                                                                dict[str, Any]]:
    """Both models' outputs in their run dtypes and in fp64 (fp32 where fp64 is not available)."""
    high = _high_dtype(cand.model)
    outs = {"ref_run": _output(ref.model, inputs), "cand_run": _output(cand.model, inputs)}
    narrow = _narrow_dtype(ref, cand)
    for key, side in (("ref_high", ref), ("cand_high", cand)):
        hi = _copy_in(side.model, high, narrow)
        outs[key] = _output(hi, inputs)
        del hi
        gc.collect()  # free the twin now: a module tree with reference cycles waits for the collector
    if outs["ref_run"].shape != outs["cand_run"].shape:
        raise ParityKitError(f"the models' outputs have different shapes {tuple(outs['ref_run'].shape)} vs "
                             f"{tuple(outs['cand_run'].shape)}; triage needs outputs of one shape")
    err_run = float(rel_rms(outs["ref_run"], outs["cand_run"]))
    err_high = float(rel_rms(outs["ref_high"], outs["cand_high"]))
    floor = math.nan
    if high == torch.float64:
        # the rounding-only run copies this twin again, so it goes where two copies fit
        fp32_twin = _copy_in(ref.model, torch.float32, narrow, copies=2)
        floor = _fp32_output_floor(fp32_twin, inputs, tolerance)
        del fp32_twin
        gc.collect()
    falls = err_high <= floor if high == torch.float64 else None
    return {"status": "done", "high_dtype": dtype_name(high), "weights_rounded_to": dtype_name(narrow),
            "run_dtypes": [dtype_name(model_dtype(ref.model)), dtype_name(model_dtype(cand.model))],
            "output_rel_rms_run": err_run, "output_rel_rms_high": err_high, "high_floor": floor,
            "run_floor": tolerance * nominal_floor(narrow),
            "falls_to_floor": falls, "branch": "precision" if falls or falls is None else "bug",
            "high_over_floor": err_high / floor if floor and not math.isnan(floor) else math.nan}, outs


# ---------------------------------------------------------------------------------------------- step 5
def _culprit_rows(judged: Any, modules: dict[str, nn.Module]) -> list[dict[str, Any]]:
    rows = []
    for row in judged.culprits().itertuples():
        rows.append({"module": row.module, "cand_module": row.cand_module, "own_floor_ratio": float(row.own_floor_ratio),
                     "own_cause": row.own_cause, "class": type(modules[row.module]).__name__
                     if row.module in modules else None})
    return rows


def _step_where(ref: TriageSide, cand: TriageSide, inputs: Any, mapping: Any, branch: str, tolerance: float,
                modules: Any) -> tuple[dict[str, Any], pd.DataFrame]:
    """compare_models in fp32 for a bug (so rounding hides nothing), in the run dtypes for precision."""
    if branch == "bug":
        narrow = _narrow_dtype(ref, cand)
        pair = [s.model if model_dtype(s.model) == torch.float32 == narrow else _copy_in(s.model, torch.float32, narrow)
                for s in (ref, cand)]
    else:
        pair = [ref.model, cand.model]
    judged = compare_models(pair[0], pair[1], inputs, modules=modules, mapping=mapping, tolerance=tolerance,
                            show_progress=False)
    verdict = judged.verdict
    first = first_divergence(judged.table, diagnosis="own error above floor")
    return {"status": "done", "dtypes": [dtype_name(model_dtype(m)) for m in pair], "verdict": verdict["verdict"],
            "n_modules": verdict["n_modules"], "n_modules_consistent": verdict["n_modules_consistent"],
            "culprits": _culprit_rows(judged, dict(pair[0].named_modules())),  # culprits carry reference names
            "precision_sensitive": verdict["precision_sensitive"],
            "first_own_divergence": None if first is None else {"module": first["module"],
                                                                "own_floor_ratio": float(first["own_floor_ratio"])},
            "n_rows_by_diagnosis": verdict["n_rows_by_diagnosis"]}, judged.table


# ---------------------------------------------------------------------------------------------- step 6
def _step_fix(ref: TriageSide, cand: TriageSide, inputs: Any, outs: dict[str, Any],
              tolerance: float) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """Sweep and bisection on the narrower run against its own high-precision output."""
    ref_dt, cand_dt = model_dtype(ref.model), model_dtype(cand.model)
    low_side, key = (cand, "cand_high") if narrower(cand_dt, ref_dt) or cand_dt == ref_dt else (ref, "ref_high")
    low = low_side.model
    if model_dtype(low) in (torch.float32, torch.float64):
        return {"status": "not applicable", "reason": f"the narrower run is {dtype_name(model_dtype(low))}: no lower "
                "precision to lift modules out of"}, None
    model_inputs = without_cache(low, inputs)
    reference = outs[key]
    sweep = sweep_by_class(low, reference, model_inputs, floor_tolerance=tolerance, progress=False)
    classes = sweep[sweep["kind"] == "class"]
    found: dict[str, Any] = {"status": "done", "side": "candidate" if low_side is cand else "reference",
                             "low_dtype": dtype_name(model_dtype(low)),
                             "error_all_low": float(sweep["error"].iloc[0]),
                             "classes": classes[["class", "n_modules", "error", "error_removed_fraction",
                                                 "verdict"]].head(5).to_dict("records")}
    try:
        bisection = bisect_precision(low, reference, model_inputs, target=0.5, floor_tolerance=tolerance,
                                     progress=False)
        found["bisection"] = {"chosen": bisection.chosen, "error_low": bisection.error_low,
                              "error_chosen": bisection.error_chosen, "target_error": bisection.target_error,
                              "passes": bisection.passes, "summary": bisection.summary()}
    except ParityKitError as e:  # the target is out of reach at module granularity: say so, keep the sweep
        found["bisection"] = {"chosen": [], "error": str(e)}
    return found, sweep


# ---------------------------------------------------------------------------------------------- step 7
def _lockstep(ref: TriageSide, cand: TriageSide, ids: dict[str, list[int]], max_new_tokens: int) -> Any:
    if ids["reference"] == ids["candidate"]:
        return lockstep_greedy(ref.model, cand.model, ids["reference"], max_new_tokens=max_new_tokens,
                               ref_tokenizer=ref.tokenizer, cand_tokenizer=cand.tokenizer or ref.tokenizer,
                               progress=False)
    # each run decodes from its own pipeline's ids: the consequence of the input difference
    traces = [greedy_decode(s.model, ids[name], max_new_tokens, 5, set(), False)
              for s, name in ((ref, "reference"), (cand, "candidate"))]
    return compare_traces(traces[0], traces[1], ref_tokenizer=ref.tokenizer, cand_tokenizer=cand.tokenizer or
                          ref.tokenizer, compare_by_text=False, comparable_logits=False,
                          labels=("reference", "candidate"), max_new_tokens=max_new_tokens)


def _step_consequences(ref: TriageSide, cand: TriageSide, ids: dict[str, list[int]] | None, inputs_found: dict,
                       eval_items: Any, eval_limit: int | None, max_new_tokens: int,
                       outs: dict[str, Any]) -> dict[str, Any]:
    if ids is None or not (_is_lm(ref.model) and _is_lm(cand.model)):
        return {"status": "not applicable", "reason": "the models take no token ids"}
    lock = _lockstep(ref, cand, ids, max_new_tokens)
    found: dict[str, Any] = {"status": "done", "lockstep": lock.summary(), "max_new_tokens": max_new_tokens,
                             "lockstep_inputs": "each side's own ids" if inputs_found.get("ids_differ")
                             else "the same ids"}
    # the precision step ran both models on the reference's ids already: their logits are the teacher-forced ones
    found["teacher_forced"] = summarize_teacher_forced(teacher_forced(
        ref.model, cand.model, ids["reference"], logits=(outs["ref_run"], outs["cand_run"])))
    if eval_items is not None:
        if ref.tokenizer is None or cand.tokenizer is None:
            raise ParityKitError("the paired last-word evaluation needs both tokenizers; pass them or drop eval")
        items = load_lastword_items(eval_items, limit=eval_limit)
        # batch_recurrent: a recurrent model's documents go 8 to a forward too (right-padded; causal, so exact up
        # to the rounding of batched kernels, the same for both sides) instead of one forward per document
        runs = [evaluate_lastword(s.model, s.tokenizer, items, prepend_bos=bool(inputs_found.get(f"{name}_starts_with_bos",
                                  True)), n_bootstrap=1000, progress=False, label=name, batch_recurrent=True)
                for s, name in ((ref, "reference"), (cand, "candidate"))]
        paired = paired_comparison(runs[0], runs[1], n_bootstrap=2000)
        found["eval"] = {"n": runs[0].n, "reference": runs[0].summary, "candidate": runs[1].summary,
                         "flagged": paired.flagged, "stats": paired.stats, "verdict": paired.verdict}
    return found


# ---------------------------------------------------------------------------------------------- the walk
# Long on purpose: the decision tree in one place, step by step, so which branch stops where reads top to bottom.
def triage(
    ref: Any,
    cand: Any,
    *,
    prompt: str | None = None,
    input_ids: Any = None,
    inputs: Any = None,
    ref_tokenizer: Any = None,
    cand_tokenizer: Any = None,
    ref_pipeline: Any = None,
    cand_pipeline: Any = None,
    eval_items: Any = None,
    eval_limit: int | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    mapping: Any = "auto",
    modules: Any = "*",
    quick: bool = False,
    max_new_tokens: int = 24,
    tolerance: float = 2.0,
    labels: tuple[str | None, str | None] = (None, None),
    progress: Callable[[float, str], None] | None = None,
    show_progress: bool = True,
) -> TriageResult:
    """Run the whole investigation on two runs and rank the causes of their difference (see the module docstring).

    ``ref`` / ``cand``: a model folder or built-in name (loaded in ``dtype`` on ``device``), a
    :class:`parity_kit.analyses.runs.RunSpec`, an ``nn.Module`` or ``(model, tokenizer)``. Input: ``inputs`` (any
    model inputs, the same for both; no token provenance), else ``input_ids`` ([1, T], the same for both), else
    ``prompt`` (default: a chat-style line) encoded by each side's pipeline (``*_pipeline``: ``(tokenizer,
    kwargs)`` or a callable text → ids; default the side's tokenizer as it is). ``eval_items``: a last-word JSONL
    file or list of items for the paired evaluation (``eval_limit`` documents). ``mapping``: "auto" (detected),
    None (same names) or a module mapping. ``quick`` skips the fix and consequences steps. A tqdm bar shows
    the steps (``show_progress``); ``progress(fraction, step)`` is called instead when given.

    >>> from parity_kit.testing import tiny_llama
    >>> cand = tiny_llama(layers=1)
    >>> cand.config.rms_norm_eps = 1e-3
    >>> for layer in cand.model.layers:
    ...     layer.input_layernorm.variance_epsilon = 1e-3
    >>> result = triage(tiny_llama(layers=1), cand, input_ids=[[1, 2, 3, 4]], quick=True, show_progress=False)
    >>> result.causes[0].kind, result.causes[0].names
    ('config', ['norm_eps'])
    """
    ref_side = _side(ref, ref_tokenizer, ref_pipeline, labels[0], "reference", dtype=dtype, device=device)
    cand_side = _side(cand, cand_tokenizer, cand_pipeline, labels[1], "candidate", dtype=dtype, device=device)
    bar = tqdm(total=len(STEPS), desc="triage", disable=not show_progress or progress is not None)
    steps: dict[str, dict[str, Any]] = {}
    tables: dict[str, pd.DataFrame] = {}
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def begin(i: int) -> None:
        nonlocal started
        if i:
            seconds[STEPS[i - 1]] = time.perf_counter() - started
        started = time.perf_counter()
        if progress is not None:
            progress(i / len(STEPS), STEPS[i] if i < len(STEPS) else "done")
        bar.n = i
        bar.set_postfix_str(STEPS[i] if i < len(STEPS) else "done")
        bar.refresh()

    try:
        begin(0)
        steps["inputs"], ids, model_inputs = _step_inputs(ref_side, cand_side, prompt, input_ids, inputs)
        begin(1)
        steps["config"], tables["config"] = _step_config(ref_side, cand_side)
        begin(2)
        if isinstance(mapping, str) and mapping == "auto":
            mapping, mapping_name = detect_mapping(ref_side.model, cand_side.model)
        else:
            mapping_name = "given" if mapping is not None else "identity"
        steps["weights"], tables["weights"] = _step_weights(ref_side, cand_side, mapping, mapping_name)
        begin(3)
        steps["precision or bug"], outs = _step_precision(ref_side, cand_side, model_inputs, tolerance)
        branch = steps["precision or bug"]["branch"]
        begin(4)
        steps["where"], tables["where"] = _step_where(ref_side, cand_side, model_inputs, mapping, branch, tolerance,
                                                      modules)
        begin(5)
        settled = branch == "bug" or steps["where"]["verdict"] == "healthy"
        if quick:
            steps["fix for precision"] = {"status": "skipped", "reason": "--quick"}
        elif settled:
            steps["fix for precision"] = {"status": "skipped", "reason": "settled: " + (
                "the difference stays in high precision (not precision)" if branch == "bug"
                else "the run is within its calibrated floor (nothing to fix)")}
        else:
            steps["fix for precision"], sweep = _step_fix(ref_side, cand_side, model_inputs, outs, tolerance)
            if sweep is not None:
                tables["sweep"] = sweep
        begin(6)
        if quick:
            steps["consequences"] = {"status": "skipped", "reason": "--quick"}
        else:
            steps["consequences"] = _step_consequences(ref_side, cand_side, ids, steps["inputs"], eval_items,
                                                       eval_limit, max_new_tokens, outs)
        begin(7)
    finally:
        bar.close()
    causes = rank_causes(steps)
    return TriageResult(ref_side.label, cand_side.label, steps, causes, tables, seconds)
