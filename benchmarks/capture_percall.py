"""What one step of stats capture costs inside a real forward: the 7B-shaped Llama on CUDA, 512 tokens.

At 512 tokens the forward is bound by the host launching kernels, so work done once per module call
adds to the forward almost one for one, and it costs more there than in a tight loop (the forward's
own code runs in between). Every selected module's ``forward`` is wrapped as ``record()`` does
(``_install_hooks``) and the wrapper hands each output to one of these recorders:

- ``nothing``: does nothing (what the wrapper itself costs over ``plain``);
- ``keep``: keeps the output (an output held until the end of the forward);
- ``keep_counted``: keeps it and counts the module's calls in a dict keyed by name;
- ``keep_versioned``: keeps it with its version counter (``is_inference()`` asked first);
- ``keep_bytes``: keeps it and adds up ``nbytes`` against a batch limit;
- ``keep_checked``: keeps it after checking it is a CUDA tensor;
- ``keep_listed``: keeps it in a four-item list, as a placeholder does;
- ``keep_parallel``: appends a marker to one list and name, index, output and version to four
  others (a placeholder without a container per call);
- ``keep_try_version``: keeps it with its version counter, read without asking first;
- ``record_stats``: the capturer of ``record(mode="stats")``, whose wrappers record placeholders
  themselves (what a stats block's forward runs, without entering and leaving the block).

Each round times the forward (host time) once with every recorder, in turn; reported are the
medians over ``--rounds`` rounds and each recorder's median paired difference to ``keep`` in the
same round.

    PYTHONPATH=. python benchmarks/capture_percall.py --out $OUT/capture_percall_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from capture_overhead import seven_b_shaped_llama

from parity_kit.capture import recorder as capture
from parity_kit.recording import Recording

RESULT = Path(__file__).resolve().parent / "results" / "capture_percall_h200.json"


class _Recorder:
    """Stands in for the capturer: ``_install_hooks`` hands its wrappers ``output``; ``lean`` off, so
    the wrappers call ``output`` for every output."""

    lean = False

    def __init__(self, step: str) -> None:
        self.kept: list[Any] = []
        self.counts_list: list[None] = []
        self.names: list[str] = []
        self.indexes: list[int | None] = []
        self.versions: list[int | None] = []
        self.counts: dict[str, int] = {}
        self.nbytes = 0
        self.limit = 1 << 40
        self.output: Callable[..., None] = getattr(self, step)

    def nothing(self, name: str, out: Any, index: int | None = None) -> None:
        pass

    def keep(self, name: str, out: Any, index: int | None = None) -> None:
        self.kept.append(out)

    def keep_counted(self, name: str, out: Any, index: int | None = None) -> None:
        counts = self.counts
        i = counts.get(name, 0)
        counts[name] = i + 1
        self.kept.append(out)

    def keep_versioned(self, name: str, out: Any, index: int | None = None) -> None:
        if type(out) is torch.Tensor:
            self.kept.append((out, None if out.is_inference() else out._version))

    def keep_bytes(self, name: str, out: Any, index: int | None = None) -> None:
        if type(out) is torch.Tensor:
            self.kept.append(out)
            self.nbytes += out.nbytes
            if self.nbytes >= self.limit:
                raise AssertionError("the batch limit is never reached here")

    def keep_checked(self, name: str, out: Any, index: int | None = None) -> None:
        if type(out) is torch.Tensor and out.is_cuda:
            self.kept.append(out)

    def keep_listed(self, name: str, out: Any, index: int | None = None) -> None:
        self.kept.append([name, index, out, None])

    def keep_parallel(self, name: str, out: Any, index: int | None = None) -> None:
        self.counts_list.append(None)
        self.names.append(name)
        self.indexes.append(index)
        self.kept.append(out)
        self.versions.append(None)

    def keep_try_version(self, name: str, out: Any, index: int | None = None) -> None:
        if type(out) is torch.Tensor:
            try:
                version = out._version
            except RuntimeError:  # an inference tensor
                version = None
            self.kept.append((out, version))


def _stats_capturer() -> capture._Capturer:
    return capture._Capturer(Recording("stats"), torch.device("cpu"), None, None, True,
                             capture._AUTO_BATCH * 4, None, False, None, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds of plain forwards before timing")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = seven_b_shaped_llama()
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device="cuda")
    named = capture._named_modules(model)
    selected = capture._select(named, "*")
    steps = ["nothing", "keep", "keep_counted", "keep_versioned", "keep_bytes", "keep_checked", "keep_listed",
             "keep_parallel", "keep_try_version"]
    makers: dict[str, Callable[[], Any]] = {step: (lambda step=step: _Recorder(step)) for step in steps}
    makers["record_stats"] = _stats_capturer

    def plain() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(ids)
        host = time.perf_counter() - start
        torch.cuda.synchronize()
        return host

    def wrapped(make: Callable[[], Any]) -> float:
        handles = capture._install_hooks(make(), selected, named, False)
        try:
            return plain()
        finally:
            for handle in handles:
                handle.remove()

    times: dict[str, list[float]] = {"plain": [], **{name: [] for name in makers}}
    with torch.no_grad():
        for make in makers.values():  # warm-up
            wrapped(make)
        settle_until = time.perf_counter() + args.settle
        while time.perf_counter() < settle_until:
            model(ids)
        for _ in range(args.rounds):
            times["plain"].append(plain())
            for name, make in makers.items():
                times[name].append(wrapped(make))
    calls = len(selected)
    rows = {}
    for name, ts in times.items():
        paired = statistics.median(a - b for a, b in zip(ts, times["keep"]))
        rows[name] = {"host_ms_median": statistics.median(ts) * 1e3, "host_ms_min": min(ts) * 1e3,
                      "paired_ms_vs_keep": paired * 1e3, "paired_us_per_call_vs_keep": paired * 1e6 / calls}
        print(f"{name:15s} {rows[name]['host_ms_median']:8.3f} ms (min {rows[name]['host_ms_min']:7.3f})  "
              f"vs keep {rows[name]['paired_ms_vs_keep']:+.3f} ms, {rows[name]['paired_us_per_call_vs_keep']:+.2f} µs "
              "per call", flush=True)
    out = {"command": " ".join(["python", *sys.argv]), "device": torch.cuda.get_device_name(0),
           "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
           "tokens": args.tokens, "rounds": args.rounds, "wrapped_modules": calls,
           "timing": "host time of model(ids) with every selected module's forward wrapped; medians over rounds",
           "results": rows, "seconds_all": times}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
