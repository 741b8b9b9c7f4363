"""Wall time of a full ``parity-kit triage`` of two built-in models (the target of issue #22: ≤ 3 min on 2 CPU cores).

Each pair is triaged with every step (no ``--quick``) and, with ``--eval-limit N``, a paired last-word evaluation
of the first N documents of ``data/eval/lastword.jsonl``. Models are loaded first (their load time is reported
apart). ``parity_kit`` is imported before torch, as a notebook does, so its ``OMP_WAIT_POLICY=PASSIVE`` default
applies (recorded with the load average and the CPU pressure, which say how shared the cores were). The
baseline, in the same run, is one :func:`parity_kit.compare_models` of the same pair on the same
token ids (the calibrated comparison every triage contains), so ``ratio_to_compare_models`` says what the whole
investigation costs on top of the one comparison a user would otherwise run by hand.

    PYTHONPATH=. python benchmarks/triage_time.py --eval-limit 32 --out benchmarks/results/triage_time_cpu.json
    # on an H200, a 7B-shaped pair (random weights from a config; not yet run, no GPU this session):
    PYTHONPATH=. python benchmarks/triage_time.py --device cuda --pairs 7b --out benchmarks/results/triage_time_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# first, as a notebook's `import parity_kit as pk`: it sets OMP_WAIT_POLICY before torch loads
import parity_kit  # noqa: F401
import torch

from parity_kit._util.paths import data_dir
from parity_kit.analyses.calibration import compare_models
from parity_kit.analyses.runs import RunSpec, load_run
from parity_kit.analyses.triage import triage

PAIRS = {
    "internlm2-bf16": (RunSpec("tiny-internlm2", "fp32"), RunSpec("tiny-internlm2-llama", "bf16")),
    "rwkv7-bf16": (RunSpec("tiny-rwkv7", "fp32"), RunSpec("tiny-rwkv7", "bf16")),
}


def seven_b_pair(device: str) -> tuple:
    """A Llama-2-7B-shaped model (random weights, seed 0) in bf16 and its copy with the fp32 reference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    torch.manual_seed(0)
    with torch.device(device):
        ref = LlamaForCausalLM(config).eval()
    with torch.device(device):  # built where it runs: a 7B init on the host takes minutes
        cand = LlamaForCausalLM(config).to(dtype=torch.bfloat16).eval()
    cand.load_state_dict(ref.state_dict())
    return ref, cand


def run_pair(name: str, device: str, eval_limit: int | None) -> dict:
    started = time.perf_counter()
    if name == "7b":
        ref, cand = seven_b_pair(device)
        ref_side, cand_side = ref, cand
        ids = torch.randint(0, 32000, (1, 128), generator=torch.Generator().manual_seed(0))
        kwargs = {"input_ids": ids}
    else:
        ref_spec, cand_spec = PAIRS[name]
        ref_side = load_run(RunSpec(ref_spec.model, ref_spec.dtype, device))
        cand_side = load_run(RunSpec(cand_spec.model, cand_spec.dtype, device))
        kwargs = {"eval_items": data_dir() / "eval" / "lastword.jsonl", "eval_limit": eval_limit} if eval_limit else {}
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    result = triage(ref_side, cand_side, show_progress=False, **kwargs)
    triage_s = time.perf_counter() - started
    ref_model = ref_side[0] if isinstance(ref_side, tuple) else ref_side
    cand_model = cand_side[0] if isinstance(cand_side, tuple) else cand_side
    ids = torch.tensor([result.steps["inputs"]["reference_ids"]])
    mapping = None
    if name == "internlm2-bf16":
        from parity_kit.analyses.triage_checks import detect_mapping
        mapping = detect_mapping(ref_model, cand_model)[0]
    started = time.perf_counter()
    compare_models(ref_model, cand_model, ids, mapping=mapping, show_progress=False)
    baseline_s = time.perf_counter() - started
    return {"pair": name, "device": device, "load_s": load_s, "triage_s": triage_s, "compare_models_s": baseline_s,
            "ratio_to_compare_models": triage_s / baseline_s, "seconds_by_step": result.seconds,
            "first_cause": result.causes[0].to_dict(), "eval_limit": eval_limit}


def cpu_pressure() -> float | None:
    """Linux PSI: the share of the last 10 s in which some runnable task waited for a CPU (None where absent)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None
    return float(dict(part.split("=") for part in line.split()[1:])["avg10"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), help=f"{list(PAIRS)} or 7b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-limit", type=int, default=32, help="documents of the paired evaluation (0: none)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    load_before = os.getloadavg()  # other processes on the same cores stretch every time above
    pressure_before = cpu_pressure()
    for name in args.pairs:
        rows.append(run_pair(name, args.device, args.eval_limit))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "first_cause"}), flush=True)
        print("  first cause:", rows[-1]["first_cause"]["title"], flush=True)
    result = {"command": " ".join(sys.argv), "torch": torch.__version__, "python": platform.python_version(),
              "cpu_count": os.cpu_count(), "torch_num_threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "cpu_pressure_some_avg10_before": pressure_before, "cpu_pressure_some_avg10_after": cpu_pressure(),
              "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
