"""Reproducible training of the built-in tiny checkpoints (``parity-kit train NAME``).

The built-in configurations and training settings live here (:data:`SPECS`). Training runs on the CPU (the
default) or on a CUDA GPU (``device="cuda"``, for bigger models or longer runs than 2 cores allow); it is
deterministic from the seed on a given machine and thread count (on a GPU, up to its kernels' reduction order): the corpus and tokenizer come from
:mod:`parity_kit.builtins.corpus`, the weights from ``torch.manual_seed(seed)``, the data order from the corpus
stream. Every sequence starts with the BOS token of a document, and documents are packed one after
another (each with its own BOS) up to the sequence length.

After training, the model is evaluated on ``parity_kit/data/eval/lastword.jsonl`` with :func:`evaluate`, with
and without BOS, and everything is written to the
model folder: ``model.safetensors`` (fp32), ``config.json``, tokenizer files, ``training.json`` (settings,
loss curve, evaluation, wall time) and ``loss.png``. Training ``tiny-internlm2`` also produces
``tiny-internlm2-llama`` with the project's converter.

>>> sorted(SPECS)
['tiny-internlm2', 'tiny-rwkv7']
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .corpus import BOS_ID, EOS, SPECIAL_TOKENS, iter_training_documents, read_lastword_items, training_documents
from .data import TOKENIZER_DOCS
from .tokenizer import save_tokenizer, train_tokenizer
from ..errors import ParityKitError
from .._util.atomic import atomic_write, replace_folder
from .._util.paths import data_dir

LLAMA_NAME = "tiny-internlm2-llama"
EOS_ID = SPECIAL_TOKENS.index(EOS)
EVAL_FILE = "eval/lastword.jsonl"


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of one built-in model (AdamW, linear warm-up, cosine decay to ``min_lr_ratio``)."""

    steps: int
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    threads: int = 2


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model: its architecture, config fields, tokenizer flavour and training settings."""

    model_type: str  # "internlm2" | "rwkv7"
    config: dict[str, Any]
    tokenizer_adds_bos: bool
    settings: TrainSettings


_SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}

SPECS: dict[str, ModelSpec] = {
    "tiny-internlm2": ModelSpec(
        model_type="internlm2",
        config={
            "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 352, "max_position_embeddings": 1024, "rope_theta": 10000.0,
            "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bias": False, "rms_norm_eps": 1e-6,
            "attn_implementation": "eager", "tie_word_embeddings": False, **_SPECIAL_IDS,
        },
        tokenizer_adds_bos=True,
        settings=TrainSettings(steps=420, batch_size=8, lr=3e-3, warmup_steps=20),
    ),
    "tiny-rwkv7": ModelSpec(
        model_type="rwkv7",
        config={
            # FLA's low-rank defaults (decay 64, a 64, v 16-32, gate 128 at hidden 768-2048) scaled down.
            "hidden_size": 256, "num_hidden_layers": 4, "head_dim": 64, "intermediate_size": 1024,
            "decay_low_rank_dim": 32, "a_low_rank_dim": 32, "v_low_rank_dim": 16, "gate_low_rank_dim": 64,
            "norm_eps": 1e-5, "tie_word_embeddings": False, "wkv_mode": "chunk", "chunk_size": 64,
            **_SPECIAL_IDS,
        },
        tokenizer_adds_bos=False,
        settings=TrainSettings(steps=800, batch_size=8, lr=3e-3, warmup_steps=40),
    ),
}


# ---------------------------------------------------------------------------------------------
# building blocks


def build_tokenizer(seed: int = 0):
    """The shared byte-level BPE of the built-in models, trained on the corpus of ``seed``.

    >>> build_tokenizer(0).token_to_id("<pad>")
    2
    """
    return train_tokenizer(training_documents(TOKENIZER_DOCS, seed))


def build_model(name: str, vocab_size: int) -> torch.nn.Module:
    """A freshly initialised built-in model (call ``torch.manual_seed`` first for reproducible weights).

    >>> m = build_model("tiny-internlm2", vocab_size=64)
    >>> type(m).__name__
    'InternLM2ForCausalLM'
    """
    spec = _spec(name)
    kwargs = {**spec.config, "vocab_size": vocab_size}
    if spec.model_type == "internlm2":
        from ..models.internlm2 import InternLM2Config, InternLM2ForCausalLM

        return InternLM2ForCausalLM(InternLM2Config(**kwargs))
    from ..models.rwkv7 import RWKV7Config, RWKV7ForCausalLM

    return RWKV7ForCausalLM(RWKV7Config(**kwargs))


#: Where BOS goes in the packed training rows: "document" (every document starts with BOS, several per row) or
#: "sequence" (BOS at position 0 of every row only, the documents inside a row separated by EOS: the model sees
#: BOS only as the first token of a sequence, as models trained on fixed windows with a BOS prefix do).
BOS_PLACEMENTS = ("document", "sequence")


def packed_batches(tokenizer, seed: int, batch_size: int, seq_len: int,
                   bos: str = "document") -> Iterator[torch.Tensor]:
    """Endless ``[batch_size, seq_len + 1]`` batches; each row starts at a document's BOS and packs
    whole BOS-started documents until it is full (the tail of the last one is cut off and dropped).
    With ``bos="sequence"`` only position 0 holds BOS and documents after the first follow an EOS.

    >>> row = next(packed_batches(build_tokenizer(0), 0, 2, 16))
    >>> row.shape, int(row[0, 0])
    (torch.Size([2, 17]), 0)
    >>> rows = next(packed_batches(build_tokenizer(0), 0, 4, 256, bos="sequence"))
    >>> int((rows == BOS_ID).sum()), bool((rows[:, 0] == BOS_ID).all())
    (4, True)
    """
    if bos not in BOS_PLACEMENTS:
        raise ParityKitError(f"bos={bos!r}: use one of {list(BOS_PLACEMENTS)}")
    docs = iter_training_documents(seed)
    width = seq_len + 1

    def rows() -> Iterator[list[int]]:
        current: list[int] = []
        while True:
            texts = [next(docs) for _ in range(256)]
            for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
                current += [BOS_ID if bos == "document" or not current else EOS_ID, *enc.ids]
                if len(current) >= width:
                    yield current[:width]
                    current = []

    it = rows()
    while True:
        yield torch.tensor([next(it) for _ in range(batch_size)], dtype=torch.long)


def lr_at(step: int, s: TrainSettings) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then cosine decay to ``lr * min_lr_ratio``.

    >>> s = TrainSettings(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    >>> lr_at(0, s), round(lr_at(99, s), 3)
    (0.1, 0.1)
    """
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - 1 - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _optimizer(model: torch.nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    # no weight decay on vectors (norms, biases, lerp coefficients): decaying them only hurts
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, eps=1e-8)


