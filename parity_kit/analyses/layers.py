"""Layer by layer: record two models module by module on one prompt and follow the residual stream.

:func:`layer_comparison` records both models and compares them through a module mapping (InternLM2 → Llama
by default for an InternLM2 original); :func:`layer_profile` reads the embedding, each decoder layer, the
final norm and the logits out of that table, each with its floor.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd
import torch
from torch import nn

from .._util.calling import model_device
from ..capture import record
from ..comparison import compare
from ..comparison.mapping import internlm2_to_llama
from ..comparison.metrics import nominal_floor
from ..errors import ParityKitError
from .decoding import PromptLike, check_context, encode_prompt


def layer_comparison(
    original: nn.Module,
    converted: nn.Module,
    input_ids: PromptLike,
    *,
    mapping: Any | None = None,
    tokenizer: Any | None = None,
    modules: Any = "*",
) -> pd.DataFrame:
    """Record both models module by module on one prompt and compare them (``pk.compare``'s table).

    ``mapping`` defaults to ``parity_kit.comparison.mapping.internlm2_to_llama(original.config)`` when the original
    is an InternLM2 model (fused ``wqkv`` split into q/k/v, modules renamed), else to identical names.
    The table's ``floor``/``verdict`` columns tell whether each difference stays at the rounding floor.

    >>> import torch
    >>> from parity_kit.testing import tiny_llama
    >>> m = tiny_llama(layers=1)
    >>> table = layer_comparison(m, m, [1, 2, 3])
    >>> float(table.loc[table["status"] == "ok", "rel_rms"].max())
    0.0
    """
    ids = encode_prompt(input_ids, tokenizer, "input_ids")
    check_context([original, converted], len(ids), 0, "input_ids")
    if mapping is None and getattr(getattr(original, "config", None), "model_type", None) == "internlm2":
        mapping = internlm2_to_llama(original.config)
    with torch.no_grad():
        with record(original, modules=modules) as ref_rec:
            original(input_ids=torch.tensor([ids], device=model_device(original)), use_cache=False)
        with record(converted, modules=modules) as cand_rec:
            converted(input_ids=torch.tensor([ids], device=model_device(converted)), use_cache=False)
    return compare(ref_rec, cand_rec, mapping=mapping)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


_EMBEDDINGS = ("model.tok_embeddings", "model.embed_tokens", "model.embeddings", "transformer.wte")


_FINAL_NORMS = ("model.norm", "transformer.ln_f")


_HEADS = ("output", "lm_head")


def layer_profile(table: pd.DataFrame, *, metric: str = "rel_rms") -> pd.DataFrame:
    """The residual stream of a :func:`layer_comparison` table: embedding, each decoder layer, final norm, logits.

    Columns ``position`` (0, 1, …), ``label`` ("embed", "0" … "L−1", "norm", "logits"), ``module``,
    ``<metric>``, ``floor`` (``compare``'s floor where it is positive, else :func:`parity_kit.comparison.metrics.nominal_floor` of the
    candidate dtype) and ``floor_ratio``.

    >>> t = pd.DataFrame({"module": ["model.layers.0", "model.layers.0.mlp", "model.layers.1"], "call": [0, 0, 0],
    ...                   "tensor": ["output"] * 3, "rel_rms": [0.0, 1e-3, 2e-7], "floor": [0.0] * 3,
    ...                   "cand_dtype": ["fp32"] * 3, "status": ["ok"] * 3})
    >>> layer_profile(t)["label"].tolist()
    ['0', '1']
    """
    picked: dict[tuple[int, int], dict[str, Any]] = {}
    for _, row in table.iterrows():
        if row.get("status", "ok") != "ok" or int(row.get("call", 0)) != 0:
            continue
        if str(row.get("tensor", "output")) not in ("output", "output.0", "output.logits", "output.last_hidden_state"):
            continue
        module = str(row["module"])
        match = _LAYER.search(module)
        if match is not None:
            key, label = (1, int(match.group(1))), match.group(1)
        elif module in _EMBEDDINGS:
            key, label = (0, 0), "embed"
        elif module in _FINAL_NORMS:
            key, label = (2, 0), "norm"
        elif module in _HEADS:
            key, label = (3, 0), "logits"
        else:
            continue
        floor = float(row["floor"]) if "floor" in row and pd.notna(row["floor"]) else 0.0
        if floor <= 0 and pd.notna(row.get("cand_dtype")):
            floor = nominal_floor(str(row["cand_dtype"]))
        picked.setdefault(key, {"label": label, "module": module, metric: float(row[metric]), "floor": floor})
    if not any(key[0] == 1 for key in picked):
        raise ParityKitError(
            "the comparison table has no decoder-layer outputs (modules named '…layers.<i>'); record with "
            "modules='*' or include 'model.layers.*'")
    profile = pd.DataFrame([picked[k] for k in sorted(picked)])
    profile.insert(0, "position", range(len(profile)))
    profile["floor_ratio"] = profile[metric] / profile["floor"]
    return profile
