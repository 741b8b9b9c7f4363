"""Where the tokens come from, and where a missing BOS acts.

:func:`token_provenance` runs one text through several tokenization pipelines and diffs the ids, special
tokens and positions they produce (the source of most "logits don't match" reports). :func:`bos_activation_diff`
records a model with and without a leading BOS and shows, module by module and position by position, how far
the activations move.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from ..capture import record
from ..comparison import per_token_error
from ..errors import ParityKitError
from ..recording import Call, Recording
from .evaluation import encode_text, resolve_bos


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
    bos = resolve_bos(tokenizer, True, bos_token_id)
    content = [int(t) for t in encode_text(tokenizer, text, False)]
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


Pipeline = Callable[[str], Sequence[int]] | tuple[Any, Mapping[str, Any]]
