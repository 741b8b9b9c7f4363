"""Story 05 (``parity_kit/notebooks/05_bug_report.ipynb``): the template a user copies, points at the two runs that disagree,
runs and attaches to an issue. The comparison itself is :func:`parity_kit.analyses.runs.compare_runs`; this
module adds what the notebook shows: the figures of a comparison and the interactive panel."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..analyses.execution_floor import execution_floor
from ..analyses.runs import RunComparison, RunSpec, compare_runs, load_run
from ..comparison.execution import EXECUTION_NOISE, ExecutionFloor, apply_execution_floor
from ..errors import ParityKitError
from ..models import BUILTINS
from ..present import plots
from ..present.panels import ControlPanel, attention_choice, device_choice, dtype_choice, model_choice

# pk.bugreport: the comparison of two runs and the template's own figures and panel
__all__ = ["ExecutionNoise", "RunComparison", "RunSpec", "bug_report_panel", "bug_report_run", "compare_runs",
           "comparison_plots", "execution_noise", "panel_items"]


def comparison_plots(result: RunComparison) -> list[Any]:
    """Free-run and own error per module against the calibrated floor (the one-rounding floor when the runs saw
    different tokens and nothing was judged) and, when per-token errors exist, the module × token heatmap."""
    shown = []
    title = f"{result.ref.label} vs {result.cand.label}: error per module"
    if result.summary.n_rows and result.table["diagnosis"].notna().any():
        shown.append(plots.verdicts_by_module(result.table, title=title))
    elif result.summary.n_rows:
        shown.append(plots.error_by_module(result.table, title=title))
    if result.per_token is not None and not result.per_token.empty:
        shown.append(plots.token_heatmap(result.per_token, title="rel_rms per module and token position"))
    return shown


@dataclass(frozen=True)
class ExecutionNoise:
    """The candidate run's execution floor and the comparison judged against it (:func:`execution_noise`)."""

    floor: ExecutionFloor
    table: pd.DataFrame          # the comparison's rows with the execution-floor columns and cumulative verdicts
    counts: pd.Series            # rows per verdict class ("above every floor ×N" counted as one class)

    @property
    def n_explained(self) -> int:
        """Rows that rounding or the runs' execution alone explains."""
        return int(sum(n for verdict, n in self.counts.items() if verdict in EXECUTION_NOISE))

    @property
    def summary(self) -> str:
        n = int(self.counts.sum())
        alone = sum(c.startswith("alone") for c in self.floor.contexts)
        batched = sum(c.startswith("slot") for c in self.floor.contexts)
        toggled = len(self.floor.contexts) - alone - batched
        runs = f"{alone} times alone, {batched} times in batches" + (f", {toggled} with kernel settings toggled"
                                                                      if toggled else "")
        return (f"The candidate was run again on the same token ids ({runs}): {self.n_explained} of {n} compared "
                "rows lie within what rounding and these executions alone produce; "
                f"{n - self.n_explained} are above every floor.")

    def figures(self) -> dict[str, float]:
        """Numbers for the findings file: rows per verdict class and the largest floor of each source."""
        out: dict[str, float] = {"execution_rows": float(self.counts.sum()), "execution_explained_rows":
                                 float(self.n_explained)}
        for source, values in self.floor.floors.items():
            out[f"execution_floor_max_{source}"] = float(max(values.values(), default=0.0))
        return out


