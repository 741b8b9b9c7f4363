"""Last-word (lambada-style) evaluation with honest statistics, BOS handling and tokenization provenance.

The statistics follow lm-evaluation-harness so numbers are comparable with published ones:

- per document, ``ll`` is the summed log-probability of the target (the last word with its leading
  space) given the context, and ``acc`` is 1 when every target token is the model's argmax;
- perplexity is ``exp(-mean(ll))``; its standard error is a bootstrap: replicates are drawn in chunks
  of 1,000 (fewer if fewer are asked for), chunk ``i`` from a Mersenne Twister seeded with ``i``
  exactly as Python's ``random.Random(i).choices`` draws them, and the standard error is the sample
  standard deviation (n−1) of ``exp(-mean)`` over the replicates;
- accuracy's standard error is ``sd(acc, n−1) / sqrt(n)``.

Two runs over the same documents are compared *paired* (:func:`paired_comparison`): the per-document
differences cancel the document-to-document spread that dominates one run's standard error.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..dtypes import DtypeLike, check_dtype_on_device, dtype_name
from ..errors import ParityKitError

__all__ = [
    "LastWordItem",
    "LastWordResult",
    "PairedComparison",
    "TokenProvenance",
    "load_lastword_items",
    "encode_lastword",
    "evaluate_lastword",
    "perplexity_bootstrap_stderr",
    "mean_stderr",
    "paired_comparison",
    "position_loss_difference",
    "token_provenance",
    "bos_activation_diff",
    "reported_gap_in_stderr",
    "compare_with_and_without_bos",
    "bos_factor_table",
    "bos_position_effect",
    "bos_context_sweep",
    "bos_activation_summary",
    "conclude_bos_story",
]

# Recurrent architectures: their forward takes no attention mask, so padding could not be hidden from
# them; they are run one document per forward (no padding at all).
_RECURRENT_MODEL_TYPES = frozenset({"rwkv", "rwkv5", "rwkv6", "rwkv7", "mamba", "mamba2", "retnet", "gla"})

_LM_EVAL_CHUNK = 1000  # lm-evaluation-harness draws bootstrap replicates in chunks of this size


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
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
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


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _resolve_bos(tokenizer: Any, prepend_bos: bool, bos_token_id: int | None) -> int | None:
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
    bos = _resolve_bos(tokenizer, prepend_bos, bos_token_id)
    enc = _encode_item(tokenizer, _normalise_item(item, False, 0), prepend_bos, bos, add_special_tokens)
    return list(enc.input_ids), enc.n_prefix + enc.n_context, enc.n_target


def _encode_item(tokenizer: Any, item: LastWordItem, prepend_bos: bool, bos: int | None,
                 add_special_tokens: bool) -> _Encoded:
    ctx = _encode(tokenizer, item.context, False)
    whole = _encode(tokenizer, item.context + item.target, False)
    target = whole[len(ctx):]
    prefix: list[int] = []
    if add_special_tokens:
        with_specials = _encode(tokenizer, item.context, True)
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


def mean_stderr(values: Sequence[float] | np.ndarray) -> float:
    """Standard error of the mean as lm-evaluation-harness computes it: sample sd (n−1) / sqrt(n).

    >>> round(mean_stderr([0.0, 1.0, 1.0, 0.0]), 4)
    0.2887
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        raise ParityKitError(f"a standard error needs at least 2 values, got {x.size}; evaluate more documents")
    return float(np.std(x, ddof=1) / math.sqrt(x.size))


def _lm_eval_draws(seed: int, n_replicates: int, n: int) -> np.ndarray:
    # Python's random.Random(i) seeds MT19937 with init_by_array([i]); numpy's legacy RandomState
    # seeded with the array [i] does the same, and random_sample is the same 53-bit double, so
    # floor(u * n) reproduces random.Random(i).choices(xs, k=n) index for index.
    u = np.random.RandomState([seed]).random_sample(n_replicates * n)
    return np.floor(u * n).astype(np.int64).reshape(n_replicates, n)  # [replicates, n]


