"""Divergence statistics batched vs one prompt at a time: generations per second, measured side by side.

For each model, ``pk.divergence_statistics`` runs the fp16-or-bf16 vs fp32 pair over the same prompts twice per
round, once with ``batch_size=1`` (every prompt decoded alone) and once with ``--batch-size``, in alternating
order over ``--rounds`` rounds; the figure is generations per second (prompts × runs decoded / wall time), the
speedup the median of the per-round ratios, with its range. The two tables are also compared: how many rows
agree on whether and where the pair diverges (batching changes the numerics a little, so a few may not).

CPU (2 cores), the built-in models, 16 prompts × 32 new tokens, low precision bf16 (fp16 matrix products are
slow on CPUs):

    python benchmarks/divergence_batching.py --out benchmarks/results/divergence_batching_cpu.json

CUDA: a 7B-shaped Llama (random weights, fp32 reference and fp16 candidate), 32 prompts × 128 tokens:

    PYTHONPATH=. python benchmarks/divergence_batching.py --device cuda --models llama-7b-shaped \\
        --prompts 32 --new-tokens 128 --low fp16 --batch-size 32 --rounds 2 --out $OUT/divergence_batching_h200.json
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
from parity_kit.analyses.divergence import ModelPair
from parity_kit.dtypes import parse_dtype


def _models(name: str, low: str, device: str) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    if name == "llama-7b-shaped":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
        with torch.device(device):
            torch.manual_seed(0)
            reference = LlamaForCausalLM(config).eval()
        with torch.device(device):  # built where it runs: a 7B init on the host takes minutes
            candidate = LlamaForCausalLM(config).to(dtype=parse_dtype(low)).eval()
        candidate.load_state_dict(reference.state_dict())
        return reference, candidate, None
    reference, tokenizer = pk.models.load(name, dtype="fp32", device=device)
    candidate, _ = pk.models.load(name, dtype=low, device=device)
    return reference.eval(), candidate.eval(), tokenizer


def _prompts(tokenizer: object, vocab: int, n: int) -> list[object]:
    if tokenizer is not None:
        from parity_kit.stories.fp16_divergence import load_prompts

        texts = load_prompts()
        return [texts[i % len(texts)] for i in range(n)]
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (int(8 + 4 * (i % 5)),), generator=generator).tolist() for i in range(n)]


def _timed(pair: ModelPair, prompts: list[object], tokenizer: object, new_tokens: int, batch_size: int,
           sync: bool) -> tuple[float, object]:
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    table = pk.divergence_statistics([pair], prompts, tokenizer, max_new_tokens=new_tokens, progress=False,
                                     stop_at_eos=False, batch_size=batch_size)
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - start, table


def measure(name: str, args: argparse.Namespace) -> dict[str, object]:
    reference, candidate, tokenizer = _models(name, args.low, args.device)
    prompts = _prompts(tokenizer, reference.config.vocab_size, args.prompts)
    pair = ModelPair(f"{args.low} vs fp32", reference, candidate, varies="dtype")
    generations = 2 * len(prompts)  # both sides decode every prompt
    _timed(pair, prompts[:2], tokenizer, 4, 2, args.device == "cuda")  # warm-up: kernels, allocator
    alone, batched, ratios = [], [], []
    tables = {}
    for round_index in range(args.rounds):
        order = (1, args.batch_size) if round_index % 2 == 0 else (args.batch_size, 1)
        times = {}
        for size in order:
            times[size], tables[size] = _timed(pair, prompts, tokenizer, args.new_tokens, size, args.device == "cuda")
        alone.append(times[1])
        batched.append(times[args.batch_size])
        ratios.append(times[1] / times[args.batch_size])
        print(f"{name} round {round_index}: alone {times[1]:.2f} s, batched {times[args.batch_size]:.2f} s",
              file=sys.stderr)
    one, many = tables[1], tables[args.batch_size]
    same = ((one["diverged"] == many["diverged"])
            & (one["first_divergent_step"].fillna(-1) == many["first_divergent_step"].fillna(-1)))
    return {"model": name, "pair": pair.name, "prompts": len(prompts), "new_tokens": args.new_tokens,
            "batch_size": args.batch_size, "rounds": args.rounds,
            "alone_generations_per_s": generations / statistics.median(alone),
            "batched_generations_per_s": generations / statistics.median(batched),
            "speedup_median": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "rows_with_same_divergence": int(same.sum()), "rows": len(one),
            "diverged_alone": int(one["diverged"].sum()), "diverged_batched": int(many["diverged"].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-internlm2", "tiny-internlm2-llama", "tiny-rwkv7"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--low", default="bf16")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = [measure(name, args) for name in args.models]
    payload = {"command": "python " + " ".join(sys.argv), "device": args.device,
               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
               "torch": torch.__version__, "python": platform.python_version(),
               "cpu_threads": torch.get_num_threads(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    for row in results:
        print(f"{row['model']}: {row['alone_generations_per_s']:.2f} -> {row['batched_generations_per_s']:.2f} "
              f"generations/s, x{row['speedup_median']:.2f} [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}]")


if __name__ == "__main__":
    main()
