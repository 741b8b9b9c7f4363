"""Stats-mode reductions on the GPU: parity_kit's row-statistics kernel vs concatenation + torch.

The tensors are shaped like the module outputs of one forward of a 7B-shaped Llama at 512 tokens
(per layer ten [1, 512, 4096] and three [1, 512, 11008] outputs, 32 layers, and [1, 512, 32000]
logits; bf16; each its own allocation, as a model's outputs are). For each path: GPU time per call
(CUDA events, median of ``--repeats``), the rate in GB of tensors read per second, and the host time
to queue one call. ``kernel`` is the row statistics alone; ``kernel_totals`` adds each tensor's totals
and the per-row rms (``tensor_statistics_triton``, what ``StatsBatch`` runs on CUDA); ``torch_totals``
is what ``StatsBatch`` does without the kernels (``PARITY_KIT_KERNEL=0``): one concatenation and four
reductions per row width, then segment reductions for the totals.

    PYTHONPATH=. python benchmarks/row_stats_throughput.py --out $OUT/row_stats_throughput_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from parity_kit.capture.row_kernels import row_statistics_triton, tensor_statistics_triton
from parity_kit.capture.stats_batch import StatsBatch

RESULT = Path(__file__).resolve().parent / "results" / "row_stats_throughput_h200.json"


def _torch_path(tensors: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    by_width: dict[int, list[torch.Tensor]] = {}
    for t in tensors:
        by_width.setdefault(t.shape[-1], []).append(t.reshape(-1, t.shape[-1]))  # [rows, width]
    results = []
    for width, rows in by_width.items():
        packed = StatsBatch._reduce_rows(torch.cat(rows))  # [4, R]
        counts = [r.shape[0] for r in rows]
        results.append(StatsBatch._segment_totals(packed, counts, [width] * len(rows), True))
    return results


def _time(fn, tensors: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    """(median GPU ms, median host ms to queue) of ``fn(tensors)``."""
    for _ in range(3):
        fn(tensors)
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        fn(tensors)
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end))
    return statistics.median(gpu), statistics.median(host)


def _row_kernel_settings() -> dict[str, int]:
    from parity_kit.capture import row_kernels as kernels

    return {"elements_per_step": kernels._ROW_TILE, "warps": kernels._ROW_WARPS,
            "widest_column_block": kernels._ROW_BLOCK_MAX, "stages": kernels._ROW_STAGES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of reductions before timing")
    parser.add_argument("--sweep", action="store_true",
                        help="also time kernel_totals at each column block, tile size, warp count and pipelining depth of the row kernel")
    args = parser.parse_args()
    torch.manual_seed(0)
    widths = [4096] * 10 + [11008] * 3
    tensors = [torch.randn(1, args.tokens, w, device="cuda", dtype=torch.bfloat16) for _ in range(32) for w in widths]
    tensors.append(torch.randn(1, args.tokens, 32000, device="cuda", dtype=torch.bfloat16))
    gigabytes = sum(t.numel() * t.element_size() for t in tensors) / 1e9
    # a few seconds of work first: the first timings of a cold GPU ran up to 1.4x slower
    settle_until = time.perf_counter() + args.settle
    while time.perf_counter() < settle_until:
        tensor_statistics_triton(tensors)
    torch.cuda.synchronize()
    results = {}
    for name, fn in (("kernel", row_statistics_triton), ("kernel_totals", tensor_statistics_triton),
                     ("torch_totals", _torch_path)):
        gpu_ms, host_ms = _time(fn, tensors, args.repeats)
        results[name] = {"gpu_ms": round(gpu_ms, 3), "gb_per_s": round(gigabytes / (gpu_ms / 1e3), 1),
                         "host_ms_to_queue": round(host_ms, 3)}
        print(f"{name:13s} gpu {gpu_ms:7.3f} ms  {results[name]['gb_per_s']:7.1f} GB/s  host {host_ms:6.3f} ms",
              flush=True)
    sweep = []
    if args.sweep:  # every setting next to the defaults (kernels._ROW_TILE, kernels._ROW_WARPS, ...)
        from parity_kit.capture import row_kernels as kernels

        chosen = kernels._ROW_TILE, kernels._ROW_WARPS, kernels._ROW_BLOCK_MAX, kernels._ROW_STAGES
        for block in (128, 256, 512, 1024):
            for tile in (512, 1024, 2048, 4096):
                for warps in (2, 4, 8):
                    for stages in (1, 2, 3, 4):
                        if tile < block or (stages != 3 and (block, tile) not in ((128, 512), (256, 1024))):
                            continue  # pipelining depth only around the fastest shapes
                        kernels._ROW_TILE, kernels._ROW_WARPS, kernels._ROW_BLOCK_MAX = tile, warps, block
                        kernels._ROW_STAGES = stages
                        gpu_ms, _ = _time(tensor_statistics_triton, tensors, args.repeats)
                        sweep.append({"widest_block": block, "tile": tile, "warps": warps, "stages": stages,
                                      "gpu_ms": round(gpu_ms, 3)})
                        print(f"sweep: widest column block {block:4d}, tile {tile:5d}, {warps} warps, {stages} stages: "
                              f"gpu {gpu_ms:7.3f} ms", flush=True)
        kernels._ROW_TILE, kernels._ROW_WARPS, kernels._ROW_BLOCK_MAX, kernels._ROW_STAGES = chosen
    # the paths agree (fp32 accumulation in a different order: ~1e-6 relative)
    kernel = row_statistics_triton(tensors)
    reference = torch.cat([StatsBatch._reduce_rows(t.reshape(-1, t.shape[-1])) for t in tensors], dim=1)
    agree = bool(torch.allclose(kernel, reference.float(), rtol=1e-4, atol=1e-3))
    totals, row_rms, rows, widths = tensor_statistics_triton(tensors)
    expected_totals, expected_rms = StatsBatch._segment_totals(reference.float(), rows, widths, True)
    agree = agree and bool(torch.allclose(totals, expected_totals, rtol=1e-4)) and \
        bool(torch.allclose(row_rms, expected_rms, rtol=1e-4, atol=1e-6))
    out = {
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "tensors": len(tensors), "gigabytes": round(gigabytes, 3), "dtype": "bf16", "tokens": args.tokens,
        "repeats": args.repeats, "results": results, "kernels_match_torch": agree, "row_tile": _row_kernel_settings(),
        **({"sweep": sweep} if sweep else {}),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"kernels match torch: {agree}; wrote {args.out}")


if __name__ == "__main__":
    main()
