"""Story 05 (``parity_kit/notebooks/05_bug_report.ipynb``): the template a user copies, points at the two runs that disagree,
runs and attaches to an issue. The comparison itself is :func:`parity_kit.analyses.runs.compare_runs`; this
module adds what the notebook shows: the figures of a comparison and the interactive panel."""

from __future__ import annotations

from typing import Any

from ..analyses.runs import RunComparison, RunSpec, compare_runs
from ..models import BUILTINS
from ..present import plots
from ..present.panels import ControlPanel, attention_choice, device_choice, dtype_choice, model_choice

# pk.bugreport: the comparison of two runs and the template's own figures and panel
__all__ = ["RunComparison", "RunSpec", "bug_report_panel", "bug_report_run", "compare_runs", "comparison_plots",
           "panel_items"]


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
