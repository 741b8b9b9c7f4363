"""The execution floor of a 7B-shaped Llama on a GPU, and how much of a dtype difference lies inside it.

For each low precision (bf16 and fp16), a Llama-2-7B-shaped model (random weights, seed 0; the fp32 reference and
its copies in the low dtype) is measured with :func:`parity_kit.execution_floor` on one prompt: run-to-run (the
prompt alone, ``--repeats`` times), batch (first and last slot of batches of ``--batch-sizes``, left and right
padding) and kernel settings (TF32 and deterministic algorithms toggled). Then every module of the low-precision
model is compared with the fp32 reference on the same prompt (``pk.compare(..., execution_floor=...)``), and the
results file says, per pair:

- each source's floor over the modules (median and max of rel_rms);
- the verdict counts of the comparison judged against rounding and the execution floor together;
- the share of rows whose dtype difference (rel_rms vs fp32) lies inside the execution floor alone
  (``rel_rms <= 2 x`` the sum in quadrature of the sources), and inside each source alone.

The fp16-vs-fp32 table is also judged against the *bf16* floor (``fp16_table_against_bf16_floor``), the question
issue #21 asks: how much of an fp16 difference would a bf16 deployment's execution spread hide.

    PYTHONPATH=. python benchmarks/execution_floor_gpu.py --out $OUT/execution_floor_h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import parity_kit as pk
from parity_kit.comparison.execution import SOURCES, ExecutionFloor, apply_execution_floor
from parity_kit.dtypes import parse_dtype

TOLERANCE = 2.0  # the factor pk.compare judges with by default


def seven_b_reference(device: str, small: bool) -> torch.nn.Module:
    """The 7B shape, or with ``small`` a 2-layer model of the same layout (to check the script on a CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inner, layers, heads = (64, 128, 2, 4) if small else (4096, 11008, 32, 32)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).eval()


def low_copy(reference: torch.nn.Module, dtype: str) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    with torch.device(reference.device):
        model = LlamaForCausalLM(reference.config).to(parse_dtype(dtype)).eval()
    model.load_state_dict(reference.state_dict())
    return model


def recorded(model: torch.nn.Module, ids: torch.Tensor) -> pk.Recording:
    with torch.no_grad(), pk.record(model, "*", mode="tensors", device=ids.device, memory_budget="16GiB") as rec:
        model(input_ids=ids, use_cache=False)
    return rec


def floor_summary(floor: ExecutionFloor) -> dict[str, dict[str, float]]:
    summary = {}
    for source, values in floor.floors.items():
        numbers = sorted(v for v in values.values() if math.isfinite(v))
        summary[source] = {"rows": len(numbers), "median": numbers[len(numbers) // 2] if numbers else math.nan,
                           "max": numbers[-1] if numbers else math.nan,
                           "zero_rows": sum(1 for v in numbers if v == 0.0)}
    return summary


def judged(table, floor: ExecutionFloor) -> dict[str, object]:
    out = apply_execution_floor(table, floor, tolerance=TOLERANCE)
    ok = out[out["status"] == "ok"]
    inside = {"all_sources": float((ok["rel_rms"] <= TOLERANCE * ok["execution_floor"]).mean())}
    for source in SOURCES:
        column = f"{source}_floor"
        if column in ok:
            inside[source] = float((ok["rel_rms"] <= TOLERANCE * ok[column]).mean())
    classes = Counter(str(v).split(" ×")[0] for v in ok["verdict"])  # "above every floor ×N" counted as one class
    factor = ok["rel_rms"] / (ok["floor"] ** 2 + ok["execution_floor"].fillna(0) ** 2) ** 0.5  # the verdict's ×N
    above = factor[factor > TOLERANCE]
    return {"rows": len(ok), "verdicts": dict(classes.most_common()),
            "median_factor_above_every_floor": float(above.median()) if len(above) else None,
            "share_inside_execution_floor": inside,
            "median_rel_rms": float(ok["rel_rms"].median()), "median_rounding_floor": float(ok["floor"].median()),
            "median_execution_floor": float(ok["execution_floor"].median())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--small", action="store_true", help="a 2-layer model of the same layout (script check)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    reference = seven_b_reference(args.device, args.small)
    ids = torch.randint(3, 32000, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(args.device)
    ref_rec = recorded(reference, ids)
    results, floors, tables = {}, {}, {}
    for dtype in ("bf16", "fp16"):
        model = low_copy(reference, dtype)
        t0 = time.perf_counter()
        floors[dtype] = pk.execution_floor(model, ids, repeats=args.repeats, batch_sizes=args.batch_sizes,
                                           progress=False)
        floor_s = time.perf_counter() - t0
        tables[dtype] = pk.compare(ref_rec, recorded(model, ids))
        results[f"{dtype} vs fp32"] = {"floor_seconds": floor_s, "floor": floor_summary(floors[dtype]),
                                       "contexts": list(floors[dtype].contexts),
                                       "skipped": list(floors[dtype].skipped), **judged(tables[dtype], floors[dtype])}
        print(f"{dtype}: {json.dumps(results[f'{dtype} vs fp32'], default=str)}", file=sys.stderr)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    results["fp16_table_against_bf16_floor"] = judged(tables["fp16"], floors["bf16"])
    payload = {"command": "python " + " ".join(sys.argv), "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
               "torch": torch.__version__, "python": platform.python_version(),
               "model": "LlamaForCausalLM " + ("2-layer check" if args.small else "7B-shaped (32 layers, hidden 4096)")
               + ", random weights seed 0, " + reference.config._attn_implementation,
               "tokens": args.tokens, "repeats": args.repeats, "batch_sizes": args.batch_sizes,
               "tolerance": TOLERANCE, "seconds": time.perf_counter() - started, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(json.dumps(payload, indent=1, default=str))


if __name__ == "__main__":
    main()
