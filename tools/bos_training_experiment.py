"""Story 04 investigation: does where BOS sits in the training rows make tiny-rwkv7 depend on it?

Trains tiny-rwkv7 twice from the same seed for the same (reduced) number of steps, once with BOS at the start
of every packed document (the built-in recipe) and once with BOS only at position 0 of every training sequence
(documents inside a row separated by EOS), then scores data/eval/lastword.jsonl with and without BOS on each
and compares the two runs document by document (paired z of per-document log-likelihoods, lm-eval's
standard error of the with-BOS perplexity). Writes a JSON of the figures with the command that produced it.

    python tools/bos_training_experiment.py --steps 400 --out /tmp/bos_experiment
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import parity_kit as pk  # noqa: E402
from parity_kit._util.atomic import atomic_write  # noqa: E402
from parity_kit._util.paths import data_dir  # noqa: E402
from parity_kit.analyses.paired import paired_comparison  # noqa: E402
from parity_kit.builtins.train import BOS_PLACEMENTS, train  # noqa: E402


def score(folder: Path, n_bootstrap: int) -> dict:
    model, tokenizer = pk.models.load(str(folder), dtype="fp32")
    path = data_dir() / "eval" / "lastword.jsonl"
    runs = {flag: pk.evaluate_lastword(model, tokenizer, path, prepend_bos=flag, progress=False,
                                       n_bootstrap=n_bootstrap, label=f"bos={flag}") for flag in (True, False)}
    paired = paired_comparison(runs[True], runs[False], n_bootstrap=n_bootstrap)
    with_bos, without = runs[True], runs[False]
    return {"ppl_with_bos": with_bos.ppl, "ppl_with_bos_stderr": with_bos.ppl_stderr, "acc_with_bos": with_bos.acc,
            "ppl_without_bos": without.ppl, "acc_without_bos": without.acc,
            "gap_in_with_bos_stderrs": (without.ppl - with_bos.ppl) / with_bos.ppl_stderr,
            "paired_z": float(paired["z"]), "n": with_bos.n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for the trained models and results.json")
    parser.add_argument("--n-bootstrap", type=int, default=10_000)
    args = parser.parse_args()
    results = {"command": "python " + " ".join(sys.argv), "steps": args.steps, "seed": args.seed, "runs": {}}
    for bos in BOS_PLACEMENTS:
        started = time.perf_counter()
        folder = train("tiny-rwkv7", seed=args.seed, out_dir=args.out / f"bos-{bos}", steps=args.steps,
                       progress=False, bos=bos)
        record = json.loads((folder / "training.json").read_text())
        results["runs"][bos] = {"final_loss": record["final_loss"], "train_s": time.perf_counter() - started,
                                **score(folder, args.n_bootstrap)}
        print(bos, json.dumps(results["runs"][bos]), flush=True)
    results["torch_threads"] = torch.get_num_threads()
    with atomic_write(args.out / "results.json") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
