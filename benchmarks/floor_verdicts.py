"""Calibrated verdicts on healthy pairs and planted one-module faults (the acceptance of issue #23), on the CPU.

Healthy pairs: every built-in model and randomly initialised GPT-2, Llama, Qwen2 and Mistral configs from
transformers, each against itself in another dtype (fp32 → bf16, fp32 → fp16, fp64 → fp32, and bf16 → fp32 to
show that the verdict does not depend on which run is the reference). Planted faults (``parity_kit.testing``):
rms_norm_eps, a perturbed weight, swapped heads and a swapped activation in layer 1 of a tiny Llama, and a
GroupNorm computed in low precision in a GroupNorm MLP, each with the candidate in fp32 and in bf16. For each
case: the share of modules read "consistent with rounding", the run's verdict, the top culprits and, for a
fault, whether the planted module is among the top two and whether any module downstream reads "own error
above floor". Inputs: ``--tokens`` random token ids (seed 0).

    PYTHONPATH=. python benchmarks/floor_verdicts.py --out benchmarks/results/floor_verdicts_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

import parity_kit as pk
from parity_kit.analyses.calibration import compare_models
from parity_kit.analyses.runs import build_tiny_llama, random_input_ids
from parity_kit.comparison.floor import OWN
from parity_kit.dtypes import parse_dtype
from parity_kit.testing import LLAMA_FAULTS, groupnorm_mlp, plant_fault, plant_low_precision_groupnorm

PAIRS = [("fp32", "bf16"), ("fp32", "fp16"), ("fp64", "fp32"), ("bf16", "fp32")]


def transformers_model(kind: str) -> torch.nn.Module:
    import transformers as T

    torch.manual_seed(0)
    if kind == "gpt2":
        config = T.GPT2Config(vocab_size=512, n_embd=64, n_layer=4, n_head=4, n_positions=128,
                              bos_token_id=0, eos_token_id=1)
        return T.GPT2LMHeadModel(config).eval()
    classes = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
               "mistral": (T.MistralConfig, T.MistralForCausalLM)}
    config_class, model_class = classes[kind]
    config = config_class(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return model_class(config).eval()


def summary(result, planted: str | None = None) -> dict:
    verdict = result.verdict
    found = result.culprits()
    row = {"verdict": verdict["verdict"], "n_modules": verdict["n_modules"],
           "n_modules_consistent": verdict["n_modules_consistent"],
           "consistent_fraction": verdict["n_modules_consistent"] / max(verdict["n_modules"], 1),
           "culprits": [(m, round(float(r), 3), c) for m, r, c in
                        zip(found["module"][:3], found["own_floor_ratio"][:3], found["own_cause"][:3])],
           "precision_sensitive": verdict["precision_sensitive"],
           "max_free_floor_ratio": float(result.table["floor_ratio"].max()),
           "max_own_floor_ratio": float(result.table["own_floor_ratio"].max())}
    if planted is not None:
        table = result.table
        order = table.loc[table["module"] == planted, "order"].min()
        later = table[(table["order"] > order) & ~table["module"].map(lambda m: planted.startswith(m + "."))]
        row["planted"] = planted
        ranked = list(found["module"])
        row["planted_rank"] = ranked.index(planted) + 1 if planted in ranked else None
        row["planted_in_top2"] = planted in ranked[:2]
        row["downstream_own_above_floor"] = sorted(set(later.loc[later["diagnosis"] == OWN, "module"]))
    return row


def healthy_cases(tokens: int) -> list[dict]:
    rows = []
    for name in [*pk.models.BUILTINS, "gpt2", "llama", "qwen2", "mistral"]:
        model = (pk.models.load(name, dtype="fp32")[0] if name in pk.models.BUILTINS else transformers_model(name)).eval()
        ids = random_input_ids(model.config.vocab_size, tokens, 0)
        for ref_dtype, cand_dtype in PAIRS:
            ref = copy.deepcopy(model).to(parse_dtype(ref_dtype))
            cand = copy.deepcopy(model).to(parse_dtype(cand_dtype))
            start = time.perf_counter()
            result = compare_models(ref, cand, ids, show_progress=False)
            rows.append({"model": name, "ref_dtype": ref_dtype, "cand_dtype": cand_dtype,
                         "seconds": round(time.perf_counter() - start, 2), **summary(result)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def fault_cases(tokens: int) -> list[dict]:
    rows = []
    llama = build_tiny_llama(seed=0, layers=4)
    ids = random_input_ids(llama.config.vocab_size, tokens, 0)
    gn = groupnorm_mlp()
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(0))
    for cand_dtype in ("fp32", "bf16"):
        for fault in [*LLAMA_FAULTS, "groupnorm_low_precision"]:
            if fault == "groupnorm_low_precision":
                ref, inputs = gn, x
                cand = copy.deepcopy(gn)
                low = torch.bfloat16 if cand_dtype == "fp32" else None  # in an fp32 model: computed in bf16
                planted = plant_low_precision_groupnorm(cand, 5, low)
            else:
                ref, inputs = llama, ids
                cand = copy.deepcopy(llama)
                planted = plant_fault(cand, fault)
            cand = cand.to(parse_dtype(cand_dtype))
            result = compare_models(ref, cand, inputs, show_progress=False)
            rows.append({"fault": fault, "cand_dtype": cand_dtype, **summary(result, planted)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"tokens": args.tokens, "torch": torch.__version__, "python": platform.python_version(),
              "command": " ".join(sys.argv), "healthy": healthy_cases(args.tokens), "faults": fault_cases(args.tokens)}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
