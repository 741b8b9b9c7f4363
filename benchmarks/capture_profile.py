"""Where the capture overhead goes: host-side profile of ``record()`` on the 7B-shaped Llama (CUDA).

Runs the configurations of ``capture_overhead.py --device cuda`` at one token count, prints the
block times (CUDA events, median of ``--repeats``) and, for each capture configuration, a cProfile of
``--profiled`` blocks sorted by own time. The GPU runs far ahead of a launch-bound host at 512
tokens, so host time spent in hooks is added to the forward almost one for one.

    PYTHONPATH=. python benchmarks/capture_profile.py --tokens 512 > $OUT/capture_profile.txt
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch
from capture_overhead import seven_b_shaped_llama

import parity_kit as pk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profiled", type=int, default=5)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds of plain forwards before timing")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = seven_b_shaped_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda")

    phases: dict[str, list[tuple[float, float, float]]] = {}

    def capture(**kw: object):
        def run() -> None:
            with pk.record(model, "*", memory_budget=None, **kw):
                model(ids)
        return run

    def phased(name: str, **kw: object) -> None:
        """Host time of the block's entry (hooking), the forward (queueing kernels) and its exit (waiting)."""
        torch.cuda.synchronize()
        block = pk.record(model, "*", memory_budget=None, **kw)
        t0 = time.perf_counter()
        block.__enter__()
        t1 = time.perf_counter()
        model(ids)
        t2 = time.perf_counter()
        block.__exit__(None, None, None)
        t3 = time.perf_counter()
        phases.setdefault(name, []).append((t1 - t0, t2 - t1, t3 - t2))

    configs = {
        "plain": lambda: model(ids),
        "stats": capture(mode="stats"),
        "tensors_gpu": capture(mode="tensors", device="cuda"),
        "tensors_cpu": capture(mode="tensors", device="cpu"),
    }
    with torch.no_grad():
        times: dict[str, list[float]] = {k: [] for k in configs}
        for fn in configs.values():
            fn(), fn()
        settle_until = time.perf_counter() + args.settle  # as in capture_overhead.py: clocks and host settle
        while time.perf_counter() < settle_until:
            model(ids)
        for _ in range(args.repeats):
            for name, fn in configs.items():
                torch.cuda.synchronize()
                host = time.perf_counter()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                host = time.perf_counter() - host
                end.synchronize()
                times[name].append((start.elapsed_time(end), host * 1e3))
        plain = statistics.median(t for t, _ in times["plain"])
        for name, ts in times.items():
            gpu = statistics.median(t for t, _ in ts)
            host = statistics.median(h for _, h in ts)
            print(f"{name:12s} block {gpu:7.2f} ms ({gpu / plain:4.2f}x)   host time to return {host:7.2f} ms")
        kinds = {"stats": {"mode": "stats"}, "tensors_gpu": {"mode": "tensors", "device": "cuda"},
                 "tensors_cpu": {"mode": "tensors", "device": "cpu"}}
        for _ in range(args.repeats):
            for name, kw in kinds.items():
                phased(name, **kw)
        for name, ts in phases.items():
            enter, forward, leave = (statistics.median(x) * 1e3 for x in zip(*ts))
            print(f"{name:12s} host ms: enter {enter:6.2f}  forward {forward:6.2f}  exit {leave:6.2f}")
        for name in ("stats", "tensors_gpu"):
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(args.profiled):
                configs[name]()
            torch.cuda.synchronize()
            profile.disable()
            out = io.StringIO()
            for order in ("tottime", "cumulative"):
                pstats.Stats(profile, stream=out).sort_stats(order).print_stats(args.rows)
            print(f"\n===== {name}: cProfile of {args.profiled} blocks, by own then cumulative time =====\n{out.getvalue()}")


if __name__ == "__main__":
    main()
