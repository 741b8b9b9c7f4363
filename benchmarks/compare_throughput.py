"""Comparison throughput on a GPU: GB/s of recorded data compared (bytes of both recordings / time).

Two recordings shaped like one forward of a 7B Llama at ``--tokens`` tokens (per layer: seven
[T, 4096] outputs and three [T, 11008] ones, 32 layers, plus [T, 32000] logits), bf16, random: the
candidate is the reference plus noise of relative size 1e-2, rounded to bf16. ``pk.compare`` is timed
on GPU-resident recordings (results read back once per table) with

- the fused Triton kernel (``parity_kit.comparison.kernels``, the default on CUDA),
- the torch reductions in fp64 (``PARITY_KIT_KERNEL=0``, the default before the kernel),
- the torch reductions through torch.compile (opt-in ``PARITY_KIT_COMPILE=1``),

and on CPU-resident recordings streamed to the GPU in 1 GiB chunks (kernel). Two rows isolate the
kernel: ``pair_reductions`` called on every pair without ``compare`` around it, and the kernel alone on
the largest pair (logits), repeated, timed with CUDA events. Each figure is the median of ``--repeats``
runs after a warm-up (which includes compilation). The tables of the kernel and of torch.compile are
checked against the eager fp64 table: largest relative difference per metric, and whether max_abs,
max_ulp and nonfinite are equal.

    PYTHONPATH=. python benchmarks/compare_throughput.py --out $OUT/compare_throughput_h200.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import parity_kit as pk

compare_module = importlib.import_module("parity_kit.comparison.compare")
metrics_module = importlib.import_module("parity_kit.comparison.metrics")
from parity_kit.recording import Call, Recording


def _recordings(tokens: int, device: str, layers: int = 32) -> tuple[Recording, Recording]:
    g = torch.Generator(device).manual_seed(0)
    shapes = [("self_attn.q_proj", 4096), ("self_attn.k_proj", 4096), ("self_attn.v_proj", 4096),
              ("self_attn.o_proj", 4096), ("mlp.gate_proj", 11008), ("mlp.up_proj", 11008),
              ("mlp.act_fn", 11008), ("mlp.down_proj", 4096), ("input_layernorm", 4096), ("", 4096)]
    ref_calls, cand_calls = [], []
    names = [(f"model.layers.{i}.{n}".rstrip("."), w) for i in range(layers) for n, w in shapes] + [("lm_head", 32000)]
    for order, (name, width) in enumerate(names):
        r = torch.randn(1, tokens, width, device=device, generator=g, dtype=torch.float32)
        c = (r + 1e-2 * torch.randn(r.shape, device=device, generator=g)).bfloat16()
        ref_calls.append(Call(name, 0, order, {"output": r.bfloat16()}))
        cand_calls.append(Call(name, 0, order, {"output": c}))
    return Recording("tensors", ref_calls), Recording("tensors", cand_calls)


def _time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up (compilation, allocator)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def _difference(table, reference) -> dict[str, object]:
    """Largest relative difference per metric column, and whether the exact columns are equal."""
    out: dict[str, object] = {}
    for col in ("max_abs", "mean_abs", "rel_rms", "cosine", "sqnr_db", "max_ulp", "floor"):
        a = torch.tensor(table[col].to_numpy(float), dtype=torch.float64)
        b = torch.tensor(reference[col].to_numpy(float), dtype=torch.float64)
        out[col] = float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())
    out["exact_columns_equal"] = all(table[c].tolist() == reference[c].tolist()
                                     for c in ("max_abs", "max_ulp", "nonfinite"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "compare_throughput_h200.json")
    args = parser.parse_args()
    ref, cand = _recordings(args.tokens, "cuda")
    nbytes = ref.nbytes() + cand.nbytes()
    results: dict[str, dict[str, object]] = {}
    tables = {}

    def record(name: str, median: float, times: list[float], nbytes: int = nbytes) -> None:
        results[name] = {"seconds_median": median, "seconds_all": times, "gb_per_s": nbytes / median / 1e9}
        print(f"{name:34s} {median*1e3:9.2f} ms  {nbytes / median / 1e9:8.1f} GB/s", flush=True)

    def run(name: str, r: Recording, c: Recording, *, compile_: bool = False, kernel: bool = True,
            repeats: int = args.repeats, **kw: object) -> None:
        os.environ["PARITY_KIT_COMPILE"] = "1" if compile_ else "0"
        os.environ["PARITY_KIT_KERNEL"] = "1" if kernel else "0"
        median, times = _time(lambda: tables.__setitem__(name, pk.compare(r, c, **kw)), repeats)
        record(name, median, times)

    run("gpu_resident_kernel", ref, cand)
    kernel_used = callable(metrics_module._kernel_state)
    pairs = [(a.output, b.output) for a, b in zip(ref, cand)]

    def reductions_only() -> None:
        torch.stack([metrics_module.pair_reductions(a, b, torch.bfloat16) for a, b in pairs]).cpu()

    record("kernel_pair_reductions_only", *_time(reductions_only, args.repeats))
    largest_ref, largest_cand = max(pairs, key=lambda p: p[0].numel())
    pair_bytes = largest_ref.numel() * largest_ref.element_size() + largest_cand.numel() * largest_cand.element_size()

    def largest_pair_seconds(launches: int = 20) -> float:
        metrics_module.pair_reductions(largest_ref, largest_cand, torch.bfloat16)  # warm-up, compilation
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(launches):
            metrics_module.pair_reductions(largest_ref, largest_cand, torch.bfloat16)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / launches

    per_launch = largest_pair_seconds()
    record("kernel_largest_pair_gpu_time", per_launch, [per_launch], pair_bytes)
    results["kernel_largest_pair_gpu_time"]["pair_shape"] = list(largest_ref.shape)
    # tile size and warps of the kernel, for tuning its defaults (the module constants, set back after)
    import parity_kit.comparison.kernels as kernels_module

    default = (kernels_module._BLOCK, kernels_module._WARPS)
    sweep = []
    for block, warps in ((256, 2), (512, 4), (1024, 8), (2048, 8)):
        kernels_module._BLOCK, kernels_module._WARPS = block, warps
        seconds = largest_pair_seconds()
        sweep.append({"block": block, "num_warps": warps, "seconds": seconds, "gb_per_s": pair_bytes / seconds / 1e9})
        print(f"  largest pair, block {block:5d}, {warps} warps: {pair_bytes / seconds / 1e9:8.1f} GB/s", flush=True)
    kernels_module._BLOCK, kernels_module._WARPS = default
    del pairs, largest_ref, largest_cand
    run("gpu_resident_eager_torch", ref, cand, kernel=False, repeats=max(3, args.repeats // 2))
    run("gpu_resident_compiled_torch", ref, cand, compile_=True)
    compiled_ok = not compare_module._compile_failed
    cpu_ref = Recording("tensors", [Call(c.module, c.index, c.order, {"output": c.output.cpu()}) for c in ref])
    cpu_cand = Recording("tensors", [Call(c.module, c.index, c.order, {"output": c.output.cpu()}) for c in cand])
    del ref, cand
    torch.cuda.empty_cache()
    run("cpu_resident_streamed_kernel", cpu_ref, cpu_cand, device="cuda", chunk_bytes="1GiB",
        repeats=max(3, args.repeats // 2))
    eager = tables["gpu_resident_eager_torch"]
    import transformers
    import triton

    out = {
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name(0),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "triton": triton.__version__, "transformers": transformers.__version__,
                     "parity_kit": pk.__version__},
        "recordings": {"pairs": len(cpu_ref), "tokens": args.tokens, "dtype": "bf16",
                       "bytes_both_recordings": nbytes},
        "kernel_used": kernel_used,
        "kernel_defaults": {"block": default[0], "num_warps": default[1], "max_programs": kernels_module._MAX_PROGRAMS},
        "kernel_config_sweep_largest_pair": sweep,
        "torch_compile_used": compiled_ok,
        "kernel_vs_eager": _difference(tables["gpu_resident_kernel"], eager),
        "compiled_vs_eager": _difference(tables["gpu_resident_compiled_torch"], eager),
        "default_path": "gpu_resident_kernel (fused Triton kernel; PARITY_KIT_KERNEL=0 gives the torch path)",
        "target_gb_per_s": 500,
        "meets_target": results["gpu_resident_kernel"]["gb_per_s"] >= 500,
        "results": results,
        "rel_rms_median": float(tables["gpu_resident_kernel"]["rel_rms"].median()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("kernel_used", "kernel_vs_eager", "compiled_vs_eager", "meets_target")}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