def execution_noise(result: RunComparison, *, modules: Any = "*", repeats: int = 3,
                    batch_sizes: Sequence[int] = (2, 4), seed: int = 0, layers: int = 4,
                    progress: bool = True) -> ExecutionNoise:
    """Measure the candidate run's execution floor (:func:`parity_kit.execution_floor` on the token ids it saw:
    ``repeats`` runs alone, batches of ``batch_sizes`` padded left and right, and on CUDA the TF32 and
    deterministic-algorithm toggles) and judge ``result``'s comparison against it, rounding first: a row "within
    run-to-run noise" or "within batch variance" is a difference the candidate shows against *itself*.
    ``modules``, ``seed`` and ``layers``: as given to :func:`compare_runs`.

    >>> from parity_kit.analyses.runs import FROM_CONFIG_LLAMA
    >>> r = compare_runs(RunSpec(FROM_CONFIG_LLAMA, "fp32"), RunSpec(FROM_CONFIG_LLAMA, "bf16"), layers=1,
    ...                  show_progress=False)
    >>> noise = execution_noise(r, repeats=2, batch_sizes=(2,), layers=1, progress=False)
    >>> bool(noise.n_explained <= noise.counts.sum() == (r.table["status"] == "ok").sum())
    True
    """
    if not isinstance(result, RunComparison):
        raise ParityKitError(f"execution_noise takes the RunComparison of compare_runs, got {type(result).__name__}")
    if result.table.empty or "floor" not in result.table.columns:
        raise ParityKitError("the comparison has no compared rows to judge; run compare_runs on runs that share "
                             "module names (or a mapping) first")
    model, _ = load_run(result.cand, seed=seed, layers=layers)
    floor = execution_floor(model, [result.input_ids["candidate"]], repeats=repeats, batch_sizes=batch_sizes,
                            modules=modules, keyed_by="candidate", progress=progress)
    judged = apply_execution_floor(result.table, floor)
    ok = judged[judged["status"] == "ok"]
    counts = pd.Series(Counter(str(v).split(" ×")[0] for v in ok["verdict"]), name="rows").sort_values(
        ascending=False)
    return ExecutionNoise(floor, judged, counts)


def panel_items(result: RunComparison, rows: int = 24) -> list[Any]:
    """What a panel shows: the conclusion, the culprits (when a module's own error is above its floor), the table,
    the plots."""
    found = result.culprits()
    return [result.conclusion, *([found] if not found.empty else []), result.view(rows), *comparison_plots(result)]


def bug_report_run(params: dict[str, Any]) -> list[Any]:
    """The bug-report panel's run function: two independently configured runs on one prompt."""
    result = compare_runs(
        RunSpec(params["ref_model"], params["ref_dtype"], params["ref_device"], params["ref_attn_implementation"] or None,
                bool(params.get("trust_remote_code", False))),
        RunSpec(params["cand_model"], params["cand_dtype"], params["cand_device"],
                params["cand_attn_implementation"] or None, bool(params.get("trust_remote_code", False))),
        prompt=params["prompt"], modules=params.get("modules") or "*", threshold=float(params["threshold"]),
        progress=params.get("progress"),
    )
    items: list[Any] = [result.conclusion]
    if result.provenance is not None:
        items.append(result.provenance)
    return [*items, *panel_items(result)[1:]]


def bug_report_panel(*, ref_model: str, ref_dtype: str, ref_device: str, ref_attn_implementation: str | None,
                     cand_model: str, cand_dtype: str, cand_device: str, cand_attn_implementation: str | None,
                     prompt: str, modules: str = "*", threshold: float = 1e-2,
                     trust_remote_code: bool = False) -> Any:
    """The bug-report panel: two model / dtype / device / attention pickers, the prompt and the knobs."""
    def run_fields(prefix: str, model: str, dtype: str, device: str, attn: str | None) -> dict[str, Any]:
        pick = model_choice(model, choices=list(BUILTINS))
        label = "reference" if prefix == "ref" else "candidate"
        return {f"{prefix}_model": type(pick)(f"{label} model", pick.build, pick.read),
                f"{prefix}_dtype": dtype_choice(dtype, label=f"{label} dtype"),
                f"{prefix}_device": device_choice(device),
                f"{prefix}_attn_implementation": attention_choice(attn or "eager")}

    fields = {**run_fields("ref", ref_model, ref_dtype, ref_device, ref_attn_implementation),
              **run_fields("cand", cand_model, cand_dtype, cand_device, cand_attn_implementation),
              "prompt": prompt, "modules": modules, "threshold": float(threshold),
              "trust_remote_code": bool(trust_remote_code)}
    return ControlPanel(bug_report_run, fields=fields, title="Bug report: configure the two runs, press Run")
