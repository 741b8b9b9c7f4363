"""Last-word (lambada-style) evaluation with honest statistics and explicit BOS handling.

The conventions follow lm-evaluation-harness so numbers are comparable with published ones: per document,
``ll`` is the summed log-probability of the target (the last word with its leading space) given the context,
and ``acc`` is 1 when every target token is the model's argmax; perplexity is ``exp(-mean(ll))``, with the
standard errors of :mod:`parity_kit.analyses.statistics`. Two runs over the same documents are compared with
:func:`parity_kit.paired_comparison`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .._util.calling import RECURRENT_MODEL_TYPES, model_type, takes_padding_mask
from ..dtypes import DtypeLike, check_dtype_on_device, dtype_name
from ..errors import ParityKitError
from .statistics import mean_stderr, perplexity_bootstrap_stderr

__all__ = ["LastWordItem", "LastWordResult", "load_lastword_items", "encode_lastword", "evaluate_lastword",
           "encode_text", "resolve_bos"]

# Recurrent architectures: their forward takes no attention mask, so padding could not be hidden from
# them; they are run one document per forward (no padding at all), unless ``batch_recurrent=True``
# right-pads them: a recurrence is causal, so a pad after a document never reaches a position it scores.


# --------------------------------------------------------------------------------------------------
# items


@dataclass(frozen=True)
class LastWordItem:
    """One document: the ``context`` and the ``target`` (the last word, with its leading space).

    >>> LastWordItem("The cat sat on the", " mat").target
    ' mat'
    """

    context: str
    target: str


def _item_from_mapping(obj: Any, where: str) -> LastWordItem:
    if isinstance(obj, LastWordItem):
        return obj
    if not isinstance(obj, Mapping):
        raise ParityKitError(
            f"{where}: expected an object with 'context' and 'target', got {type(obj).__name__}; "
            'write each item as {"context": "...", "target": " word"}'
        )
    missing = [k for k in ("context", "target") if k not in obj]
    if missing:
        raise ParityKitError(
            f"{where}: missing key(s) {missing} (keys present: {sorted(obj)}); "
            'each item needs {"context": "...", "target": " word"}'
        )
    context, target = obj["context"], obj["target"]
    if not isinstance(context, str) or not isinstance(target, str):
        raise ParityKitError(f"{where}: 'context' and 'target' must be strings, got "
                             f"{type(context).__name__} and {type(target).__name__}")
    return LastWordItem(context, target)


def load_lastword_items(
    items_or_path: str | os.PathLike[str] | Iterable[Mapping[str, str] | LastWordItem],
    *,
    limit: int | None = None,
) -> list[LastWordItem]:
    """Read last-word items from a JSONL file (``{"context": ..., "target": " word"}`` per line) or a list.

    Blank lines are skipped; a malformed line raises a ParityKitError naming its line number.

    >>> load_lastword_items([{"context": "a b", "target": " c"}])
    [LastWordItem(context='a b', target=' c')]
    """
    if isinstance(items_or_path, (str, os.PathLike)):
        path = Path(items_or_path)
        if not path.is_file():
            raise ParityKitError(f"eval set {str(path)!r} does not exist; pass a JSONL file or a list of items")
        items: list[LastWordItem] = []
        try:
            raw_lines = path.read_bytes().splitlines()
        except OSError as e:
            raise ParityKitError(f"cannot read eval set {str(path)!r} ({e.strerror or e}); check its permissions") from None
        for lineno, raw in enumerate(raw_lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ParityKitError(
                    f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); save the "
                    "eval set as UTF-8 JSONL"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ParityKitError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); one JSON object per line"
                ) from None
            items.append(_item_from_mapping(obj, f"{path}:{lineno}"))
            if limit is not None and len(items) >= limit:
                break
        source = str(path)
    else:
        if isinstance(items_or_path, Mapping):
            raise ParityKitError("got a single mapping; pass a list of items or a JSONL path")
        items = [_item_from_mapping(obj, f"item {i}") for i, obj in enumerate(items_or_path)]
        if limit is not None:
            items = items[:limit]
        source = "the given list"
    if limit is not None and limit < 1:
        raise ParityKitError(f"limit={limit} selects no item; use a positive limit or None")
    if not items:
        raise ParityKitError(f"no items in {source}; the eval set is empty")
    return items


# --------------------------------------------------------------------------------------------------
# tokenization


@dataclass(frozen=True)
class _Encoded:
    input_ids: tuple[int, ...]  # exactly what the model is fed: prefix + context + target
    n_prefix: int               # special tokens before the text (BOS and/or the tokenizer's own)
    n_context: int              # context tokens (text only)
    n_target: int
    boundary_merge: bool        # context+target tokenised differently from the context alone at the seam


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of ``text`` (with or without the tokenizer's own special tokens)."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def resolve_bos(tokenizer: Any, prepend_bos: bool, bos_token_id: int | None) -> int | None:
    """The BOS id to prepend: ``bos_token_id`` if given, else the tokenizer's (an error when it has none and one
    is asked for)."""
    if bos_token_id is not None:
        return int(bos_token_id)
    tok_bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and tok_bos is None:
        raise ParityKitError(
            "prepend_bos=True but the tokenizer defines no BOS token; pass bos_token_id=<id> "
            "(RWKV models use 0) or prepend_bos=False"
        )
    return tok_bos


def _normalise_item(item: LastWordItem, require_leading_space: bool, index: int) -> LastWordItem:
    # lm-evaluation-harness moves trailing whitespace of the context onto the continuation
    context, target = item.context, item.target
    stripped = context.rstrip()
    if len(stripped) < len(context):
        target = context[len(stripped):] + target
        context = stripped
    if not target.strip():
        raise ParityKitError(f"item {index}: the target {item.target!r} is empty; every item needs a last word")
    if require_leading_space and not target[0].isspace():
        raise ParityKitError(
            f"item {index}: target {item.target!r} has no leading space, so it would be glued to the last "
            f"context word {context.split()[-1] if context.split() else ''!r}; write the target as "
            f"{' ' + item.target!r}, or pass require_leading_space=False for languages without spaces"
        )
    return LastWordItem(context, target)


def encode_lastword(
    tokenizer: Any,
    item: LastWordItem,
    *,
    prepend_bos: bool = True,
    bos_token_id: int | None = None,
    add_special_tokens: bool = False,
) -> tuple[list[int], int, int]:
    """Token ids fed to the model for one item, and where the target starts: ``(ids, target_start, n_target)``.

    The context is tokenised alone and context+target jointly; the target is the joint encoding's tail
    after the context's tokens (lm-evaluation-harness does the same), so the target's tokens are those
    the model would see in running text. Special tokens: with ``add_special_tokens=True`` the
    tokenizer's own leading specials are kept, but a BOS is never doubled: a BOS the tokenizer added is
    replaced by ``bos_token_id`` when ``prepend_bos`` and removed otherwise. Trailing specials (an EOS
    some tokenizers append) are never scored.

    >>> from parity_kit.models import load
    >>> _, tok = load("tiny-rwkv7")
    >>> ids, start, n = encode_lastword(tok, LastWordItem("The cat sat on the", " mat"), bos_token_id=0)
    >>> ids[0], ids[start:] == tok(" mat", add_special_tokens=False)["input_ids"]
    (0, True)
    """
    bos = resolve_bos(tokenizer, prepend_bos, bos_token_id)
    enc = _encode_item(tokenizer, _normalise_item(item, False, 0), prepend_bos, bos, add_special_tokens)
    return list(enc.input_ids), enc.n_prefix + enc.n_context, enc.n_target


def _encode_item(tokenizer: Any, item: LastWordItem, prepend_bos: bool, bos: int | None,
                 add_special_tokens: bool) -> _Encoded:
    ctx = encode_text(tokenizer, item.context, False)
    whole = encode_text(tokenizer, item.context + item.target, False)
    target = whole[len(ctx):]
    prefix: list[int] = []
    if add_special_tokens:
        with_specials = encode_text(tokenizer, item.context, True)
        # the tokenizer's leading specials are whatever precedes the plain encoding
        k = next((i for i in range(len(with_specials) - len(ctx) + 1) if with_specials[i:i + len(ctx)] == ctx), 0)
        prefix = with_specials[:k]
    tok_bos = getattr(tokenizer, "bos_token_id", None)
    prefix = [t for t in prefix if t not in (tok_bos, bos)]
    if prepend_bos:
        prefix = [int(bos)] + prefix  # type: ignore[arg-type]
    return _Encoded(
        input_ids=tuple(int(t) for t in prefix + ctx + target),
        n_prefix=len(prefix), n_context=len(ctx), n_target=len(target),
        boundary_merge=whole[:len(ctx)] != ctx,
    )


# --------------------------------------------------------------------------------------------------
# statistics


# --------------------------------------------------------------------------------------------------
# results


@dataclass
class LastWordResult:
    """Per-document scores of one evaluation run and its summary.

    ``per_doc`` columns: ``doc, context, target, ll, acc, n_context_tokens, n_target_tokens,
    n_prefix_tokens, first_input_id, first_target_id, boundary_merge, input_ids, token_logprobs``.
    ``token_logprobs[j]`` is the log-probability of the j-th text token (context then target, specials
    excluded) given everything before it; NaN where nothing precedes it (the first token without BOS).

    >>> r = LastWordResult.from_loglikelihoods([-1.0, -2.0, -0.5], acc=[1, 0, 1], n_bootstrap=1000)
    >>> round(r.ppl, 4), r.n
    (3.2113, 3)
    """

    per_doc: pd.DataFrame
    ppl: float
    ppl_stderr: float
    acc: float
    acc_stderr: float
    n: int
    config: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def summary(self) -> dict[str, Any]:
        """The headline numbers (and the configuration) as a flat dict."""
        return {"label": self.label, "n": self.n, "ppl": self.ppl, "ppl_stderr": self.ppl_stderr,
                "acc": self.acc, "acc_stderr": self.acc_stderr, **self.config}

    def __repr__(self) -> str:
        return (f"LastWordResult({self.label or 'unlabelled'}: n={self.n}, "
                f"ppl={self.ppl:.4f} ± {self.ppl_stderr:.4f}, "
                f"acc={self.acc:.4f} ± {self.acc_stderr:.4f})")

    @classmethod
    def from_loglikelihoods(
        cls,
        ll: Sequence[float] | np.ndarray,
        *,
        acc: Sequence[float] | np.ndarray | None = None,
        documents: Sequence[LastWordItem] | None = None,
        n_bootstrap: int = 100_000,
        label: str = "",
    ) -> LastWordResult:
        """Build a result from per-document log-likelihoods computed elsewhere (e.g. lm-eval's samples).

        Without ``documents``, two such results are paired by position (document i with document i).

        >>> LastWordResult.from_loglikelihoods([-1.0, -2.0], n_bootstrap=10).n
        2
        """
        ll_arr = np.asarray(ll, dtype=np.float64)
        n = ll_arr.size
        acc_arr = np.zeros(n) if acc is None else np.asarray(acc, dtype=np.float64)
        if acc_arr.size != n or (documents is not None and len(documents) != n):
            raise ParityKitError(f"ll has {n} values but acc/documents have {acc_arr.size}/"
                                 f"{len(documents) if documents is not None else n}; give one per document")
        docs = documents or [LastWordItem(f"document {i}", "") for i in range(n)]
        per_doc = pd.DataFrame({
            "doc": np.arange(n), "context": [d.context for d in docs], "target": [d.target for d in docs],
            "ll": ll_arr, "acc": acc_arr.astype(np.int64),
        })
        return _summarise(per_doc, n_bootstrap, {"n_bootstrap": n_bootstrap}, label)


def _summarise(per_doc: pd.DataFrame, n_bootstrap: int, config: dict[str, Any], label: str) -> LastWordResult:
    ll = per_doc["ll"].to_numpy(np.float64)
    acc = per_doc["acc"].to_numpy(np.float64)
    if not np.all(np.isfinite(ll)):
        bad = per_doc.loc[~np.isfinite(ll), "doc"].tolist()[:5]
        raise ParityKitError(f"non-finite log-likelihood for documents {bad}; the model produced inf/NaN logits "
                             "(try a higher-precision dtype, or check the model with pk.first_nonfinite)")
    return LastWordResult(
        per_doc=per_doc, ppl=float(math.exp(-ll.mean())), ppl_stderr=perplexity_bootstrap_stderr(ll, n_bootstrap),
        acc=float(acc.mean()), acc_stderr=mean_stderr(acc), n=len(per_doc), config=config, label=label,
    )


# --------------------------------------------------------------------------------------------------
# evaluation


def _check_vocab(model: torch.nn.Module, tokenizer: Any, encoded: Sequence[_Encoded]) -> None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n_emb = int(emb.num_embeddings) if emb is not None and hasattr(emb, "num_embeddings") else None
    if n_emb is None:
        return
    n_tok = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    if n_tok is not None and n_tok > n_emb:
        raise ParityKitError(
            f"vocabulary mismatch: the tokenizer has {n_tok} tokens but the model's embedding has {n_emb} rows; "
            "load the tokenizer that belongs to this model"
        )
    top = max(max(e.input_ids) for e in encoded)
    if top >= n_emb:
        raise ParityKitError(f"token id {top} is outside the model's embedding ({n_emb} rows); check bos_token_id "
                             "and that the tokenizer belongs to the model")


def evaluate_lastword(
    model: torch.nn.Module,
    tokenizer: Any,
    items_or_path: str | os.PathLike[str] | Iterable[Mapping[str, str] | LastWordItem],
    *,
    prepend_bos: bool = True,
    bos_token_id: int | None = None,
    add_special_tokens: bool = False,
    batch_size: int = 8,
    dtype: DtypeLike | None = None,
    device: str | torch.device | None = None,
    limit: int | None = None,
    progress: bool = True,
    n_bootstrap: int = 100_000,
    require_leading_space: bool = True,
    label: str = "",
    batch_recurrent: bool = False,
) -> LastWordResult:
    """Score the last word of every document: log-likelihood, greedy accuracy, perplexity with standard errors.

    BOS: with ``prepend_bos`` the sequence starts with ``bos_token_id`` (default: the tokenizer's BOS) —
    exactly one, also when the tokenizer adds its own (``add_special_tokens=True``); without it, a BOS the
    tokenizer added is stripped. A target must start with whitespace (trailing whitespace of the context
    is moved onto it first, as lm-evaluation-harness does); otherwise a ParityKitError is raised unless
    ``require_leading_space=False``. Batching pads on the right and passes an attention mask; recurrent
    models (``config.model_type`` such as ``rwkv7``), and models whose forward takes no mask, get one
    document per forward instead, so no padding ever reaches them. ``batch_recurrent=True`` batches a
    recurrent model too, right-padded and with no mask: its recurrence is causal, so the padding after a
    document never reaches a position it scores, and the scores change only by the rounding of batched
    kernels (batch variance: compare both settings on one model to see how much). Log-probabilities are computed in
    fp32 from the logits whatever the model's dtype, so a dtype comparison measures the model, not the
    scoring. ``dtype``/``device`` move the model in place (``model.to``); the model is run in eval mode
    and its training flag is restored afterwards. Deterministic: two runs give bit-identical results.

    >>> from parity_kit.models import load
    >>> from parity_kit._util.paths import data_dir
    >>> model, tok = load("tiny-internlm2-llama")
    >>> r = evaluate_lastword(model, tok, data_dir() / "eval" / "lastword.jsonl", limit=20, n_bootstrap=1000,
    ...                       progress=False)
    >>> r.n, r.config["prepend_bos"], int(r.per_doc["input_ids"].map(lambda ids: ids.count(0)).max())
    (20, True, 1)
    """
    if batch_size < 1:
        raise ParityKitError(f"batch_size={batch_size}; use 1 or more")
    items = load_lastword_items(items_or_path, limit=limit)
    items = [_normalise_item(it, require_leading_space, i) for i, it in enumerate(items)]
    bos = resolve_bos(tokenizer, prepend_bos, bos_token_id)
    encoded = _encode_items(tokenizer, items, prepend_bos, bos, add_special_tokens)
    _check_vocab(model, tokenizer, encoded)

    if dtype is not None or device is not None:
        target_device = device if device is not None else next(model.parameters()).device
        model.to(device=target_device, dtype=None if dtype is None else check_dtype_on_device(dtype, target_device))
    first_param = next(model.parameters())
    masked = takes_padding_mask(model)
    right_padded = masked or (batch_recurrent and model_type(model) in RECURRENT_MODEL_TYPES)
    step = batch_size if right_padded else 1
    # longest first, as lm-eval does: padding stays small and an out-of-memory shows up at once
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].input_ids), i))
    batches = [order[s:s + step] for s in range(0, len(order), step)]
    scores: list[_Score | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="last-word eval", disable=not progress, leave=False):
                for i, score in zip(batch, _score_batch(model, [encoded[i] for i in batch], masked)):
                    scores[i] = score
    finally:
        model.train(was_training)
    config = {
        "prepend_bos": prepend_bos, "bos_token_id": bos if prepend_bos else None,
        "add_special_tokens": add_special_tokens, "dtype": dtype_name(first_param.dtype),
        "device": str(first_param.device), "batched": right_padded, "batch_size": step,
        "padding": "right, masked" if masked else "right, no mask (causal recurrence)" if right_padded else "none",
        "model_class": type(model).__name__, "n_bootstrap": n_bootstrap,
    }
    return _summarise(_per_doc_table(items, encoded, scores), n_bootstrap, config, label)


def _encode_items(tokenizer: Any, items: Sequence[LastWordItem], prepend_bos: bool, bos: int | None,
                  add_special_tokens: bool) -> list[_Encoded]:
    encoded = [_encode_item(tokenizer, it, prepend_bos, bos, add_special_tokens) for it in items]
    for i, e in enumerate(encoded):
        if e.n_target == 0:
            raise ParityKitError(f"item {i}: the target {items[i].target!r} produced no token of its own (it merged "
                                 "into the context's last token); fix the item's split")
        if e.n_prefix + e.n_context == 0:
            raise ParityKitError(f"item {i}: the context is empty and no BOS is prepended, so nothing conditions the "
                                 "target; use prepend_bos=True or drop the item")
    return encoded


@dataclass(frozen=True)
class _Score:
    token_logprobs: np.ndarray  # per text token (NaN where nothing precedes it)
    ll: float                   # summed log-probability of the target tokens
    acc: int                    # 1 when every target token is the greedy choice


def _score_batch(model: torch.nn.Module, batch: Sequence[_Encoded], masked: bool) -> list[_Score]:
    """One forward over ``batch`` (right-padded, with a mask when the model takes one; a recurrent model takes none
    and its causal recurrence never carries a pad back to a scored position); fp32 log-probabilities."""
    device = next(model.parameters()).device
    width = max(len(e.input_ids) for e in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, :len(e.input_ids)] = 1
    kwargs = {"attention_mask": mask.to(device)} if masked else {}
    logits = _logits(model(ids.to(device), **kwargs)).float()  # [B, T, V]
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # [B, T-1, V]: position t predicts token t+1
    nxt = ids[:, 1:].to(device)
    picked = logprobs.gather(-1, nxt.unsqueeze(-1)).squeeze(-1).double().cpu()  # [B, T-1]
    greedy = (logprobs.argmax(-1) == nxt).cpu()
    scores = []
    for row, e in enumerate(batch):
        n_text = e.n_context + e.n_target
        # log-prob of text token j sits at column n_prefix + j - 1
        lp = np.full(n_text, np.nan)
        first = max(0, 1 - e.n_prefix)
        lp[first:] = picked[row, e.n_prefix + first - 1:e.n_prefix + n_text - 1].numpy()
        target_columns = slice(e.n_prefix + e.n_context - 1, e.n_prefix + n_text - 1)
        scores.append(_Score(lp, float(lp[e.n_context:].sum()), int(bool(greedy[row, target_columns].all()))))
    return scores


def _per_doc_table(items: Sequence[LastWordItem], encoded: Sequence[_Encoded],
                   scores: Sequence[_Score]) -> pd.DataFrame:
    return pd.DataFrame({
        "doc": np.arange(len(items)),
        "context": [it.context for it in items],
        "target": [it.target for it in items],
        "ll": np.array([s.ll for s in scores], dtype=float),
        "acc": np.array([s.acc for s in scores], dtype=np.int64),
        "n_context_tokens": [e.n_context for e in encoded],
        "n_target_tokens": [e.n_target for e in encoded],
        "n_prefix_tokens": [e.n_prefix for e in encoded],
        "first_input_id": [e.input_ids[0] for e in encoded],
        "first_target_id": [e.input_ids[e.n_prefix + e.n_context] for e in encoded],
        "boundary_merge": [e.boundary_merge for e in encoded],
        "input_ids": [e.input_ids for e in encoded],
        "token_logprobs": [s.token_logprobs for s in scores],
    })


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise ParityKitError(f"the model returned {type(output).__name__} without logits; pass a causal LM "
                             "(…ForCausalLM) whose output has .logits")
    return logits


# --------------------------------------------------------------------------------------------------
# paired comparison


# --------------------------------------------------------------------------------------------------
# tokenization provenance


# --------------------------------------------------------------------------------------------------
# activation view


# --------------------------------------------------------------------------------------------------
# the BOS story: analyses composed from the functions above, used by notebooks/04_bos_token.ipynb


