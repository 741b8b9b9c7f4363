"""Capture side by side: parity_kit's modes next to naive hooks and nnsight, same model, inputs and rounds.

Every variant captures every module but the root (``pk.select_modules(model, "*")``) of one forward; each
is timed as the user waits for it: the wall time of the whole block (hooks installed and removed, or the
``record()``/``trace()`` block entered and left; on CUDA the device synchronised at its end, and CUDA
events around it as a second clock). Rounds are interleaved (each round runs every variant once, in an
order rotated from round to round, so load from other processes falls on all of them alike), and each
variant's ratio is taken against the plain forward *of the same round*: reported are the median and the
interquartile range of those per-round ratios, and the median per-call cost, ``(variant − plain) /
module calls``. Variants:

- ``plain``: the forward alone; ``noop_hooks``: a forward hook that does nothing on every module;
- ``two_stats_hooks``: a hook computing rms and absmax of each output tensor, each read with ``.item()``;
- ``clone_hooks``: a hook keeping ``detach().clone()`` of each output tensor (``to_cpu_hooks`` on CUDA:
  ``.to("cpu")``);
- ``nnsight_cache``: nnsight's ``tracer.cache()`` (every module's output kept where it is);
  ``nnsight_save``: ``.save()`` of every module's output, requested in execution order (skipped when
  nnsight is not importable: it is a benchmark dependency only, see ``benchmarks/requirements.txt``);
- ``pk_stats``: ``record(mode="stats")``; ``pk_stats_read``: the same block, then the first read of
  ``rec.calls`` (where the TensorStats are built);
- ``pk_tensors``: ``record(mode="tensors", device=<model's device>)``; ``pk_tensors_cpu`` (CUDA only):
  ``device="cpu"``;
- ``pk_disk``: ``record(save_to=...)``; ``plain_write``: a plain sequential ``os.write`` of the same number
  of bytes into a file beside it, then ``fsync`` (the machine's write bandwidth in the same run; parity_kit's
  writer uses ``O_DIRECT`` where it can, so its bytes are on the device when the block ends too).

CPU, the decode-step case and the prefill case (the model of ``capture_overhead.py``):

    PYTHONPATH=. /work/venv-bench/bin/python benchmarks/capture_peers.py --model tiny --tokens 16 \\
        --out benchmarks/results/capture_peers_cpu_tiny16.json
    PYTHONPATH=. /work/venv-bench/bin/python benchmarks/capture_peers.py --model llama8x1024 --tokens 512 \\
        --rounds 7 --out benchmarks/results/capture_peers_cpu_llama512.json

H200 (7B-shaped Llama, bf16, 512 tokens; nnsight installed from wheels carried to the box):

    PYTHONPATH=. python benchmarks/capture_peers.py --device cuda --model 7b --tokens 512 --rounds 9 \\
        --out $OUT/capture_peers_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import parity_kit as pk
from parity_kit import testing

try:  # a benchmark dependency only
    import nnsight
except ImportError:
    nnsight = None

Runner = Callable[[], Any]


def build_model(name: str, device: str) -> nn.Module:
    """``tiny``: a 4-layer hidden-32 Llama (:func:`parity_kit.testing.tiny_llama`); ``llama8x1024``: the CPU model
    of ``capture_overhead.py``; ``7b``: its 7B-shaped CUDA model (bf16)."""
    if name == "tiny":
        return testing.tiny_llama(layers=4).to(device)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "llama8x1024":
        config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                             num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
        return LlamaForCausalLM(config).to(device).eval()
    if name == "7b":
        from capture_overhead import seven_b_shaped_llama

        return seven_b_shaped_llama(device)
    raise SystemExit(f"unknown --model {name!r}")


def _first_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return []


def _hooked(modules: list[nn.Module], forward: Runner, hook: Callable[..., None]) -> Runner:
    def run() -> None:
        handles = [m.register_forward_hook(hook) for m in modules]
        try:
            forward()
        finally:
            for h in handles:
                h.remove()
    return run


def _nnsight_variants(model: nn.Module, ids: torch.Tensor, order: list[str]) -> dict[str, Runner]:
    wrapped = nnsight.NNsight(model)

    def envoy(path: str) -> Any:
        node = wrapped
        for part in path.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        return node

    envoys = [envoy(name) for name in order]  # in the order their outputs are produced

    def cache() -> None:
        with torch.no_grad(), wrapped.trace(ids) as tracer:
            kept = tracer.cache(device=None)  # every module's output, left where it is (on CPU: a reference)
        assert len(kept._cache.entries) >= len(order), len(kept._cache.entries)

    def save() -> None:
        saved = []
        with torch.no_grad(), wrapped.trace(ids):
            for e in envoys:
                saved.append(e.output.save())
        assert len(saved) == len(order)

    return {"nnsight_cache": cache, "nnsight_save": save}


def variants(model: nn.Module, ids: torch.Tensor, device: str, scratch: Path,
             sizes: dict[str, int]) -> tuple[dict[str, Runner], int, list[str]]:
    """The runners, the module calls of one forward and the selected modules' names."""
    selected = pk.select_modules(model, "*")
    modules = [m for _, m in selected]
    order: list[str] = []
    names = {id(m): n for n, m in selected}
    probe = [m.register_forward_hook(lambda m, a, o: order.append(names[id(m)])) for m in modules]
    with torch.no_grad():
        model(ids)
    for h in probe:
        h.remove()
    calls = len(order)

    def forward() -> None:
        with torch.no_grad():
            model(ids)

    kept: list[Any] = []

    def two_stats(m: nn.Module, a: Any, out: Any) -> None:
        for t in _first_tensors(out):
            x = t.detach().float()
            kept.append((x.square().mean().sqrt().item(), x.abs().max().item()))

    def clone(m: nn.Module, a: Any, out: Any) -> None:
        kept.extend(t.detach().clone() for t in _first_tensors(out))

    def to_cpu(m: nn.Module, a: Any, out: Any) -> None:
        kept.extend(t.detach().to("cpu") for t in _first_tensors(out))

    def pk_stats() -> None:
        with torch.no_grad(), pk.record(model, "*", mode="stats"):
            model(ids)

    def pk_stats_read() -> None:
        with torch.no_grad(), pk.record(model, "*", mode="stats") as rec:
            model(ids)
        assert len(rec.calls) == calls

    def pk_tensors(target: str) -> Runner:
        def run() -> None:
            with torch.no_grad(), pk.record(model, "*", mode="tensors", device=target, memory_budget=None):
                model(ids)
        return run

    def pk_disk() -> None:
        target = scratch / "rec"
        with torch.no_grad(), pk.record(model, "*", mode="tensors", save_to=target):
            model(ids)
        sizes["pk_disk"] = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())

    def plain_write() -> None:
        total, chunk = sizes["pk_disk"], 8 << 20
        block = bytes(chunk)
        fd = os.open(scratch / "plain.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for start in range(0, total, chunk):
                os.write(fd, block[:min(chunk, total - start)])
            os.fsync(fd)
        finally:
            os.close(fd)

    def plain() -> None:
        kept.clear()
        forward()

    runners: dict[str, Runner] = {
        "plain": plain,
        "noop_hooks": _hooked(modules, forward, lambda m, a, o: None),
        "two_stats_hooks": _hooked(modules, forward, two_stats),
        "clone_hooks": _hooked(modules, forward, clone),
    }
    if device == "cuda":
        runners["to_cpu_hooks"] = _hooked(modules, forward, to_cpu)
    if nnsight is not None:
        runners.update(_nnsight_variants(model, ids, order))
    runners.update(pk_stats=pk_stats, pk_stats_read=pk_stats_read, pk_tensors=pk_tensors(device))
    if device == "cuda":
        runners["pk_tensors_cpu"] = pk_tensors("cpu")
    runners.update(pk_disk=pk_disk, plain_write=plain_write)
    return runners, calls, order


def _timed(run: Runner, cuda: bool) -> tuple[float, float | None]:
    """(wall seconds, CUDA-event seconds or None) of one run; on CUDA the device is idle at both ends."""
    if not cuda:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start, None
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start = time.perf_counter()
    begin.record()
    run()
    end.record()
    torch.cuda.synchronize()
    return time.perf_counter() - start, begin.elapsed_time(end) / 1e3


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarise(times: dict[str, list[float]], calls: int, sizes: dict[str, int]) -> dict[str, Any]:
    """Per variant: median seconds, per-round ratio to plain (median, IQR), per-call µs over plain."""
    plain = times["plain"]
    rows: dict[str, Any] = {}
    for name, ts in times.items():
        ratios = [t / p for t, p in zip(ts, plain)]
        q1, q2, q3 = _quartiles(ratios)
        rows[name] = {"seconds_median": statistics.median(ts), "ratio_median": q2, "ratio_q1": q1, "ratio_q3": q3,
                      "us_per_call_over_plain": statistics.median(t - p for t, p in zip(ts, plain)) * 1e6 / calls}
    if "pk_disk" in sizes:
        nbytes = sizes["pk_disk"]
        write = statistics.median(times["plain_write"])
        disk = statistics.median(times["pk_disk"])
        added = statistics.median(t - p for t, p in zip(times["pk_disk"], plain))
        rows["plain_write"]["gb_per_s"] = nbytes / write / 1e9
        rows["pk_disk"]["gb_per_s_whole_block"] = nbytes / disk / 1e9
        rows["pk_disk"]["gb_per_s_over_plain_forward"] = nbytes / added / 1e9 if added > 0 else None
        rows["pk_disk"]["bytes"] = nbytes
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "llama8x1024", "7b"], default="tiny")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", help="run only these variants (plain is always run)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, args.device)
    ids = torch.randint(3, model.config.vocab_size, (1, args.tokens), device=args.device)
    scratch = Path(tempfile.mkdtemp(prefix="pk_peers_", dir=args.out.resolve().parent if args.device == "cpu" else None))
    sizes: dict[str, int] = {}
    load_before = os.getloadavg()
    try:
        runners, calls, _ = variants(model, ids, args.device, scratch, sizes)
        if args.only:
            runners = {k: v for k, v in runners.items() if k == "plain" or k in args.only
                       or (k == "pk_disk" and "plain_write" in args.only)}
        cuda = args.device == "cuda"
        for run in runners.values():  # warm-up, twice: allocator, first-call paths, pk_disk's size
            run(), run()
        names = list(runners)
        wall: dict[str, list[float]] = {n: [] for n in names}
        events: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                w, e = _timed(runners[name], cuda)
                wall[name].append(w)
                if e is not None:
                    events[name].append(e)
            print(f"round {r + 1}/{args.rounds}: plain {wall['plain'][-1] * 1e3:.2f} ms", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load_after = os.getloadavg()
    results = summarise(wall, calls, sizes)
    for name, row in results.items():
        print(f"{name:16s} {row['seconds_median'] * 1e3:9.2f} ms  ×{row['ratio_median']:.2f} "
              f"[{row['ratio_q1']:.2f}–{row['ratio_q3']:.2f}]  {row['us_per_call_over_plain']:+8.1f} µs/call")
    out = {
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(), "threads": args.threads,
        "load_average_1_5_15_before": load_before, "load_average_1_5_15_after": load_after,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0],
                     "nnsight": getattr(nnsight, "__version__", None) if nnsight is not None else None,
                     "parity_kit": pk.__version__},
        "model": args.model, "tokens": args.tokens, "rounds": args.rounds, "module_calls": calls,
        "timing": "wall time of the whole block per round (CUDA: device synchronised at both ends); ratios are "
                  "per-round variant/plain, median and quartiles over rounds",
        "results": results, "seconds_all": wall,
    }
    if events["plain"]:
        out["cuda_event_seconds_all"] = events
        out["cuda_event_ratio_median"] = {n: statistics.median(t / p for t, p in zip(ts, events["plain"]))
                                          for n, ts in events.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
