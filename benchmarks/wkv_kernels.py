"""Chunked vs recurrent RWKV-7 WKV on a CUDA GPU: FLA's real kernels next to ours, through parity_kit.analyses.prefill.

For T in --lengths (prefixes of one random model-like sequence, B=1, H=16, N=64, seed 0) and each dtype,
runs ``fla_chunk`` (``chunk_rwkv7``), ``fla_fused_recurrent`` (``fused_recurrent_rwkv7``), both with
``scale=1.0``, and our four modes, and measures output and final-state error against the fp64 recurrence on
the unrounded inputs and on the rounded inputs, and chunk against recurrent directly
(:func:`parity_kit.analyses.prefill.compare_prefill`). Also: state error at every chunk boundary for the longest T,
FLA prefill-then-decode vs full prefill, kernel times (median of 5 after 2 warm-ups; the error tables' ``seconds``
exclude the first call of each kernel, timed
apart as ``first_call_seconds`` because it compiles and autotunes Triton kernels), and, last, FLA's chunk size
16/32/64 (new Triton compilations).

Run (GPU box, FLA 0.6.0 wheels installed):
    python benchmarks/wkv_kernels.py --out parity_kit/data/stored/wkv_kernels_h200.json
(the default: story 03 shows these figures without a GPU, so they ship inside the package)
Without CUDA or fla it writes nothing and exits with the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from parity_kit.analyses.prefill import (  # noqa: E402
    FLA_MODES, OUR_MODES, compare_prefill, fla_unavailable_reason, prefill_then_decode, run_mode,
)
from parity_kit.dtypes import parse_dtype  # noqa: E402
from parity_kit.models.wkv import random_wkv_inputs  # noqa: E402


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    for name in ("triton", "fla"):
        try:
            env[name] = __import__(name).__version__
        except Exception as e:  # a missing optional package is recorded, not fatal
            env[name] = f"unavailable: {type(e).__name__}"
    return env


def records(frame) -> list[dict]:
    """DataFrame rows as JSON-safe dicts (NaN -> None)."""
    out = []
    for row in frame.to_dict(orient="records"):
        out.append({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    return out


def kernel_times(source: tuple, lengths: list[int], dtypes: list[torch.dtype]) -> list[dict]:
    rows = []
    for seq in lengths:
        for dtype in dtypes:
            x = tuple(t[:, :seq].to(dtype).contiguous() for t in source)
            for mode in (*FLA_MODES, "chunk_low", "recurrent_fp32_state"):
                times = []
                for i in range(7):
                    run = run_mode(x, mode, chunk_size=64)
                    if i >= 2:
                        times.append(run.seconds)
                rows.append({"T": seq, "dtype": str(dtype).removeprefix("torch."), "mode": mode,
                             "median_seconds": statistics.median(times)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "parity_kit" / "data" / "stored" / "wkv_kernels_h200.json"))
    parser.add_argument("--lengths", default="256,512,1024,2048,4096")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    args = parser.parse_args()
    reason = fla_unavailable_reason()
    if reason is not None:
        sys.exit(f"wkv_kernels.py: {reason}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    lengths = [int(t) for t in args.lengths.split(",")]
    dtypes = args.dtypes.split(",")
    report: dict = {"command": " ".join(["python", *sys.argv]), "environment": environment(),
                    "setup": {"B": 1, "H": 16, "N": 64, "seed": 0, "chunk_size": 64,
                              "inputs": "parity_kit.models.wkv.random_wkv_inputs, prefixes of one sequence",
                              "fla_chunk_call": "chunk_rwkv7(..., scale=1.0, safe_gate=True, lower_bound=-e^-0.5, "
                                                "chunk_size=64)",
                              "fla_recurrent_call": "fused_recurrent_rwkv7(..., scale=1.0)"}}
    source = random_wkv_inputs(1, max(lengths), 16, 64, dtype=torch.float64, seed=0, device="cuda")
    started = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        # written after every step, so a run stopped at its time limit still leaves what it measured
        report["total_seconds"] = time.perf_counter() - started
        out.write_text(json.dumps(report, indent=1, allow_nan=False))

    def section(name: str, fn) -> None:
        print(f"[{name}] start", flush=True)
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:
            report.setdefault("failures", []).append({"section": name, "error": traceback.format_exc()})
            print(report["failures"][-1]["error"], file=sys.stderr, flush=True)
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
        save()

    summaries: list[dict] = []
    boundaries: list[dict] = []
    report["errors"] = {"summary": summaries, "boundaries_longest_T": boundaries}

    def errors_for(dtype: str) -> dict:
        warm = tuple(t[:, :lengths[0]].to(parse_dtype(dtype)) for t in source)
        for mode in FLA_MODES:  # the first call compiles (and autotunes) the Triton kernels: timed apart
            t0 = time.perf_counter()
            run_mode(warm, mode, chunk_size=64)
            report.setdefault("first_call_seconds", []).append(
                {"dtype": dtype, "mode": mode, "T": lengths[0], "seconds": time.perf_counter() - t0})
            print(json.dumps(report["first_call_seconds"][-1]), flush=True)
        for seq in lengths:
            t0 = time.perf_counter()
            prefix = tuple(t[:, :seq] for t in source)
            res = compare_prefill(prefix, dtypes=[dtype], modes=(*FLA_MODES, *OUR_MODES), chunk_size=64,
                                  per_token=False)
            summaries.extend(records(res.summary))
            if seq == max(lengths):
                boundaries.extend(records(res.boundaries))
            print(f"T={seq} {dtype}: {time.perf_counter() - t0:.1f} s", flush=True)
            print(res.summary[(res.summary["reference"] == "fp64")][
                ["mode", "tensor", "max_abs", "mean_abs", "rel_rms", "seconds"]].to_string(index=False), flush=True)
            save()
        return report["errors"]

    # fp16 last: its first chunk_rwkv7 call compiles and autotunes new Triton kernels, the slowest step here
    first, last = [d for d in dtypes if d != "fp16"], [d for d in dtypes if d == "fp16"]
    for dtype in first:
        section("errors", lambda dtype=dtype: errors_for(dtype))

    def decode() -> list[dict]:
        rows = []
        prefix = tuple(t[:, :1024] for t in source)
        for dtype in ("bf16",):
            for pre, dec in (("fla_chunk", "fla_fused_recurrent"), ("chunk_low", "recurrent_fp32_state")):
                rows += records(prefill_then_decode(prefix, 768, dtype=dtype, prefill_mode=pre, decode_mode=dec))
        return rows

    section("prefill_then_decode", decode)
    section("kernel_times", lambda: kernel_times(source, lengths, [torch.bfloat16]))

    def chunk_sizes() -> list[dict]:
        rows = []
        prefix = tuple(t[:, :1024] for t in source)
        for chunk in (16, 32, 64):
            res = compare_prefill(prefix, dtypes=["bf16"], modes=("fla_chunk", "fla_fused_recurrent", "chunk_low"),
                                  chunk_size=chunk, per_token=False)
            rows += records(res.summary)
        return rows

    for dtype in last:
        section("errors", lambda dtype=dtype: errors_for(dtype))
    section("chunk_size_sweep", chunk_sizes)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
