"""Everything under ``parity_kit/data/`` that is not a model: the chat prompts, the last-word eval set and the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from .._util.atomic import atomic_write
from .._util.paths import data_dir
from .corpus import chat_prompts, lastword_eval_items, training_documents
from .tokenizer import DEFAULT_VOCAB_SIZE, save_tokenizer, train_tokenizer


TOKENIZER_DOCS = 12_000  # documents the BPE is trained on


def build_data(seed: int = 0, out_dir: str | Path | None = None, *, n_eval: int = 600,
               n_prompts: int = 40, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Write ``prompts.json``, ``eval/lastword.jsonl`` and ``tokenizer/`` (Llama flavour) under ``out_dir``.

    ``out_dir`` defaults to :func:`parity_kit._util.paths.data_dir`. Deterministic from ``seed``.

    >>> import tempfile
    >>> out = build_data(out_dir=tempfile.mkdtemp(), n_eval=5, n_prompts=3, vocab_size=300)
    >>> sorted(p.name for p in out.iterdir())
    ['eval', 'prompts.json', 'tokenizer']
    """
    out = Path(out_dir) if out_dir is not None else data_dir()
    with atomic_write(out / "prompts.json") as f:
        f.write(json.dumps(chat_prompts(n_prompts, seed), indent=1) + "\n")
    with atomic_write(out / "eval" / "lastword.jsonl") as f:
        for item in lastword_eval_items(n_eval, seed):
            f.write(json.dumps(item) + "\n")
    tok = train_tokenizer(training_documents(TOKENIZER_DOCS, seed), vocab_size=vocab_size)
    save_tokenizer(tok, out / "tokenizer", add_bos=True)
    return out
