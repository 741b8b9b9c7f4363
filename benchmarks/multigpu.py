"""A model larger than one GPU: capture and compare on a random bf16 Llama split over the visible GPUs.

The model (default: 88 layers, hidden 8192, intermediate 28672, 64 heads, 8 key/value heads, vocab
32000: about 76 B parameters, 152 GB in bf16, more than one H200's 141 GB) is built on the meta
device, split by accelerate's ``infer_auto_device_map`` under ``--max-memory`` per GPU, filled with
random weights in place on each GPU (``parity_kit.testing.random_dispatched``) and run through
accelerate's hooks. Measured at batch 1 × ``--tokens``: plain forward, stats capture of every module,
tensors of every module gathered on cuda:0 and copied to CPU; each the median of ``--repeats``
host-timed runs (all GPUs synchronised) after a warm-up. Then a comparison: the decoder-layer
outputs are recorded on cuda:0, one layer's down projection is perturbed in place (relative noise
``--noise``), recorded again and compared on cuda:0; the first divergent layer must be the perturbed one.

    PYTHONPATH=. python benchmarks/multigpu.py --out $OUT/multigpu_h200x2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import parity_kit as pk
from parity_kit.testing import random_dispatched


def _sync() -> None:
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)


def _time(fn, repeats: int) -> tuple[float, list[float]]:
    fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=88)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-memory", default="76GiB")
    parser.add_argument("--perturb-layer", type=int, default=40)
    parser.add_argument("--noise", type=float, default=1e-2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "multigpu_h200x2.json")
    args = parser.parse_args()
    import accelerate
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(8)
    config = LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=args.layers,
                         num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096)
    start = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    gpus = torch.cuda.device_count()
    model, device_map = random_dispatched(model, {i: args.max_memory for i in range(gpus)}, dtype="bf16",
                                          no_split_module_classes=["LlamaDecoderLayer"])
    build_s = time.perf_counter() - start
    per_gpu = {str(d): torch.cuda.memory_allocated(d) / 2**30 for d in range(gpus)}
    print(f"{n_params/1e9:.1f} B parameters on {gpus} GPUs, weights GiB per GPU {per_gpu}, built in {build_s:.1f} s",
          flush=True)
    ids = torch.randint(0, config.vocab_size, (1, args.tokens), device="cuda:0")
    sizes: dict[str, int] = {}
    figures: dict[str, dict] = {}

    def plain() -> None:
        model(ids)

    def stats() -> None:
        with pk.record(model, "*", mode="stats") as rec:
            model(ids)
        sizes["stats_calls"] = len(rec)

    def tensors(device: str):
        def run() -> None:
            with pk.record(model, "*", device=device, memory_budget=None) as rec:
                model(ids)
            sizes[f"tensors_{device}"] = rec.nbytes()
        return run

    with torch.no_grad():
        for name, fn in {"plain": plain, "stats": stats, "tensors_cuda0": tensors("cuda:0"),
                         "tensors_cpu": tensors("cpu")}.items():
            median, times = _time(fn, args.repeats)
            figures[name] = {"seconds_median": median, "seconds_all": times}
            print(f"{name:14s} {median*1e3:9.1f} ms", flush=True)
        for name in figures:
            figures[name]["ratio_to_plain"] = figures[name]["seconds_median"] / figures["plain"]["seconds_median"]

        with pk.record(model, "re:model\\.layers\\.\\d+", device="cuda:0", memory_budget=None) as ref:
            model(ids)
        weight = model.model.layers[args.perturb_layer].mlp.down_proj.weight
        original = weight.detach().clone()
        weight.add_(args.noise * weight.std() * torch.randn_like(weight))
        with pk.record(model, "re:model\\.layers\\.\\d+", device="cuda:0", memory_budget=None) as cand:
            model(ids)
        weight.copy_(original)
        _sync()
        t0 = time.perf_counter()
        table = pk.compare(ref, cand, device="cuda:0")
        _sync()
        compare_s = time.perf_counter() - t0
    first = pk.first_divergence(table, metric="rel_rms", threshold=1e-6)
    before = table[table["order"] < args.perturb_layer]
    out = {
        "command": " ".join(["python", *sys.argv]),
        "device": [torch.cuda.get_device_name(d) for d in range(gpus)],
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                     "parity_kit": pk.__version__},
        "model": {"class": "LlamaForCausalLM", "layers": args.layers, "hidden": 8192, "intermediate": 28672,
                  "heads": 64, "kv_heads": 8, "vocab": 32000, "dtype": "bf16", "parameters": n_params,
                  "weight_bytes": 2 * n_params, "max_memory_per_gpu": args.max_memory,
                  "weights_gib_per_gpu": per_gpu,
                  "layers_per_gpu": {str(d): sum(1 for k, v in device_map.items() if v == d and ".layers." in f".{k}.")
                                     for d in range(gpus)},
                  "build_seconds": build_s},
        "tokens": args.tokens,
        "hooked_modules": len(pk.select_modules(model, "*")),
        "capture": figures,
        "bytes_captured_per_pass": sizes,
        "compare": {"what": f"decoder-layer outputs, model vs the same model with layer {args.perturb_layer}'s "
                            f"mlp.down_proj weight perturbed by relative noise {args.noise}, gathered and compared on cuda:0",
                    "rows": len(table), "bytes_both_recordings": ref.nbytes() + cand.nbytes(),
                    "seconds": compare_s,
                    "first_divergence_module": None if first is None else first["module"],
                    "first_divergence_rel_rms": None if first is None else float(first["rel_rms"]),
                    "max_rel_rms_before_perturbed_layer": float(before["rel_rms"].max()) if len(before) else None,
                    "last_layer_rel_rms": float(table["rel_rms"].iloc[-1])},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["compare"], indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
