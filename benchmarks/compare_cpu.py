"""``pk.compare`` on CPU against the forward it compares: every module of an 8-layer hidden-1024 Llama.

The reference is one fp32 forward of the model of ``capture_overhead.py`` (8 layers, hidden 1024, 512
tokens) recorded with ``mode="tensors"``; the candidate is the same model with every weight perturbed by
relative noise ``--noise`` (so every metric is non-trivial). Each round times, in turn, the plain forward,
``pk.compare(ref, cand)`` and, as a floor for what any comparison costs, a one-line rel_rms loop over the same
pairs (``((c - r).norm() / r.norm())`` per pair, fp32). Reported: per-round ratios to the forward of the same
round, median and interquartile range, and the number of pairs.

    PYTHONPATH=. python benchmarks/compare_cpu.py --out benchmarks/results/compare_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import parity_kit as pk


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--noise", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()
    cand_model = copy.deepcopy(model)
    with torch.no_grad():
        for p in cand_model.parameters():
            p.add_(args.noise * p.abs().mean() * torch.randn_like(p))
    ids = torch.randint(3, config.vocab_size, (1, args.tokens))
    load_before = os.getloadavg()
    with torch.no_grad():
        with pk.record(model, "*", memory_budget=None) as ref:
            model(ids)
        with pk.record(cand_model, "*", memory_budget=None) as cand:
            cand_model(ids)
    pairs = [(a.output, b.output) for a, b in zip(ref.calls, cand.calls)
             if isinstance(a.tensors.get("output"), torch.Tensor) and a.output.is_floating_point()]

    def forward() -> None:
        with torch.no_grad():
            model(ids)

    def compare() -> None:
        table = pk.compare(ref, cand)
        assert len(table) >= len(pairs)

    def rel_rms_loop() -> None:
        [float((c - r).norm() / r.norm()) for r, c in pairs]

    runners = {"forward": forward, "compare": compare, "rel_rms_loop": rel_rms_loop}
    for run in runners.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
        print(f"round {r + 1}/{args.rounds}: forward {seconds['forward'][-1]:.3f} s, compare "
              f"{seconds['compare'][-1]:.3f} s, rel_rms loop {seconds['rel_rms_loop'][-1]:.3f} s", flush=True)
    results = {}
    for name, ts in seconds.items():
        q1, q2, q3 = _quartiles([t / f for t, f in zip(ts, seconds["forward"])])
        results[name] = {"seconds_median": statistics.median(ts), "ratio_to_forward_median": q2,
                         "ratio_to_forward_q1": q1, "ratio_to_forward_q3": q3}
        print(f"{name:14s} {statistics.median(ts):.3f} s  ×{q2:.2f} [{q1:.2f}–{q3:.2f}] of the forward")
    out = {"command": " ".join(["python", *sys.argv]), "device": platform.processor() or "cpu",
           "cpu_count": os.cpu_count(), "threads": args.threads,
           "load_average_1_5_15_before": load_before, "load_average_1_5_15_after": os.getloadavg(),
           "versions": {"torch": torch.__version__, "python": sys.version.split()[0], "parity_kit": pk.__version__},
           "tokens": args.tokens, "rounds": args.rounds, "calls": len(ref.calls), "float_output_pairs": len(pairs),
           "bytes_per_recording": ref.nbytes(), "target_ratio": 0.5, "results": results, "seconds_all": seconds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
