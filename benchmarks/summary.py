"""Print the headline figures of the committed benchmark results as a Markdown table.

The README's "Performance" table is this script's output (a test keeps the two identical), so every
figure there comes from a results file, and each results file holds the command that produced it.

    python benchmarks/summary.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _row(what: str, measured: float, target: float | None, unit: str, source: str, higher_is_better: bool = False) -> str:
    if target is None:
        verdict = "reference point"
    else:
        met = measured >= target if higher_is_better else measured <= target
        verdict = f"{'met' if met else 'missed'} (target {'≥' if higher_is_better else '≤'} {target:g}{unit})"
    return f"| {what} | {measured:.2f}{unit} | {verdict} | `{source}` |"


def rows() -> list[str]:
    out = ["| what | measured | against the target | results file |", "| --- | --- | --- | --- |"]
    cpu = _load("capture_overhead_cpu.json")
    ratio, targets = cpu["ratio_to_plain"], cpu["targets"]
    out.append(_row("CPU, Llama 8×1024, 512 tokens: stats capture / plain forward", ratio["stats"], targets["stats"],
                    "×", "capture_overhead_cpu.json"))
    out.append(_row("CPU: tensors saved to disk (`record(save_to=...)`) / plain forward", ratio["tensors_disk"],
                    targets["tensors_disk"], "×", "capture_overhead_cpu.json"))
    out.append(_row("CPU: tensors kept in memory, then `Recording.save` / plain forward",
                    ratio["tensors_memory_then_save"], None, "×", "capture_overhead_cpu.json"))
    out.append(_row("CPU: transformers' model_addition_debugger_context (tensors) / plain forward",
                    ratio["transformers_debugger_tensors"], None, "×", "capture_overhead_cpu.json"))
    gpu = _load("capture_overhead_h200.json")
    for tokens in ("512", "2048"):
        seconds = gpu["results"][tokens]["seconds_median"]
        for config, target in gpu["targets"].items():
            out.append(_row(f"H200, 7B-shaped Llama bf16, {tokens} tokens: {config} / plain forward",
                            seconds[config] / seconds["plain"], target, "×", "capture_overhead_h200.json"))
        if "stats_then_first_read" in seconds:  # the TensorStats are built on the first read of rec.calls
            out.append(_row(f"H200, {tokens} tokens: stats, then the first read of `rec.calls` / plain forward",
                            seconds["stats_then_first_read"] / seconds["plain"], None, "×",
                            "capture_overhead_h200.json"))
    throughput = _load("compare_throughput_h200.json")
    default = throughput["default_path"].split()[0]
    out.append(_row(f"H200: compare throughput ({default})", throughput["results"][default]["gb_per_s"],
                    throughput["target_gb_per_s"], " GB/s", "compare_throughput_h200.json", higher_is_better=True))
    multi = _load("multigpu_h200x2.json")
    for config in ("stats", "tensors_cpu"):
        out.append(_row(f"2×H200, {multi['model']['parameters'] / 1e9:.1f}B-parameter Llama split by accelerate: "
                        f"{config} / plain forward", multi["capture"][config]["ratio_to_plain"], None, "×",
                        "multigpu_h200x2.json"))
    if (RESULTS / "triage_time_cpu.json").exists():
        triage = _load("triage_time_cpu.json")
        for row in triage["rows"]:
            out.append(_row(f"CPU ({triage['cpu_count']} cores): full `parity-kit triage`, {row['pair']}, "
                            f"{row['eval_limit']}-document paired eval", row["triage_s"], 180, " s",
                            "triage_time_cpu.json"))
    for name, target in (("divergence_batching_cpu.json", 3), ("divergence_batching_h100.json", 10)):
        if (RESULTS / name).exists():
            batching = _load(name)
            where = batching["gpu"] or f"CPU ({batching['cpu_threads']} threads)"
            for row in batching["results"]:
                out.append(_row(f"{where}: `divergence_statistics` batched ({row['batch_size']}) / one prompt at a "
                                f"time, {row['model']}, {row['prompts']}×{row['new_tokens']} tokens, {row['pair']} "
                                f"(median of {row['rounds']} rounds)", row["speedup_median"], target, "×", name,
                                higher_is_better=True))
    if (RESULTS / "execution_floor_h100.json").exists():
        floor = _load("execution_floor_h100.json")["results"]
        out.append(_row(f"{_load('execution_floor_h100.json')['gpu']}, 7B-shaped Llama: share of fp16-vs-fp32 module "
                        "differences within the bf16 execution floor", 100 * floor["fp16_table_against_bf16_floor"]
                        ["share_inside_execution_floor"]["all_sources"], None, "%", "execution_floor_h100.json"))
    return out


if __name__ == "__main__":
    print("\n".join(rows()))
