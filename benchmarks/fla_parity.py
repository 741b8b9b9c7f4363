"""Parity of our RWKV-7 against the real flash-linear-attention 0.6.0 on a CUDA GPU.

1. Model: a tiny-rwkv7-shaped model (``parity_kit/data/models/tiny-rwkv7`` when it exists, else random weights)
   is loaded strictly into ``fla.models.RWKV7ForCausalLM``; fp32 logits of FLA's fused recurrent path
   (< 64 tokens, no grad) and of its chunk path (>= 64 tokens) are compared with ours.
2. Kernels: ``chunk_rwkv7`` and ``fused_recurrent_rwkv7`` (scale 1) against ``wkv_reference`` (fp64) on
   random model-like inputs, B=1, H=16, N=64, T ∈ {1024, 4096}, bf16 and fp32; errors of output and
   final state against fp64 on the *unrounded* fp64 inputs (total error) and on the rounded inputs
   (the kernel's own error). Our emulations (``wkv_chunk`` with bf16 intermediates, ``wkv_recurrent``)
   run on the same inputs for comparison.

Run (GPU box, FLA wheels installed):
    python benchmarks/fla_parity.py --out benchmarks/results/fla_rwkv7_parity.json
    python benchmarks/fla_parity.py --sections model --model-seq-lens 48 --out .../fla_rwkv7_parity_trained.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from parity_kit.models.wkv import random_wkv_inputs, wkv_chunk, wkv_recurrent, wkv_reference  # noqa: E402

DECAY_BOUND = -0.6065306597126334


def errors(ref: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    ref, x = ref.double(), x.double()
    diff = (x - ref).abs()
    return {
        "max_abs": diff.max().item(),
        "mean_abs": diff.mean().item(),
        "rel_rms": ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item(),
    }


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    for name in ("triton", "transformers", "fla"):
        try:
            env[name] = __import__(name).__version__
        except Exception as e:  # a missing optional package is recorded, not fatal
            env[name] = f"unavailable: {type(e).__name__}"
    return env


def build_models(seq_lens: tuple[int, ...], device: str) -> dict:
    from fla.models import RWKV7Config as FlaConfig
    from fla.models import RWKV7ForCausalLM as FlaModel

    from parity_kit.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM

    trained = ROOT / "parity_kit" / "data" / "models" / "tiny-rwkv7"
    if (trained / "config.json").exists():
        ours = RWKV7ForCausalLM.from_pretrained(trained, dtype=torch.float32)
        source = str(trained.relative_to(ROOT))
    else:
        torch.manual_seed(0)
        ours = RWKV7ForCausalLM(RWKV7Config(hidden_size=256, num_hidden_layers=4, head_dim=64, vocab_size=1024,
                                            decay_low_rank_dim=32, gate_low_rank_dim=64, a_low_rank_dim=32,
                                            v_low_rank_dim=32))
        # from-scratch init zeroes some projections; perturb so every path carries signal
        with torch.no_grad():
            for p in ours.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        source = "random init (hidden 256, 4 layers, head_dim 64), seed 0, perturbed by N(0, 0.05²)"
    ours = ours.to(device).eval()
    cfg = ours.config
    results: dict = {"weights": source}
    state_dict = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for fuse_norm in (True, False):
        fla_cfg = FlaConfig(
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers, head_dim=cfg.head_dim,
            decay_low_rank_dim=cfg.decay_low_rank_dim, gate_low_rank_dim=cfg.gate_low_rank_dim,
            a_low_rank_dim=cfg.a_low_rank_dim, v_low_rank_dim=cfg.v_low_rank_dim,
            intermediate_size=cfg.intermediate_size, norm_eps=cfg.norm_eps, norm_bias=cfg.norm_bias,
            norm_first=cfg.norm_first, vocab_size=cfg.vocab_size, tie_word_embeddings=False,
            fuse_norm=fuse_norm, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        )
        fla = FlaModel(fla_cfg).to(device=device, dtype=torch.float32).eval()
        fla.load_state_dict(state_dict, strict=True)
        for seq in seq_lens:
            ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=gen).to(device)
            path = "fused_recurrent (no grad, < 64 tokens)" if seq < 64 else "chunk_rwkv7 (>= 64 tokens)"
            with torch.no_grad():
                fla_logits = fla(ids, use_cache=False).logits.float()
                row = {"fla_path": path, "fuse_norm": fuse_norm, "seq_len": seq, "batch": 2}
                for mode in ("recurrent", "chunk", "fp64"):
                    ours.set_wkv_mode(mode, chunk_size=64)
                    logits = ours(ids, use_cache=False).logits
                    row[f"ours_{mode}_vs_fla"] = errors(logits, fla_logits)
                ours.set_wkv_mode("fp64")
                ref = ours.to(torch.float64)(ids, use_cache=False).logits
                ours.to(torch.float32)
                row["fla_vs_ours_full_fp64"] = errors(ref, fla_logits)
                ours.set_wkv_mode("recurrent")
                row["ours_recurrent_fp32_vs_ours_full_fp64"] = errors(ref, ours(ids, use_cache=False).logits)
            results.setdefault("runs", []).append(row)
    return results


def kernel_table(seq_lens: tuple[int, ...], dtypes: tuple[torch.dtype, ...], device: str) -> list[dict]:
    from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7

    rows = []
    for seq in seq_lens:
        exact = random_wkv_inputs(1, seq, 16, 64, dtype=torch.float64, seed=seq, device=device)
        ref_o, ref_s = wkv_reference(*exact)
        for dtype in dtypes:
            x = [t.to(dtype) for t in exact]
            rounded_o, rounded_s = wkv_reference(*x)
            candidates = {
                "fla chunk_rwkv7": lambda x=x: chunk_rwkv7(*x, scale=1.0, output_final_state=True, safe_gate=True,
                                                           lower_bound=DECAY_BOUND, chunk_size=64),
                "fla fused_recurrent_rwkv7": lambda x=x: fused_recurrent_rwkv7(*x, scale=1.0, output_final_state=True),
                "ours wkv_chunk (fp32 intermediates)": lambda x=x: wkv_chunk(*x, chunk_size=64),
                "ours wkv_chunk (intermediates in input dtype)": lambda x=x, d=dtype: wkv_chunk(
                    *x, chunk_size=64, intermediate_dtype=d),
                "ours wkv_recurrent (fp32 state)": lambda x=x: wkv_recurrent(*x),
                "ours wkv_recurrent (state in input dtype)": lambda x=x: wkv_recurrent(*x, state_dtype=None),
            }
            for name, fn in candidates.items():
                row = {"impl": name, "T": seq, "B": 1, "H": 16, "N": 64, "dtype": str(dtype).removeprefix("torch.")}
                try:
                    torch.cuda.synchronize() if device == "cuda" else None
                    start = time.perf_counter()
                    o, s = fn()
                    torch.cuda.synchronize() if device == "cuda" else None
                    row["seconds"] = time.perf_counter() - start
                    row["output_vs_fp64_unrounded_inputs"] = errors(ref_o, o)
                    row["state_vs_fp64_unrounded_inputs"] = errors(ref_s, s)
                    row["output_vs_fp64_rounded_inputs"] = errors(rounded_o, o)
                    row["state_vs_fp64_rounded_inputs"] = errors(rounded_s, s)
                    row["output_dtype"], row["state_dtype"] = str(o.dtype), str(s.dtype)
                except Exception as e:  # one failing kernel must not hide the others
                    row["error"] = f"{type(e).__name__}: {e}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fla_rwkv7_parity.json"))
    parser.add_argument("--seq-lens", default="1024,4096")
    parser.add_argument("--model-seq-lens", default="48,256")
    parser.add_argument("--sections", default="model,kernels", help="which parts to run: model, kernels or both")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if not torch.cuda.is_available():
        sys.exit("fla_parity.py needs a CUDA GPU (FLA's kernels are Triton)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "environment": environment()}
    for key, fn in (("model", lambda: build_models(tuple(int(s) for s in args.model_seq_lens.split(",")), "cuda")),
                    ("kernels", lambda: kernel_table(tuple(int(s) for s in args.seq_lens.split(",")),
                                                     (torch.bfloat16, torch.float32), "cuda"))):
        if key not in sections:
            continue
        try:
            report[key] = fn()
        except Exception:
            report[key] = {"error": traceback.format_exc()}
            print(report[key]["error"], file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report.get("model"), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
