"""Writing a recording-sized file: through the page cache vs parity_kit's FileSink, after pauses.

Each write is measured twice: wall seconds, and CPU seconds of this process (all threads, user
and system, so the kernel's copying into the page cache counts). A streamed recording's write runs
beside a forward pass that wants the CPU, so both matter. Each round sleeps ``gap`` seconds (on a
virtual machine that returns freed memory to its host, page-cache pages are slow to touch again
after a pause), then writes the same bytes to a new file both ways; the file is removed after each write.

    .venv/bin/python benchmarks/write_paths.py [--megabytes 378] [--rounds 3]

Writes benchmarks/results/write_paths_cpu.json. Wall times include FileSink's ``finish`` (its thread's
I/O is waited for).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from parity_kit.recording.filesink import FileSink

RESULT = Path(__file__).resolve().parent / "results" / "write_paths_cpu.json"


def _buffered(path: Path, data: torch.Tensor) -> None:
    with open(path, "wb") as f:
        f.write(data.numpy())


def _sink(path: Path, data: torch.Tensor) -> bool:
    sink = FileSink(path)
    try:
        for piece in data.split(4 << 20):  # as record() hands it over: tensor by tensor
            sink.append(piece)
        sink.finish()
    finally:
        sink.close()
    return sink.direct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=378)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gaps", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    data = torch.randint(0, 256, (args.megabytes * 10**6,), dtype=torch.uint8)
    folder = Path(tempfile.mkdtemp(prefix=".write_paths.", dir=args.dir))
    times: dict[str, dict[str, list[float]]] = {}
    direct = None
    try:
        for round_ in range(args.rounds):
            for gap in args.gaps:
                for name, write in (("page_cache", _buffered), ("filesink", _sink)):
                    time.sleep(gap)
                    path = folder / "f.bin"
                    start, cpu_start = time.perf_counter(), time.process_time()
                    used_direct = write(path, data)
                    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                    if name == "filesink":
                        direct = used_direct
                    path.unlink()
                    times.setdefault(f"gap_{gap:g}s", {}).setdefault(f"{name}_wall", []).append(elapsed)
                    times[f"gap_{gap:g}s"].setdefault(f"{name}_cpu", []).append(cpu)
                    print(f"round {round_} gap {gap:g}s {name:10s} wall {elapsed:.3f} s cpu {cpu:.3f} s", flush=True)
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    medians = {gap: {name: statistics.median(t) for name, t in by_name.items()} for gap, by_name in times.items()}
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
        "megabytes": args.megabytes,
        "filesink_used_o_direct": direct,
        "seconds_median": medians,
        "seconds_all": times,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for gap, m in medians.items():
        print(f"{gap:8s} " + "  ".join(f"{name} {t:.3f} s" for name, t in m.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