def _spec(name: str) -> ModelSpec:
    if name == LLAMA_NAME:
        raise ParityKitError(f"{LLAMA_NAME!r} is not trained but converted: run `parity-kit train tiny-internlm2`, "
                             "which trains tiny-internlm2 and converts it")
    if name not in SPECS:
        raise ParityKitError(f"no built-in training recipe for {name!r}; choose one of {', '.join(SPECS)}")
    return SPECS[name]


def _publish(tmp: Path, target: Path) -> None:
    """Swap a finished model folder into place, readable by everyone (TemporaryDirectory makes it private)."""
    tmp.chmod(0o755)
    replace_folder(tmp, target)


def _loss_curve(losses: list[float], points: int = 100) -> list[list[float]]:
    """``[[step, mean loss over the steps up to it], ...]`` with about ``points`` entries (1-based steps)."""
    every = max(1, len(losses) // points)
    curve = []
    for end in range(every, len(losses) + 1, every):
        window = losses[end - every:end]
        curve.append([end, sum(window) / len(window)])
    if curve and curve[-1][0] != len(losses):
        window = losses[curve[-1][0]:]
        curve.append([len(losses), sum(window) / len(window)])
    return curve


def _loss_figure(curve: list[list[float]], title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3.0), dpi=100)
    ax = fig.add_subplot()
    ax.plot([p[0] for p in curve], [p[1] for p in curve], color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# evaluation


def evaluate(model: torch.nn.Module, tokenizer, items: list[dict[str, str]] | None = None, *,
             n_bootstrap: int = 10_000, batch_size: int = 32) -> dict[str, Any]:
    """Held-out last-word accuracy and perplexity with and without BOS (``parity_kit/data/eval/lastword.jsonl`` by default).

    Returns ``{"with_bos": {...}, "without_bos": {...}}``; each holds ``n, acc, acc_stderr, ppl,
    ppl_stderr`` and ``correct`` (one "0"/"1" character per item, so a subset can be re-checked).
    Same statistics as :func:`parity_kit.analyses.evaluation.evaluate_lastword` (lm-eval conventions), but every
    model, recurrent ones included, is scored in right-padded batches: padding after the last scored
    token cannot change a causal model's scores, and one forward per document made RWKV-7's chunked
    evaluation too slow for a 2-core CPU.

    >>> from parity_kit.models import load
    >>> model, tok = load("tiny-internlm2")
    >>> evaluate(model, tok, read_lastword_items()[:20], n_bootstrap=100)["with_bos"]["n"]
    20
    """
    from ..analyses.statistics import mean_stderr, perplexity_bootstrap_stderr

    items = read_lastword_items() if items is None else items
    contexts = [tokenizer(it["context"], add_special_tokens=False).input_ids for it in items]
    targets = [tokenizer(it["target"], add_special_tokens=False).input_ids for it in items]
    device = next(model.parameters()).device
    out: dict[str, Any] = {}
    for key, prefix in (("with_bos", [BOS_ID]), ("without_bos", [])):
        seqs = [prefix + c + t for c, t in zip(contexts, targets)]
        ll, correct = [], []
        with torch.inference_mode():
            for start in range(0, len(seqs), batch_size):
                chunk = seqs[start:start + batch_size]
                ids = torch.full((len(chunk), max(map(len, chunk))), tokenizer.pad_token_id, dtype=torch.long)
                for row, seq in enumerate(chunk):
                    ids[row, :len(seq)] = torch.tensor(seq)
                logprobs = torch.log_softmax(model(input_ids=ids.to(device)).logits.float(), dim=-1).cpu()
                for row, seq in enumerate(chunk):
                    n_t = len(targets[start + row])
                    # position p predicts token p + 1
                    rows = logprobs[row, len(seq) - n_t - 1:len(seq) - 1]  # [n_t, V]
                    tgt = torch.tensor(seq[-n_t:])
                    ll.append(float(rows.gather(-1, tgt[:, None]).sum()))
                    correct.append(int(bool((rows.argmax(-1) == tgt).all())))
        mean_ll = sum(ll) / len(ll)
        out[key] = {"n": len(ll), "acc": sum(correct) / len(correct), "acc_stderr": mean_stderr(correct),
                    "ppl": math.exp(-mean_ll), "ppl_stderr": perplexity_bootstrap_stderr(ll, n_bootstrap),
                    "correct": "".join(map(str, correct))}
    return out


# ---------------------------------------------------------------------------------------------
# training


def fit(name: str, settings: TrainSettings, *, seed: int = 0, bos: str = "document", device: str | torch.device = "cpu",
        progress: bool = True) -> tuple[torch.nn.Module, Any, list[float], float]:
    """Train built-in model ``name`` with ``settings`` and return ``(model, tokenizer, losses, wall_s)``: the model
    in eval mode on the CPU, the per-step training losses and the training loop's wall time. Nothing is written;
    :func:`train` adds saving, evaluation and the loss figure. Sets torch's CPU threads to ``settings.threads``.

    >>> model, tok, losses, _ = fit("tiny-internlm2", TrainSettings(steps=2, batch_size=2, seq_len=16), progress=False)
    >>> len(losses), model.training
    (2, False)
    """
    from tqdm.auto import tqdm

    run_on = _training_device(str(device))
    torch.set_num_threads(settings.threads)
    tokenizer = build_tokenizer(seed)
    torch.manual_seed(seed)
    model = build_model(name, tokenizer.get_vocab_size()).to(run_on)
    model.train()
    optimizer = _optimizer(model, settings)
    batches = packed_batches(tokenizer, seed, settings.batch_size, settings.seq_len, bos)
    step_losses: list[torch.Tensor] = []
    started = time.perf_counter()
    bar = tqdm(range(settings.steps), desc=f"train {name}", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings)
        batch = next(batches).to(run_on)
        logits = model(input_ids=batch[:, :-1]).logits  # [B, T, V]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        step_losses.append(loss.detach())  # read back every 10 steps: a GPU then runs ahead of the host
        if step % 10 == 0:
            bar.set_postfix(loss=f"{step_losses[-1].item():.3f}")
    losses = torch.stack(step_losses).tolist()
    wall = time.perf_counter() - started
    return model.eval().to("cpu"), tokenizer, losses, wall


def train(name: str, *, seed: int = 0, out_dir: Path | None = None, steps: int | None = None,
          eval_limit: int | None = None, progress: bool = True, bos: str = "document", device: str = "cpu",
          batch_size: int | None = None) -> Path:
    """Train built-in model ``name`` from ``seed`` and save it to ``out_dir`` (default
    ``parity_kit/data/models/<name>``).

    ``steps`` overrides the recipe's step count (for quick tests; the cosine schedule is stretched to it),
    ``eval_limit`` evaluates on the first items of the eval file only; ``bos`` places BOS in the training
    rows (:data:`BOS_PLACEMENTS`); ``device`` is where the training steps run ("cpu" or "cuda[:N]"; the
    evaluation afterwards always runs on the CPU, as the notebooks do); ``batch_size`` overrides the recipe's
    sequences per step (a GPU has room for more).
    Training ``tiny-internlm2`` also writes ``tiny-internlm2-llama`` next to it (folder ``<out_dir>-llama``
    when ``out_dir`` is given). At the default location, ``parity_kit/data/models/README.md`` is rewritten.
    Returns the model folder.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "m"
    >>> folder = train("tiny-rwkv7", steps=2, out_dir=out, eval_limit=8, progress=False)
    >>> sorted(p.name for p in folder.iterdir())[:3]
    ['config.json', 'generation_config.json', 'loss.png']
    """
    spec = _spec(name)
    settings = spec.settings if steps is None else replace(spec.settings, steps=steps,
                                                           warmup_steps=min(spec.settings.warmup_steps, steps))
    if batch_size is not None:
        settings = replace(settings, batch_size=batch_size)
    if settings.steps < 1:
        raise ParityKitError(f"steps={settings.steps}; use 1 or more")
    if settings.batch_size < 1:
        raise ParityKitError(f"batch_size={settings.batch_size}; use 1 or more")
    run_on = _training_device(device)
    default_location = out_dir is None
    target = data_dir() / "models" / name if out_dir is None else Path(out_dir)

    threads_before = torch.get_num_threads()
    try:
        model, tokenizer, losses, wall = fit(name, settings, seed=seed, bos=bos, device=run_on, progress=progress)

        with tempfile.TemporaryDirectory(dir=_existing_parent(target)) as tmp_root:
            tmp = Path(tmp_root) / name
            model.save_pretrained(tmp, safe_serialization=True)
            save_tokenizer(tokenizer, tmp, add_bos=spec.tokenizer_adds_bos)
            curve = _loss_curve(losses)
            record = {
                "name": name, "seed": seed, "model_type": spec.model_type,
                "config": {**spec.config, "vocab_size": tokenizer.get_vocab_size()},
                "n_params": _param_count(model),
                "settings": asdict(settings),
                "tokens_seen": settings.steps * settings.batch_size * settings.seq_len,
                "bos_placement": bos,
                "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                "loss_curve": curve,
                "wall_time_s": wall,
                "command": _train_command(name, seed, bos, run_on, steps, batch_size),
                "environment": {"torch": torch.__version__, "python": platform.python_version(),
                                "machine": platform.machine(), "threads": settings.threads,
                                "device": str(run_on), "device_name": _device_name(run_on)},
            }
            _write_record(tmp, record)
            evaluate_checkpoint(tmp, eval_limit=eval_limit)
            _loss_figure(curve, f"{name}: training loss").savefig(tmp / "loss.png")
            _publish(tmp, target)

        if name == "tiny-internlm2":
            llama_target = target.with_name(LLAMA_NAME if default_location else f"{target.name}-llama")
            convert_to_llama(target, llama_target, eval_limit=eval_limit)
    finally:
        torch.set_num_threads(threads_before)
    if default_location:
        write_models_readme(target.parent)
    return target


def _training_device(device: str) -> torch.device:
    try:
        run_on = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ParityKitError(f"device={device!r} is not a torch device; use 'cpu' or 'cuda'") from exc
    if run_on.type == "cuda" and not torch.cuda.is_available():
        raise ParityKitError(f"device={device!r} but this machine has no CUDA GPU torch can use; "
                             "train with device='cpu' (the default)")
    if run_on.type not in ("cpu", "cuda"):
        raise ParityKitError(f"device={device!r}: training runs on 'cpu' or 'cuda'")
    return run_on


def _device_name(run_on: torch.device) -> str:
    return torch.cuda.get_device_name(run_on) if run_on.type == "cuda" else platform.processor() or "cpu"


def _train_command(name: str, seed: int, bos: str, run_on: torch.device, steps: int | None,
                   batch_size: int | None) -> str:
    parts = [f"parity-kit train {name} --seed {seed}"]
    if bos != "document":
        parts.append(f"--bos {bos}")
    if run_on.type != "cpu":
        parts.append(f"--device {run_on}")
    if steps is not None:
        parts.append(f"--steps {steps}")
    if batch_size is not None:
        parts.append(f"--batch-size {batch_size}")
    return " ".join(parts)


def _existing_parent(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent


def _write_record(folder: Path, record: dict[str, Any]) -> None:
    with atomic_write(folder / "training.json") as f:
        f.write(json.dumps(record, indent=1) + "\n")


def evaluate_checkpoint(folder: str | os.PathLike[str], *, eval_limit: int | None = None) -> dict[str, Any]:
    """Evaluate the model in ``folder`` with :func:`evaluate` and store the result in its ``training.json``.

    >>> evaluate_checkpoint(data_dir() / "models" / "tiny-rwkv7")["with_bos"]["n"]  # doctest: +SKIP
    600
    """
    from ..models import load

    folder = Path(folder)
    record_file = folder / "training.json"
    if not record_file.is_file():
        raise ParityKitError(f"{folder} has no training.json; it was not written by parity_kit.builtins.train")
    model, tokenizer = load(str(folder))
    evaluation = evaluate(model, tokenizer, read_lastword_items()[:eval_limit])
    record = json.loads(record_file.read_text())
    record["eval"] = evaluation
    record["eval_file"] = EVAL_FILE
    record["eval_command"] = (f"python -c \"from parity_kit.builtins.train import evaluate_checkpoint; "
                              f"evaluate_checkpoint('parity_kit/data/models/{record['name']}')\" (the training command runs it too)")
    _write_record(folder, record)
    return evaluation


def convert_to_llama(src: Path, dst: Path, *, eval_limit: int | None = None) -> Path:
    """Convert a trained tiny-internlm2 folder to the Llama layout, add the Llama-flavour tokenizer,
    evaluate it and write its ``training.json``.

    >>> convert_to_llama(data_dir() / "models" / "tiny-internlm2", Path(tempfile.mkdtemp()) / "l").name  # doctest: +SKIP
    'l'
    """
    from ..models import load
    from ..models.convert import convert_internlm2_to_llama

    src, dst = Path(src), Path(dst)
    source_record = json.loads((src / "training.json").read_text())
    with tempfile.TemporaryDirectory(dir=_existing_parent(dst)) as tmp_root:
        tmp = Path(tmp_root) / dst.name
        convert_internlm2_to_llama(src, tmp, overwrite=True)
        from tokenizers import Tokenizer

        save_tokenizer(Tokenizer.from_file(str(src / "tokenizer.json")), tmp, add_bos=True)
        model, _ = load(str(tmp))
        record = {
            "name": LLAMA_NAME, "converted_from": source_record["name"], "seed": source_record["seed"],
            "model_type": model.config.model_type, "n_params": _param_count(model),
            "final_loss": source_record["final_loss"], "loss_curve": source_record["loss_curve"],
            "wall_time_s": source_record["wall_time_s"],
            "command": f"{source_record['command']}  (trains tiny-internlm2, then converts it)",
            "environment": source_record["environment"],
        }
        _write_record(tmp, record)
        evaluate_checkpoint(tmp, eval_limit=eval_limit)
        shutil.copyfile(src / "loss.png", tmp / "loss.png")
        _publish(tmp, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# parity_kit/data/models/README.md


def write_models_readme(models_dir: Path | None = None) -> Path:
    """Write ``README.md`` in ``models_dir`` (default ``parity_kit/data/models``) from the ``training.json`` files there.

    >>> write_models_readme().name  # doctest: +SKIP
    'README.md'
    """
    models_dir = data_dir() / "models" if models_dir is None else Path(models_dir)
    records = []
    for name in ("tiny-internlm2", LLAMA_NAME, "tiny-rwkv7"):
        file = models_dir / name / "training.json"
        if file.is_file():
            records.append(json.loads(file.read_text()))
    if not records:
        raise ParityKitError(f"no training.json under {models_dir}; train a model first (`parity-kit train NAME`)")

    def row(r: dict[str, Any]) -> str:
        w, wo = r["eval"]["with_bos"], r["eval"]["without_bos"]
        size = sum(f.stat().st_size for f in (models_dir / r["name"]).glob("*.safetensors")) / 2**20
        return (f"| {r['name']} | {r['model_type']} | {r['n_params']:,} | {size:.1f} | {r['final_loss']:.3f} "
                f"| {w['acc']:.3f} ± {w['acc_stderr']:.3f} | {w['ppl']:.2f} ± {w['ppl_stderr']:.2f} "
                f"| {wo['acc']:.3f} | {wo['ppl']:.2f} | {r['wall_time_s'] / 60:.1f} |")

    lines = [
        "# Built-in tiny models",
        "",
        "Written by `parity_kit.builtins.train.write_models_readme()` from each model's `training.json`; every number",
        "below was computed by `parity-kit train` (training on the CPU, then the held-out evaluation).",
        "",
        f"Held-out evaluation: `parity_kit/data/{EVAL_FILE}` (last-word accuracy: every target token is the greedy",
        "choice; perplexity: exp(−mean log-likelihood of the target), bootstrap standard error),",
        "computed with `parity_kit.builtins.train.evaluate` (the statistics of `parity_kit.analyses.evaluation.evaluate_lastword`,",
        "lm-eval conventions, 10,000 bootstrap replicates) with BOS (token 0) prepended, as in training,",
        "and without it.",
        "",
        "| model | type | parameters | MiB | final train loss | acc (BOS) | ppl (BOS) | acc (no BOS) "
        "| ppl (no BOS) | train wall time (min) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[row(r) for r in records],
        "",
    ]
    for r in records:
        lines += [f"## {r['name']}", ""]
        if "converted_from" in r:
            lines += [f"Converted from `{r['converted_from']}` by `convert_internlm2_to_llama` (bit-identical weights,",
                      "Llama layout, loads with plain `transformers.LlamaForCausalLM`). Loss curve: the source's.", ""]
        else:
            s = r["settings"]
            cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items() if not k.endswith("token_id"))
            lines += [
                f"- config: {cfg}",
                f"- training: {s['steps']} steps × {s['batch_size']} sequences × {s['seq_len']} tokens "
                f"({r['tokens_seen']:,} tokens), AdamW lr {s['lr']} (warm-up {s['warmup_steps']}, cosine to "
                f"{s['min_lr_ratio']}×), weight decay {s['weight_decay']}, clip {s['grad_clip']}, "
                f"{s['threads']} CPU threads, torch {r['environment']['torch']}",
            ]
            lines.append("")
        curve = r["loss_curve"]
        picks = sorted({0, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4, len(curve) - 1})
        lines += [
            f"- parameters: {r['n_params']:,}; seed {r['seed']}; wall time {r['wall_time_s']:.0f} s",
            f"- command: `{r['command']}`",
            f"- evaluation: `{r['eval_command']}`",
            "",
            "| step | mean training loss |",
            "| --- | --- |",
            *[f"| {curve[i][0]} | {curve[i][1]:.3f} |" for i in picks],
            "",
            f"![loss curve]({r['name']}/loss.png)",
            "",
        ]
    target = models_dir / "README.md"
    with atomic_write(target) as f:
        f.write("\n".join(lines))
    return target


__all__ = [
    "SPECS", "ModelSpec", "TrainSettings", "build_model", "build_tokenizer", "convert_to_llama", "evaluate",
    "evaluate_checkpoint", "fit",
    "lr_at", "packed_batches", "train", "write_models_readme",
]
