"""Triage wall time of the RWKV-7 pair under OpenMP wait policies, interleaved, with the CPU pressure of each run.

On cores shared with other processes, libgomp's default (worker threads spin while they wait) stalls every
parallel region whose sibling thread was descheduled; a tiny-model triage is ~150,000 small aten ops, so the
stalls add up. ``import parity_kit`` before torch sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set). Each run here
is a fresh process (libgomp reads the policy once), configurations take turns, and each run records the Linux
CPU pressure (``/proc/pressure/cpu`` "some avg10": the share of the last 10 s in which a runnable task waited
for a CPU) just before it, so contended and idle runs can be told apart.

    PYTHONPATH=. python benchmarks/triage_wait_policy.py --rounds 4 --out benchmarks/results/triage_wait_policy_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from triage_time import cpu_pressure  # benchmarks/ is on the path when this script runs

# config name -> (environment changes, torch threads); "default" imports torch first, so parity_kit sets nothing
CONFIGS = {"default": ({}, 2), "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2), "threads1": ({}, 1)}

CHILD = """
import json, sys, time
if sys.argv[1] == "default":
    import torch  # before parity_kit: libgomp keeps its default (spinning) policy
import parity_kit, torch
torch.set_num_threads(int(sys.argv[2]))
from parity_kit._util.paths import data_dir
from parity_kit.analyses.runs import RunSpec, load_run
from parity_kit.analyses.triage import triage
ref, cand = load_run(RunSpec("tiny-rwkv7", "fp32")), load_run(RunSpec("tiny-rwkv7", "bf16"))
t = time.perf_counter()
r = triage(ref, cand, show_progress=False, eval_items=data_dir() / "eval" / "lastword.jsonl", eval_limit=32)
print(json.dumps({"triage_s": time.perf_counter() - t, "seconds_by_step": r.seconds, "first_cause": r.causes[0].kind,
                  "omp_wait_policy": __import__("os").environ.get("OMP_WAIT_POLICY"),
                  "torch_num_threads": torch.get_num_threads()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    base_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    rows = []
    for round_ in range(args.rounds):
        for name in args.configs:
            changes, threads = CONFIGS[name]
            pressure, load = cpu_pressure(), os.getloadavg()[0]
            started = time.time()
            out = subprocess.run([sys.executable, "-c", CHILD, name, str(threads)], env={**base_env, **changes},
                                 capture_output=True, text=True, check=True)
            row = {"round": round_, "config": name, "cpu_pressure_some_avg10_before": pressure,
                   "load_average_1min_before": load, "started": started, **json.loads(out.stdout.splitlines()[-1])}
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("round", "config", "cpu_pressure_some_avg10_before", "triage_s")}),
                  flush=True)
    result = {"command": " ".join(sys.argv), "cpu_count": os.cpu_count(), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