def perplexity_bootstrap_stderr(ll: Sequence[float] | np.ndarray, n_bootstrap: int = 100_000) -> float:
    """Bootstrap standard error of ``exp(-mean(ll))``, drawn exactly as lm-evaluation-harness draws it.

    Replicates come in ``n_bootstrap // 1000`` chunks of 1,000 (one chunk of ``n_bootstrap`` when it is
    below 1,000), chunk ``i`` seeded with ``i``; the result is the sample sd (n−1) of the replicates.

    >>> round(perplexity_bootstrap_stderr([-1.0, -2.0, -3.0, -0.5], n_bootstrap=1000), 3) > 0
    True
    """
    x = np.asarray(ll, dtype=np.float64)
    if x.size < 2:
        raise ParityKitError(f"a bootstrap standard error needs at least 2 documents, got {x.size}")
    if n_bootstrap < 2:
        raise ParityKitError(f"n_bootstrap={n_bootstrap} is too few replicates; use at least 2 (lm-eval uses 100000)")
    chunk = min(_LM_EVAL_CHUNK, n_bootstrap)
    replicates = np.concatenate([
        np.exp(-x[_lm_eval_draws(seed, chunk, x.size)].mean(axis=1)) for seed in range(n_bootstrap // chunk)
    ])
    return float(np.std(replicates, ddof=1))


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


def _model_type(model: torch.nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def _takes_attention_mask(model: torch.nn.Module) -> bool:
    if _model_type(model) in _RECURRENT_MODEL_TYPES:
        return False
    params = inspect.signature(model.forward).parameters
    return "attention_mask" in params


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
) -> LastWordResult:
    """Score the last word of every document: log-likelihood, greedy accuracy, perplexity with standard errors.

    BOS: with ``prepend_bos`` the sequence starts with ``bos_token_id`` (default: the tokenizer's BOS) —
    exactly one, also when the tokenizer adds its own (``add_special_tokens=True``); without it, a BOS the
    tokenizer added is stripped. A target must start with whitespace (trailing whitespace of the context
    is moved onto it first, as lm-evaluation-harness does); otherwise a ParityKitError is raised unless
    ``require_leading_space=False``. Batching pads on the right and passes an attention mask; recurrent
    models (``config.model_type`` such as ``rwkv7``), and models whose forward takes no mask, get one
    document per forward instead, so no padding ever reaches them. Log-probabilities are computed in
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
    bos = _resolve_bos(tokenizer, prepend_bos, bos_token_id)
    encoded = [_encode_item(tokenizer, it, prepend_bos, bos, add_special_tokens) for it in items]
    for i, e in enumerate(encoded):
        if e.n_target == 0:
            raise ParityKitError(f"item {i}: the target {items[i].target!r} produced no token of its own (it merged "
                                 "into the context's last token); fix the item's split")
        if e.n_prefix + e.n_context == 0:
            raise ParityKitError(f"item {i}: the context is empty and no BOS is prepended, so nothing conditions the "
                                 "target; use prepend_bos=True or drop the item")
    _check_vocab(model, tokenizer, encoded)

    if dtype is not None or device is not None:
        target_device = device if device is not None else next(model.parameters()).device
        model.to(device=target_device, dtype=None if dtype is None else check_dtype_on_device(dtype, target_device))
    first_param = next(model.parameters())
    run_device = first_param.device
    masked = _takes_attention_mask(model)
    step = batch_size if masked else 1

    # longest first, as lm-eval does: padding stays small and an out-of-memory shows up at once
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].input_ids), i))
    batches = [order[s:s + step] for s in range(0, len(order), step)]
    token_logprobs: list[np.ndarray | None] = [None] * len(encoded)
    ll = np.zeros(len(encoded))
    acc = np.zeros(len(encoded), dtype=np.int64)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="last-word eval", disable=not progress, leave=False):
                width = max(len(encoded[i].input_ids) for i in batch)
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for row, i in enumerate(batch):
                    seq = encoded[i].input_ids
                    ids[row, :len(seq)] = torch.tensor(seq)
                    mask[row, :len(seq)] = 1
                kwargs = {"attention_mask": mask.to(run_device)} if masked else {}
                logits = _logits(model(ids.to(run_device), **kwargs)).float()  # [B, T, V]
                # position t predicts token t+1
                logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # [B, T-1, V]
                nxt = ids[:, 1:].to(run_device)
                picked = logprobs.gather(-1, nxt.unsqueeze(-1)).squeeze(-1).double().cpu()  # [B, T-1]
                greedy = (logprobs.argmax(-1) == nxt).cpu()
                for row, i in enumerate(batch):
                    e = encoded[i]
                    n_text = e.n_context + e.n_target
                    # log-prob of text token j sits at column n_prefix + j - 1
                    lp = np.full(n_text, np.nan)
                    first = max(0, 1 - e.n_prefix)
                    lp[first:] = picked[row, e.n_prefix + first - 1:e.n_prefix + n_text - 1].numpy()
                    token_logprobs[i] = lp
                    ll[i] = lp[e.n_context:].sum()
                    tgt_cols = slice(e.n_prefix + e.n_context - 1, e.n_prefix + n_text - 1)
                    acc[i] = int(bool(greedy[row, tgt_cols].all()))
    finally:
        model.train(was_training)

    per_doc = pd.DataFrame({
        "doc": np.arange(len(items)),
        "context": [it.context for it in items],
        "target": [it.target for it in items],
        "ll": ll,
        "acc": acc,
        "n_context_tokens": [e.n_context for e in encoded],
        "n_target_tokens": [e.n_target for e in encoded],
        "n_prefix_tokens": [e.n_prefix for e in encoded],
        "first_input_id": [e.input_ids[0] for e in encoded],
        "first_target_id": [e.input_ids[e.n_prefix + e.n_context] for e in encoded],
        "boundary_merge": [e.boundary_merge for e in encoded],
        "input_ids": [e.input_ids for e in encoded],
        "token_logprobs": token_logprobs,
    })
    config = {
        "prepend_bos": prepend_bos, "bos_token_id": bos if prepend_bos else None,
        "add_special_tokens": add_special_tokens, "dtype": dtype_name(first_param.dtype),
        "device": str(run_device), "batched": masked, "batch_size": step,
        "model_class": type(model).__name__, "n_bootstrap": n_bootstrap,
    }
    return _summarise(per_doc, n_bootstrap, config, label)


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


@dataclass
class PairedComparison:
    """Run ``b`` against run ``a`` on the same documents. ``table`` lists every statistic; ``verdict`` says
    what to trust. ``flagged`` is True when |z| > 3 or the paired bootstrap interval excludes 0.

    >>> a = LastWordResult.from_loglikelihoods([-1.0, -2.0, -0.5, -1.5], n_bootstrap=100)
    >>> b = LastWordResult.from_loglikelihoods([-1.1, -2.1, -0.6, -1.6], n_bootstrap=100)
    >>> paired_comparison(a, b, n_bootstrap=200).flagged
    True
    """

    table: pd.DataFrame
    flagged: bool
    verdict: str
    stats: dict[str, float]

    def __getitem__(self, key: str) -> float:
        return self.stats[key]

    def _repr_html_(self) -> str:
        return f"<p>{self.verdict}</p>" + self.table.to_html(index=False)

    def __repr__(self) -> str:
        return f"{self.table.to_string(index=False)}\n{self.verdict}"


def paired_comparison(
    a: LastWordResult,
    b: LastWordResult,
    *,
    n_bootstrap: int = 10_000,
    seed: int = 0,
    z_threshold: float = 3.0,
) -> PairedComparison:
    """Compare two runs document by document (b − a): paired mean ll difference, its z, and a paired
    bootstrap of the perplexity difference, next to the unpaired "how many of a's standard errors" figure.

    The paired bootstrap resamples document indices once per replicate and applies them to both runs.
    Raises a ParityKitError when the runs did not score the same documents in the same order.

    >>> a = LastWordResult.from_loglikelihoods([-1.0, -2.0, -0.5], n_bootstrap=10)
    >>> paired_comparison(a, a, n_bootstrap=100).flagged
    False
    """
    if a.n != b.n:
        raise ParityKitError(f"the runs scored different numbers of documents ({a.n} vs {b.n}); evaluate the same "
                             "items (same file, same limit) for a paired comparison")
    docs_a = list(zip(a.per_doc["context"], a.per_doc["target"]))
    docs_b = list(zip(b.per_doc["context"], b.per_doc["target"]))
    if docs_a != docs_b:
        first = next(i for i, (x, y) in enumerate(zip(docs_a, docs_b)) if x != y)
        raise ParityKitError(f"document {first} differs between the runs ({docs_a[first][1]!r} vs "
                             f"{docs_b[first][1]!r}); a paired comparison needs the same documents in the same order")
    if n_bootstrap < 2:
        raise ParityKitError(f"n_bootstrap={n_bootstrap}; use at least 2 replicates")
    ll_a = a.per_doc["ll"].to_numpy(np.float64)
    ll_b = b.per_doc["ll"].to_numpy(np.float64)
    d = ll_b - ll_a
    mean_d = float(d.mean())
    se_d = mean_stderr(d)
    z = mean_d / se_d if se_d > 0 else (0.0 if mean_d == 0 else math.copysign(math.inf, mean_d))
    acc_d = b.per_doc["acc"].to_numpy(np.float64) - a.per_doc["acc"].to_numpy(np.float64)

    rng = np.random.default_rng(seed)
    reps: list[np.ndarray] = []
    for start in range(0, n_bootstrap, _LM_EVAL_CHUNK):
        idx = rng.integers(0, a.n, size=(min(_LM_EVAL_CHUNK, n_bootstrap - start), a.n))  # [replicates, n]
        reps.append(np.exp(-ll_b[idx].mean(axis=1)) - np.exp(-ll_a[idx].mean(axis=1)))
    boot = np.concatenate(reps)
    lo, hi = (float(v) for v in np.quantile(boot, [0.025, 0.975]))

    ppl_diff = b.ppl - a.ppl
    stats = {
        "n": float(a.n),
        "ppl_a": a.ppl, "ppl_b": b.ppl, "ppl_diff": ppl_diff,
        "ppl_diff_in_a_stderr": ppl_diff / a.ppl_stderr if a.ppl_stderr > 0 else math.nan,
        "ppl_diff_unpaired_z": ppl_diff / math.hypot(a.ppl_stderr, b.ppl_stderr)
        if (a.ppl_stderr or b.ppl_stderr) else math.nan,
        "mean_ll_diff": mean_d, "mean_ll_diff_stderr": se_d, "z": z,
        "ppl_diff_boot_sd": float(np.std(boot, ddof=1)), "ppl_diff_ci_low": lo, "ppl_diff_ci_high": hi,
        "acc_diff": float(acc_d.mean()), "acc_diff_stderr": mean_stderr(acc_d),
        "docs_changed": float(np.count_nonzero(d)),
    }
    excludes_zero = lo > 0 or hi < 0
    flagged = bool(abs(z) > z_threshold or excludes_zero)
    name_a, name_b = a.label or "a", b.label or "b"
    direction = "worse" if ppl_diff > 0 else "better"
    verdict = (
        f"Trust the paired test: both runs score the same {a.n} documents, so per-document differences cancel the "
        f"spread between documents that dominates one run's standard error. {name_b} vs {name_a}: perplexity "
        f"{ppl_diff:+.4g} ({direction}; {stats['ppl_diff_in_a_stderr']:.2f} of {name_a}'s standard errors, the "
        f"unpaired figure), paired mean log-likelihood difference {mean_d:+.4g} ± {se_d:.2g} (z = {z:.2f}), paired "
        f"bootstrap 95% interval of the perplexity difference [{lo:.4g}, {hi:.4g}] — "
        + ("a real difference." if flagged else "not distinguishable from zero.")
    )
    table = pd.DataFrame({"statistic": list(stats), "value": list(stats.values())})
    return PairedComparison(table=table, flagged=flagged, verdict=verdict, stats=stats)


def position_loss_difference(a: LastWordResult, b: LastWordResult, *, context_window: int = 16) -> pd.DataFrame:
    """Mean per-token loss difference (NLL of b − NLL of a) over documents, by token position.

    Two alignments: ``axis="from_start"`` counts text tokens from the first one (0); ``axis="from_target"``
    counts from the target's first token (0, 1, … target tokens; −1, −2, … the last ``context_window``
    context tokens). Each row holds the mean, its standard error (sd n−1 / √n) and the number of
    documents with a value there; positions where either run has no prediction (the first token of a
    run without BOS) are left out. Both runs must score the same documents with the same tokenizer.

    >>> from parity_kit.models import load
    >>> model, tok = load("tiny-internlm2-llama")
    >>> items = [{"context": "The cat sat on the", "target": " mat"},
    ...          {"context": "A dog ran to the", "target": " park"}]
    >>> runs = [evaluate_lastword(model, tok, items, prepend_bos=b, n_bootstrap=10, progress=False)
    ...         for b in (True, False)]
    >>> df = position_loss_difference(*runs)
    >>> sorted(df["axis"].unique()), int(df["position"][df["axis"] == "from_start"].min())
    (['from_start', 'from_target'], 1)
    """
    for r in (a, b):
        if "token_logprobs" not in r.per_doc.columns:
            raise ParityKitError(f"result {r.label or ''!r} has no per-token log-probabilities; "
                                 "use results of evaluate_lastword, not from_loglikelihoods")
    if a.n != b.n or a.per_doc["n_context_tokens"].tolist() != b.per_doc["n_context_tokens"].tolist() \
            or a.per_doc["n_target_tokens"].tolist() != b.per_doc["n_target_tokens"].tolist():
        raise ParityKitError("the runs tokenised the documents differently (token counts differ); compare runs of "
                             "the same items with the same tokenizer")
    by_start: dict[int, list[float]] = {}
    by_target: dict[int, list[float]] = {}
    for lp_a, lp_b, n_ctx in zip(a.per_doc["token_logprobs"], b.per_doc["token_logprobs"],
                                 a.per_doc["n_context_tokens"]):
        diff = np.asarray(lp_a) - np.asarray(lp_b)  # NLL_b - NLL_a
        for j, v in enumerate(diff):
            if np.isnan(v):
                continue
            by_start.setdefault(j, []).append(float(v))
            rel = j - int(n_ctx)
            if rel >= -context_window:
                by_target.setdefault(rel, []).append(float(v))
    rows = []
    for axis, groups in (("from_start", by_start), ("from_target", by_target)):
        for pos in sorted(groups):
            vals = np.asarray(groups[pos])
            sem = float(np.std(vals, ddof=1) / math.sqrt(vals.size)) if vals.size > 1 else math.nan
            rows.append({"axis": axis, "position": pos, "mean": float(vals.mean()), "stderr": sem,
                         "n_docs": int(vals.size)})
    return pd.DataFrame(rows, columns=["axis", "position", "mean", "stderr", "n_docs"])


# --------------------------------------------------------------------------------------------------
# tokenization provenance


Pipeline = Callable[[str], Sequence[int]] | tuple[Any, Mapping[str, Any]]


@dataclass
class TokenProvenance:
    """Token ids of several pipelines for the same text, side by side.

    ``table`` has one row per position and, per pipeline, columns ``"<name> id"`` and ``"<name> token"``
    (empty where a pipeline is shorter). ``first_difference`` is the first position where the ids differ
    (None when all agree). ``styler()`` highlights that row; ``text()`` renders it for logs.
    """

    table: pd.DataFrame
    first_difference: int | None
    summary: str
    ids: dict[str, list[int]]

    def styler(self) -> Any:
        """A pandas Styler with the first differing row highlighted."""
        first = self.first_difference

        def highlight(row: pd.Series) -> list[str]:
            hit = first is not None and row.name == first
            return ["background-color: #ffd6d6; font-weight: bold" if hit else "" for _ in row]

        return self.table.style.apply(highlight, axis=1).set_caption(self.summary)

    def _repr_html_(self) -> str:
        return self.styler().to_html()

    def text(self) -> str:
        """Plain-text rendering; the first differing row is marked with ``>>``."""
        body = self.table.reset_index().to_string(index=False).splitlines()
        lines = ["   " + body[0]]
        for pos, line in zip(self.table.index, body[1:]):
            lines.append((">> " if pos == self.first_difference else "   ") + line)
        return self.summary + "\n" + "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()


def _run_pipeline(name: str, pipeline: Any, text: str) -> tuple[list[int], Any]:
    if isinstance(pipeline, tuple):
        if len(pipeline) != 2 or not isinstance(pipeline[1], Mapping):
            raise ParityKitError(f"pipeline {name!r}: give (tokenizer, kwargs_dict) or a callable text -> ids")
        tok, kwargs = pipeline[0], dict(pipeline[1])
        # the kit's own BOS policy, applied on top of what the tokenizer call returns
        prepend = kwargs.pop("prepend_bos", None)
        bos = kwargs.pop("bos_token_id", getattr(tok, "bos_token_id", None))
        ids = [int(t) for t in tok(text, **kwargs)["input_ids"]]
        if prepend is not None:
            if bos is None:
                raise ParityKitError(f"pipeline {name!r}: prepend_bos given but the tokenizer has no BOS; "
                                     "add 'bos_token_id' to its kwargs")
            ids = ids[1:] if ids[:1] == [bos] else ids
            ids = [int(bos), *ids] if prepend else ids
        return ids, tok
    if callable(pipeline):
        return [int(t) for t in pipeline(text)], None
    raise ParityKitError(f"pipeline {name!r} is a {type(pipeline).__name__}; give (tokenizer, kwargs) or a callable")


def token_provenance(
    text: str,
    pipelines: Mapping[str, Pipeline],
    *,
    tokenizer: Any = None,
) -> TokenProvenance:
    """Diff the token ids that two or more pipelines produce for ``text``.

    A pipeline is ``(tokenizer, kwargs)`` — called as ``tokenizer(text, **kwargs)`` — or a callable
    ``text -> ids``. Callables' ids are shown as strings with ``tokenizer`` when given.

    >>> p = token_provenance("the cat", {"a": lambda t: [0, 5, 6], "b": lambda t: [5, 6]})
    >>> p.first_difference
    0
    >>> print(p.summary)
    'a' is 'b' with 1 leading token(s) [0] added; first difference at position 0
    """
    if len(pipelines) < 2:
        raise ParityKitError(f"token_provenance needs at least two pipelines to diff, got {len(pipelines)}")
    ids: dict[str, list[int]] = {}
    tokens: dict[str, list[str]] = {}
    for name, pipeline in pipelines.items():
        seq, tok = _run_pipeline(name, pipeline, text)
        tok = tok or tokenizer
        ids[name] = seq
        tokens[name] = [str(t) for t in tok.convert_ids_to_tokens(seq)] if tok is not None else [""] * len(seq)
    width = max(len(v) for v in ids.values())
    columns: dict[str, list[Any]] = {}
    for name in ids:
        pad = width - len(ids[name])
        columns[f"{name} id"] = [*ids[name], *([pd.NA] * pad)]
        columns[f"{name} token"] = [*tokens[name], *([""] * pad)]
    table = pd.DataFrame(columns, index=pd.RangeIndex(width, name="position"))
    for name in ids:
        table[f"{name} id"] = table[f"{name} id"].astype("Int64")

    seqs = list(ids.values())
    first = next((p for p in range(width) if len({tuple(s[p:p + 1]) for s in seqs}) > 1), None)
    names = list(ids)
    ref_name, ref = names[0], seqs[0]
    notes = []
    for name in names[1:]:
        other = ids[name]
        if other == ref:
            notes.append(f"{name!r} equals {ref_name!r}")
        elif len(ref) > len(other) and ref[len(ref) - len(other):] == other:
            k = len(ref) - len(other)
            notes.append(f"{ref_name!r} is {name!r} with {k} leading token(s) {ref[:k]} added")
        elif len(other) > len(ref) and other[len(other) - len(ref):] == ref:
            k = len(other) - len(ref)
            notes.append(f"{name!r} is {ref_name!r} with {k} leading token(s) {other[:k]} added")
        else:
            notes.append(f"{name!r} and {ref_name!r} differ ({len(other)} vs {len(ref)} tokens)")
    where = "all pipelines agree" if first is None else f"first difference at position {first}"
    return TokenProvenance(table=table, first_difference=first, summary="; ".join(notes) + "; " + where, ids=ids)


# --------------------------------------------------------------------------------------------------
# activation view


def bos_activation_diff(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    *,
    modules: Any = r"re:^(model\.)?(layers|blocks|h)\.\d+$",
    bos_token_id: int | None = None,
    metric: str = "rel_rms",
    tensor: str | None = None,
) -> pd.DataFrame:
    """Per-module, per-position difference of activations with vs without a leading BOS.

    Both forwards are recorded with ``pk.record``; the with-BOS recording (the reference: the condition
    the model was trained in) has its BOS position sliced off along the sequence dimension, so position
    j of both runs holds the same text token. Leaves whose dimension 1 is not the sequence (states) are
    dropped. Returns ``pk.per_token_error`` of the aligned recordings (``tensor``: the leaf to compare,
    default the modules' primary output, "output" or "output.0"): rows modules, columns text positions.

    >>> from parity_kit.models import load
    >>> model, tok = load("tiny-rwkv7")
    >>> table = bos_activation_diff(model, tok, "The cat sat on the mat")
    >>> table.shape == (model.config.num_hidden_layers, len(tok("The cat sat on the mat")["input_ids"]))
    True
    """
    from ..capture.recorder import record
    from ..comparison.compare import per_token_error
    from ..recording.model import Call, Recording

    bos = _resolve_bos(tokenizer, True, bos_token_id)
    content = [int(t) for t in _encode(tokenizer, text, False)]
    content = [t for t in content if t != bos] if content[:1] == [bos] else content
    if not content:
        raise ParityKitError(f"text {text!r} produced no tokens; give a non-empty text")
    device = next(model.parameters()).device
    with_ids = torch.tensor([[bos, *content]], device=device)
    without_ids = torch.tensor([content], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            with record(model, modules=modules, mode="tensors") as rec_with:
                model(with_ids)
            with record(model, modules=modules, mode="tensors") as rec_without:
                model(without_ids)
    finally:
        model.train(was_training)

    t = len(content)

    def aligned(tensors: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        # [B, T+1, ...] -> [B, T, ...]: position 0 is the BOS, which the other run does not have
        return {k: v[:, 1:] for k, v in tensors.items()
                if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == t + 1}

    def same_len(tensors: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in tensors.items()
                if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == t}

    ref = _rebuild(rec_with, aligned, Call, Recording)
    cand = _rebuild(rec_without, same_len, Call, Recording)
    if not ref.calls:
        raise ParityKitError(f"no recorded output of modules={modules!r} has the sequence in dimension 1; "
                             "select modules whose outputs are [batch, sequence, ...] (the decoder layers)")
    if tensor is None:
        tensor = "output" if "output" in ref.calls[0].tensors else min(ref.calls[0].outputs)
    table = per_token_error(ref, cand, metric=metric, tensor=tensor)
    table.columns = pd.RangeIndex(len(content), name="position")
    return table


def _rebuild(rec: Any, keep: Callable[[Mapping[str, Any]], dict[str, torch.Tensor]], call_cls: Any,
             recording_cls: Any) -> Any:
    calls = []
    for c in rec.calls:
        kept = keep(c.tensors)
        orig = {k: v for k, v in getattr(c, "orig_dtypes", {}).items() if k in kept}
        calls.append(call_cls(module=c.module, index=c.index, order=c.order, tensors=kept, orig_dtypes=orig))
    return recording_cls(mode=rec.mode, calls=[c for c in calls if c.tensors], metadata=dict(rec.metadata))


# --------------------------------------------------------------------------------------------------
# the BOS story: analyses composed from the functions above, used by notebooks/04_bos_token.ipynb


def reported_gap_in_stderr(reported: Mapping[str, float]) -> dict[str, float]:
    """The real case's perplexity gaps in units of the reference run's standard error (the unpaired figure).

    ``reported`` holds ``ppl_without_bos``, ``ppl_with_bos``, ``ppl_reference`` and ``stderr_reference``;
    returns ``real_case_in_stderr`` (without BOS) and ``real_case_fixed_in_stderr`` (with BOS).

    >>> gap = reported_gap_in_stderr({"ppl_without_bos": 4.3, "ppl_with_bos": 4.1, "ppl_reference": 4.1,
    ...                               "stderr_reference": 0.1})
    >>> round(gap["real_case_in_stderr"], 6), round(gap["real_case_fixed_in_stderr"], 6)
    (2.0, 0.0)
    """
    missing = [k for k in ("ppl_without_bos", "ppl_with_bos", "ppl_reference", "stderr_reference") if k not in reported]
    if missing:
        raise ParityKitError(f"reported figures lack {missing}; give ppl_without_bos, ppl_with_bos, ppl_reference "
                             "and stderr_reference as published")
    stderr = float(reported["stderr_reference"])
    if not stderr > 0:
        raise ParityKitError(f"stderr_reference={stderr} is not positive; give the reference run's standard error")
    reference = float(reported["ppl_reference"])
    return {"real_case_in_stderr": (float(reported["ppl_without_bos"]) - reference) / stderr,
            "real_case_fixed_in_stderr": (float(reported["ppl_with_bos"]) - reference) / stderr}


def compare_with_and_without_bos(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[LastWordItem],
    *,
    bos_token_id: int | None = None,
    n_bootstrap: int = 100_000,
    n_paired_bootstrap: int = 10_000,
    label: str = "",
    progress: bool = False,
) -> tuple[LastWordResult, LastWordResult, PairedComparison]:
    """Evaluate ``items`` with and without a prepended BOS and compare the two runs paired (without − with).

    The runs are labelled ``"<label> with BOS"`` and ``"<label> without BOS"``; ``n_bootstrap`` sets each
    run's perplexity standard error, ``n_paired_bootstrap`` the paired interval.

    >>> from parity_kit.models import load
    >>> model, tok = load("tiny-internlm2-llama")
    >>> items = [LastWordItem("The cat sat on the", " mat"), LastWordItem("A dog ran to the", " park")]
    >>> with_bos, without_bos, test = compare_with_and_without_bos(model, tok, items, n_bootstrap=10,
    ...                                                            n_paired_bootstrap=10)
    >>> with_bos.label, without_bos.config["prepend_bos"], test["n"]
    ('with BOS', False, 2.0)
    """
    runs = [evaluate_lastword(model, tokenizer, items, prepend_bos=flag, bos_token_id=bos_token_id,
                              n_bootstrap=n_bootstrap, progress=progress,
                              label=f"{label} {'with' if flag else 'without'} BOS".strip())
            for flag in (True, False)]
    return runs[0], runs[1], paired_comparison(runs[0], runs[1], n_bootstrap=n_paired_bootstrap)


def bos_factor_table(
    bos_tests: Mapping[str, PairedComparison],
    precision_tests: Mapping[str, PairedComparison],
    *,
    ref_dtype: str,
    cand_dtype: str,
) -> pd.DataFrame:
    """The two suspects side by side, one row per model and factor: the missing BOS (at ``ref_dtype``) and
    the low precision ``cand_dtype`` (BOS kept), each with its perplexity change, the unpaired
    "of one run's standard errors" figure, the paired z and interval, and whether it is flagged.

    >>> a = LastWordResult.from_loglikelihoods([-1.0, -2.0, -0.5, -1.5], n_bootstrap=10)
    >>> b = LastWordResult.from_loglikelihoods([-1.1, -2.1, -0.6, -1.6], n_bootstrap=10)
    >>> t = bos_factor_table({"m": paired_comparison(a, b, n_bootstrap=10)},
    ...                      {"m": paired_comparison(a, a, n_bootstrap=10)}, ref_dtype="fp32", cand_dtype="bf16")
    >>> t["factor"].tolist(), t["flagged"].tolist()
    (['no BOS (fp32)', 'bf16 (with BOS)'], [True, False])
    """
    missing = [name for name in bos_tests if name not in precision_tests]
    if missing:
        raise ParityKitError(f"no precision comparison for {missing}; run one per model that has a BOS comparison")
    return pd.DataFrame([
        {"model": name, "factor": factor, "ppl_diff": t["ppl_diff"], "in_one_run_stderr": t["ppl_diff_in_a_stderr"],
         "paired_z": t["z"], "ci_low": t["ppl_diff_ci_low"], "ci_high": t["ppl_diff_ci_high"], "flagged": t.flagged}
        for name in bos_tests
        for factor, t in ((f"no BOS ({ref_dtype})", bos_tests[name]),
                          (f"{cand_dtype} (with BOS)", precision_tests[name]))
    ])


def bos_position_effect(diff: pd.DataFrame) -> dict[str, float]:
    """Summarise a :func:`position_loss_difference` table (without − with BOS) in four numbers.

    ``first_position`` is the first text position both runs predict, ``first_position_nats`` the mean
    loss change there and ``first_position_z`` its z (0 when its standard error is 0 or unknown);
    ``target_nats_per_token`` is the change on the target tokens, weighted by how many documents have each.

    >>> diff = pd.DataFrame({"axis": ["from_start", "from_start", "from_target", "from_target"],
    ...                      "position": [1, 2, -1, 0], "mean": [0.5, 0.1, 0.2, 0.04],
    ...                      "stderr": [0.1, 0.1, 0.1, 0.02], "n_docs": [4, 4, 4, 4]})
    >>> bos_position_effect(diff)
    {'first_position': 1, 'first_position_nats': 0.5, 'first_position_z': 5.0, 'target_nats_per_token': 0.04}
    """
    start, around = diff[diff["axis"] == "from_start"], diff[diff["axis"] == "from_target"]
    on_target = around[around["position"] >= 0]
    if start.empty or on_target.empty:
        raise ParityKitError("the position table has no 'from_start' rows or no target positions; pass the table "
                             "position_loss_difference returns for two runs of the same documents")
    first = start.iloc[0]
    # a NaN standard error (a single document) gives no z, as a zero one does
    has_stderr = bool(first["stderr"] > 0)
    return {
        "first_position": int(first["position"]),
        "first_position_nats": float(first["mean"]),
        "first_position_z": float(first["mean"] / first["stderr"]) if has_stderr else 0.0,
        "target_nats_per_token": float((on_target["mean"] * on_target["n_docs"]).sum() / on_target["n_docs"].sum()),
    }


def bos_context_sweep(
    model: torch.nn.Module,
    tokenizer: Any,
    items: Sequence[LastWordItem],
    context_words: Sequence[int],
    *,
    name: str = "",
    bos_token_id: int | None = None,
    n_bootstrap: int = 10_000,
) -> pd.DataFrame:
    """Cut every context to its last *k* words (target unchanged) and compare with vs without BOS per *k*.

    One row per *k*: ``model, context_words, ppl_with_bos, ppl_without_bos, ppl_diff, ci_low, ci_high, z,
    flagged`` (the paired statistics of without − with BOS; ``n_bootstrap`` is used for both the runs'
    and the paired bootstrap). The frame is what ``pk.plots.bos_effect_by_context_length`` draws.

    >>> from parity_kit.models import load
    >>> model, tok = load("tiny-internlm2-llama")
    >>> items = [LastWordItem("so the cat sat on the", " mat"), LastWordItem("and a dog ran to the", " park")]
    >>> bos_context_sweep(model, tok, items, [2, 4], name="m", n_bootstrap=10)["context_words"].tolist()
    [2, 4]
    """
    if not context_words or any(int(k) < 1 for k in context_words):
        raise ParityKitError(f"context_words={list(context_words)}; give one or more positive word counts")
    rows = []
    for k in context_words:
        short = [LastWordItem(" ".join(it.context.split()[-int(k):]), it.target) for it in items]
        with_bos, without_bos, t = compare_with_and_without_bos(model, tokenizer, short, bos_token_id=bos_token_id,
                                                                n_bootstrap=n_bootstrap, n_paired_bootstrap=n_bootstrap)
        rows.append({"model": name, "context_words": int(k), "ppl_with_bos": with_bos.ppl,
                     "ppl_without_bos": without_bos.ppl, "ppl_diff": t["ppl_diff"], "ci_low": t["ppl_diff_ci_low"],
                     "ci_high": t["ppl_diff_ci_high"], "z": t["z"], "flagged": t.flagged})
    return pd.DataFrame(rows)


def bos_activation_summary(views: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The last layer's row of each :func:`bos_activation_diff` table: its value at the first and the last
    text position and its median, one row per model.

    >>> view = pd.DataFrame([[0.5, 0.2, 0.1], [0.9, 0.3, 0.2]], index=["layers.0", "layers.1"])
    >>> bos_activation_summary({"m": view}).loc["m"].tolist()
    [0.9, 0.2, 0.3]
    """
    empty = [name for name, view in views.items() if view.empty]
    if empty:
        raise ParityKitError(f"activation tables of {empty} are empty; pass the tables bos_activation_diff returns")
    last = {name: view.iloc[-1] for name, view in views.items()}
    return pd.DataFrame({name: {"first position": row.iloc[0], "last position": row.iloc[-1], "median": row.median()}
                         for name, row in last.items()}).T


def _describe_bos_effect(
    name: str,
    with_bos: LastWordResult,
    without_bos: LastWordResult,
    b: PairedComparison,
    p: PairedComparison,
    effect: Mapping[str, float],
    rows: pd.DataFrame,
    ref_dtype: str,
    cand_dtype: str,
) -> str:
    text = (f"{name}: without BOS the last-word perplexity goes from {with_bos.ppl:.4g} ± {with_bos.ppl_stderr:.2g} "
            f"to {without_bos.ppl:.4g} ± {without_bos.ppl_stderr:.2g} ({b['ppl_diff_in_a_stderr']:+.2f} of one run's "
            f"standard errors; paired z = {b['z']:.1f}, 95% interval of the difference "
            f"[{b['ppl_diff_ci_low']:.3g}, {b['ppl_diff_ci_high']:.3g}]): "
            + (f"a real effect, {'lower' if b['ppl_diff'] < 0 else 'higher'} without BOS. " if b.flagged
               else "no detectable effect. ")
            + f"{cand_dtype} instead of {ref_dtype}, BOS kept, changes it by {p['ppl_diff']:+.3g} "
            f"(paired z = {p['z']:.1f}): "
            + ("a real effect" if p.flagged else "not distinguishable from zero") + ". ")
    ratio = abs(b["ppl_diff"]) / abs(p["ppl_diff"]) if p["ppl_diff"] else math.inf
    if b.flagged and (not p.flagged or ratio > 1):
        text += f"The missing BOS matters more than precision ({ratio:.3g}× its perplexity change). "
    elif p.flagged:
        text += f"Precision moves the score more than the missing BOS ({1 / ratio:.3g}× its perplexity change). "
    else:
        text += "Neither factor moves the last-word score on these documents. "
    where = (f"at text position {effect['first_position']} a missing BOS changes the loss by "
             f"{effect['first_position_nats']:+.3g} nats (z = {effect['first_position_z']:.1f}), "
             "on the target tokens by "
             f"{effect['target_nats_per_token']:+.3g} nats per token")
    detected = rows[rows["flagged"]]
    if len(detected):
        clearest = detected.loc[detected["z"].abs().idxmax()]
        lower = clearest["ppl_diff"] < 0
        reading = ("a BOS in front of a fragment that does not start a document misleads the model more than a missing "
                   "one" if lower else "with little context the model relies on the BOS")
        text += (f"The clearest cut is the last {int(clearest['context_words'])} words: the last-word perplexity is "
                 f"{'lower' if lower else 'higher'} without BOS ({clearest['ppl_diff']:+.4g}, paired z = "
                 f"{clearest['z']:.1f}, 95% interval [{clearest['ci_low']:.4g}, {clearest['ci_high']:.4g}]) — "
                 f"{reading}; {len(detected)} of {len(rows)} cuts are flagged. ")
    else:
        text += (f"Even with contexts cut to {int(rows['context_words'].min())} words the missing BOS does not change "
                 "the last word's perplexity detectably. ")
    if abs(effect["first_position_z"]) > 3 and not b.flagged:
        text += f"The model does notice the missing BOS, but only early: {where}, so it recovers before the last word. "
    elif abs(effect["first_position_z"]) > 3:
        text += f"Where it acts: {where}. "
    else:
        text += f"The model hardly uses the BOS at all: {where}. "
    return text


def _bos_story_figures(
    key: str,
    runs: Mapping[tuple[str, str, bool], LastWordResult],
    tests: Mapping[str, PairedComparison],
    effect: Mapping[str, float],
    rows: pd.DataFrame,
    activation: pd.Series,
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for (_, run_dtype, prepend), r in runs.items():
        tag = f"{key}_{run_dtype}_{'bos' if prepend else 'nobos'}"
        figures.update({f"{tag}_ppl": r.ppl, f"{tag}_ppl_stderr": r.ppl_stderr,
                        f"{tag}_acc": r.acc, f"{tag}_acc_stderr": r.acc_stderr})
    for factor, test in tests.items():
        for stat in ("ppl_diff", "ppl_diff_in_a_stderr", "mean_ll_diff", "mean_ll_diff_stderr", "z",
                     "ppl_diff_ci_low", "ppl_diff_ci_high", "acc_diff", "acc_diff_stderr"):
            figures[f"{key}_{factor}_{stat}"] = test[stat]
        figures[f"{key}_{factor}_flagged"] = int(test.flagged)
    figures.update({f"{key}_{k}": v for k, v in effect.items()})
    for _, srow in rows.iterrows():
        tag = f"{key}_ctx{int(srow['context_words'])}"
        figures.update({f"{tag}_ppl_diff": srow["ppl_diff"], f"{tag}_ci_low": srow["ci_low"],
                        f"{tag}_ci_high": srow["ci_high"], f"{tag}_z": srow["z"],
                        f"{tag}_flagged": int(srow["flagged"])})
    figures.update({f"{key}_act_last_layer_first_position": activation["first position"],
                    f"{key}_act_last_layer_last_position": activation["last position"]})
    return figures


def conclude_bos_story(
    results: Mapping[tuple[str, str, bool], LastWordResult],
    bos_tests: Mapping[str, PairedComparison],
    precision_tests: Mapping[str, PairedComparison],
    position_effects: Mapping[str, Mapping[str, float]],
    sweep: pd.DataFrame,
    activation_summary: pd.DataFrame,
    *,
    ref_dtype: str,
    cand_dtype: str,
    leading_figures: Mapping[str, float] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The BOS story's conclusion and the findings figures it relies on, built from the measured tables.

    Per model (the keys of ``bos_tests``, in order), the text states the BOS effect at ``ref_dtype`` and the
    precision effect (``cand_dtype``, BOS kept), which of the two moves the score more, the clearest flagged
    context cut of ``sweep`` (or that none is flagged), and where the model notices the BOS
    (``position_effects``: :func:`bos_position_effect`). ``results`` is keyed ``(model, dtype, prepend_bos)``;
    ``activation_summary`` is :func:`bos_activation_summary`'s table. ``figures`` starts with
    ``leading_figures`` and holds every number the text quotes, with keys ``<model>_...`` (dashes → ``_``).

    >>> a = LastWordResult.from_loglikelihoods([-1.0, -2.0, -0.5, -1.5], n_bootstrap=10, label="with")
    >>> b = LastWordResult.from_loglikelihoods([-1.5, -2.5, -1.0, -2.0], n_bootstrap=10, label="without")
    >>> effect = {"first_position": 1, "first_position_nats": 0.5, "first_position_z": 5.0,
    ...           "target_nats_per_token": 0.5}
    >>> sweep = pd.DataFrame({"model": ["m"], "context_words": [2], "ppl_diff": [0.1], "ci_low": [-0.1],
    ...                       "ci_high": [0.3], "z": [1.0], "flagged": [False]})
    >>> acts = pd.DataFrame({"first position": [0.3], "last position": [0.1], "median": [0.2]}, index=["m"])
    >>> text, figures = conclude_bos_story({("m", "fp32", True): a, ("m", "fp32", False): b},
    ...     {"m": paired_comparison(a, b, n_bootstrap=10)}, {"m": paired_comparison(a, a, n_bootstrap=10)},
    ...     {"m": effect}, sweep, acts, ref_dtype="fp32", cand_dtype="bf16")
    >>> "The missing BOS matters more than precision" in text, figures["m_bos_flagged"]
    (True, 1)
    """
    figures: dict[str, Any] = dict(leading_figures or {})
    texts = []
    for name, b in bos_tests.items():
        needed = {"precision comparison": name in precision_tests, "position effect": name in position_effects,
                  f"run at {ref_dtype} with BOS": (name, ref_dtype, True) in results,
                  f"run at {ref_dtype} without BOS": (name, ref_dtype, False) in results,
                  "activation summary row": name in activation_summary.index}
        rows = sweep[sweep["model"] == name]
        needed["context-length sweep rows"] = not rows.empty
        lacking = [what for what, present in needed.items() if not present]
        if lacking:
            raise ParityKitError(f"model {name!r} has no {', no '.join(lacking)}; measure every part of the story for "
                                 "each model before concluding")
        p, effect = precision_tests[name], position_effects[name]
        texts.append(_describe_bos_effect(name, results[(name, ref_dtype, True)], results[(name, ref_dtype, False)],
                                          b, p, effect, rows, ref_dtype, cand_dtype))
        runs = {k: r for k, r in results.items() if k[0] == name}
        figures.update(_bos_story_figures(name.replace("-", "_"), runs, {"bos": b, "precision": p}, effect, rows,
                                          activation_summary.loc[name]))
    return " ".join(texts), figures
