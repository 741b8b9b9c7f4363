"""Comparison throughput on a GPU: GB/s of recorded data compared (bytes of both recordings / time).

Two recordings shaped like one forward of a 7B Llama at ``--tokens`` tokens (per layer: seven
[T, 4096] outputs and three [T, 11008] ones, 32 layers, plus [T, 32000] logits), bf16, random: the
candidate is the reference plus noise of relative size 1e-2, rounded to bf16. ``pk.compare`` is timed
on GPU-resident recordings (results read back once per table) with eager reductions (the default)
and through torch.compile (opt-in), and on CPU-resident recordings streamed to the GPU in 1 GiB
chunks. Each figure is the median of ``--repeats`` runs after a warm-up (which includes compilation).
The largest relative difference between the compiled and the eager table is recorded.

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

compare_module = importlib.import_module("parity_kit.compare")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "compare_throughput_h200.json")
    args = parser.parse_args()
    ref, cand = _recordings(args.tokens, "cuda")
    nbytes = ref.nbytes() + cand.nbytes()
    results: dict[str, dict[str, float]] = {}
    tables = {}

    def run(name: str, r: Recording, c: Recording, compile_: bool, **kw: object) -> None:
        os.environ["PARITY_KIT_COMPILE"] = "1" if compile_ else "0"
        median, times = _time(lambda: tables.__setitem__(name, pk.compare(r, c, **kw)), args.repeats)
        results[name] = {"seconds_median": median, "seconds_all": times, "gb_per_s": nbytes / median / 1e9}
        print(f"{name:28s} {median*1e3:9.2f} ms  {nbytes / median / 1e9:8.1f} GB/s", flush=True)

    run("gpu_resident_eager", ref, cand, False)
    run("gpu_resident_compiled", ref, cand, True)
    compiled_ok = not compare_module._compile_failed
    cpu_ref = Recording("tensors", [Call(c.module, c.index, c.order, {"output": c.output.cpu()}) for c in ref])
    cpu_cand = Recording("tensors", [Call(c.module, c.index, c.order, {"output": c.output.cpu()}) for c in cand])
    del ref, cand
    torch.cuda.empty_cache()
    run("cpu_resident_streamed_eager", cpu_ref, cpu_cand, False, device="cuda", chunk_bytes="1GiB")
    worst = 0.0
    for col in ("max_abs", "mean_abs", "rel_rms", "cosine", "sqnr_db", "max_ulp"):
        a = torch.tensor(tables["gpu_resident_compiled"][col].to_numpy(float), dtype=torch.float64)
        b = torch.tensor(tables["gpu_resident_eager"][col].to_numpy(float), dtype=torch.float64)
        worst = max(worst, float(((a - b).abs() / b.abs().clamp_min(1e-300)).max()))
    import transformers

    out = {
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name(0),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "transformers": transformers.__version__, "parity_kit": pk.__version__},
        "recordings": {"pairs": len(cpu_ref), "tokens": args.tokens, "dtype": "bf16",
                       "bytes_both_recordings": nbytes},
        "torch_compile_used": compiled_ok,
        "compiled_vs_eager_max_relative_difference": worst,
        "default_path": "gpu_resident_eager (torch.compile is opt-in: PARITY_KIT_COMPILE=1)",
        "target_gb_per_s": 500,
        "meets_target": results["gpu_resident_eager"]["gb_per_s"] >= 500,
        "results": results,
        "rel_rms_median": float(tables["gpu_resident_eager"]["rel_rms"].median()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"compiled vs eager max relative difference {worst:.3g}; wrote {args.out}")


if __name__ == "__main__":
    main()
