"""Chunked vs recurrent prefill inside a whole RWKV-7 model: every recorded tensor and the last-word score.

:func:`capture_wkv_inputs` takes one layer's real WKV inputs from a forward (to feed the kernel-level harness of
:mod:`parity_kit.analyses.prefill`); :func:`model_mode_comparison` runs the model in each WKV mode and dtype and
compares every recorded tensor with an fp64 run; :func:`mode_verdicts` judges every module of each mode by the calibrated floor; :func:`lastword_by_mode` scores
each mode on the last-word set.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from ..capture import record
from ..comparison import compare
from ..dtypes import DtypeLike, dtype_name, parse_dtype
from ..errors import ParityKitError
from ..models.rwkv7 import set_wkv_mode
from .calibration import ModelComparison, compare_models
from .evaluation import evaluate_lastword
from .paired import paired_comparison
from .prefill import WKVInputs


# the same modes as switches of parity_kit.models.rwkv7.set_wkv_mode
_MODEL_MODES: dict[str, dict[str, str]] = {
    "recurrent_fp32_state": {"mode": "recurrent", "state_dtype": "fp32"},
    "recurrent_low_state": {"mode": "recurrent", "state_dtype": "model"},
    "chunk_fp32": {"mode": "chunk", "intermediate_dtype": "fp32"},
    "chunk_low": {"mode": "chunk", "intermediate_dtype": "input"},
}


def _wkv_module_name(model: torch.nn.Module, layer: int) -> str:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(layers[0].attn, "wkv"):
        raise ParityKitError(f"{type(model).__name__} has no model.layers[i].attn.wkv module; pass a parity_kit "
                             "RWKV7ForCausalLM (pk.models.load('tiny-rwkv7') or a local RWKV-7 folder)")
    if not -len(layers) <= layer < len(layers):
        raise ParityKitError(f"layer={layer} is out of range: the model has {len(layers)} layers (0…{len(layers) - 1})")
    return f"model.layers.{layer % len(layers)}.attn.wkv"


def capture_wkv_inputs(model: torch.nn.Module, input_ids: torch.Tensor, layer: int = 0) -> WKVInputs:
    """The WKV inputs ``(r, w, k, v, a, b)`` of one layer during a real forward of ``model`` on ``input_ids``.

    They come back in the model's dtype; run the model in fp32 or fp64 so they can serve as the
    "unrounded" inputs of :func:`compare_prefill`.

    >>> import torch
    >>> from parity_kit.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
    >>> cfg = RWKV7Config(hidden_size=32, num_hidden_layers=2, head_dim=16, vocab_size=20, decay_low_rank_dim=8,
    ...                   gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8)
    >>> r, w, k, v, a, b = capture_wkv_inputs(RWKV7ForCausalLM(cfg).eval(), torch.tensor([[0, 3, 4]]), layer=1)
    >>> tuple(r.shape)
    (1, 3, 2, 16)
    """

    name = _wkv_module_name(model, layer)
    with torch.no_grad(), record(model, modules=[name], inputs=True) as rec:
        model(input_ids, use_cache=False)
    call = rec[name][0]
    return tuple(call.tensors[f"input.{i}"] for i in range(6))  # type: ignore[return-value]


@dataclass
class ModelModeComparison:
    """Result of :func:`model_mode_comparison`.

    ``summary``: per (dtype, mode) and tensor (``logits``; ``layer i wkv output``, ``layer i wkv state``,
    ``layer i block output``) the errors against the reference, with ``layer`` (None for logits).
    ``tables``: the full :func:`parity_kit.compare` table per ``(dtype, mode)``.
    """

    summary: pd.DataFrame
    tables: dict[tuple[str, str], pd.DataFrame]
    reference: str

    def _repr_html_(self) -> str:
        return self.summary._repr_html_()  # type: ignore[operator]


def _model_variant(master: torch.nn.Module, dtype: torch.dtype, mode: str, chunk_size: int) -> torch.nn.Module:

    model = copy.deepcopy(master).to(dtype).eval()
    if mode == "reference":
        set_wkv_mode(model, "fp64")
    else:
        set_wkv_mode(model, chunk_size=chunk_size, **_MODEL_MODES[mode])
    return model


def _check_model_modes(modes: Sequence[str]) -> None:
    for mode in modes:
        if mode not in _MODEL_MODES:
            raise ParityKitError(f"model mode {mode!r} is not one of {list(_MODEL_MODES)} (FLA modes run on "
                                 "kernels only, not inside parity_kit's model)")


def model_mode_comparison(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    dtypes: Iterable[DtypeLike] = ("bf16", "fp16"),
    modes: Iterable[str] = ("recurrent_fp32_state", "chunk_low"),
    chunk_size: int = 64,
    reference_dtype: DtypeLike = "fp64",
) -> ModelModeComparison:
    """Forward ``model`` in every (dtype, WKV mode) and compare logits and every layer's WKV output,
    WKV state and block output with a reference forward (``reference_dtype`` weights, WKV in fp64),
    through :func:`parity_kit.compare`. ``model`` itself is not modified (copies are cast).

    >>> import torch
    >>> from parity_kit.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
    >>> cfg = RWKV7Config(hidden_size=32, num_hidden_layers=2, head_dim=16, vocab_size=20, decay_low_rank_dim=8,
    ...                   gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8)
    >>> res = model_mode_comparison(RWKV7ForCausalLM(cfg).eval(), torch.tensor([[0, 3, 4, 5]]), dtypes=["fp32"],
    ...                             chunk_size=2)
    >>> sorted(res.summary["mode"].unique())
    ['chunk_low', 'recurrent_fp32_state']
    """

    modes = list(modes)
    _check_model_modes(modes)
    layers = len(model.model.layers)  # type: ignore[union-attr]
    _wkv_module_name(model, 0)
    names = ["", *[f"model.layers.{i}" for i in range(layers)], *[f"model.layers.{i}.attn.wkv" for i in range(layers)]]
    master = _model_variant(model, parse_dtype(reference_dtype), "reference", chunk_size)
    device = next(model.parameters()).device
    ids = input_ids.to(device)

    def recorded(m: torch.nn.Module) -> Any:
        with torch.no_grad(), record(m, modules=names) as rec:
            m(ids, use_cache=False)
        return rec

    ref_rec = recorded(master)
    rows, tables = [], {}
    for dtype in dtypes:
        torch_dtype = parse_dtype(dtype)
        for mode in modes:
            cand = _model_variant(master, torch_dtype, mode, chunk_size)
            table = compare(ref_rec, recorded(cand))
            del cand
            tables[(dtype_name(torch_dtype), mode)] = table
            for _, row in table[table["status"] == "ok"].iterrows():
                module, leaf = row["module"], row["tensor"]
                if module == "":
                    if leaf != "output.logits":
                        continue
                    label, layer = "logits", None
                else:
                    layer = int(module.split(".")[2])
                    if module.endswith(".attn.wkv"):
                        label = {"output.0": "wkv output", "output.1": "wkv state"}.get(leaf)
                    else:
                        label = "block output" if leaf == "output.0" else None
                    if label is None:
                        continue
                rows.append({"dtype": dtype_name(torch_dtype), "mode": mode, "tensor": label, "layer": layer,
                             "max_abs": row["max_abs"], "mean_abs": row["mean_abs"], "rel_rms": row["rel_rms"],
                             "floor": row["floor"], "verdict": row["verdict"]})
    return ModelModeComparison(pd.DataFrame(rows), tables, dtype_name(parse_dtype(reference_dtype)))


def mode_verdicts(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    dtype: DtypeLike = "bf16",
    modes: Iterable[str] = ("recurrent_fp32_state", "chunk_low"),
    chunk_size: int = 64,
    modules: Any = "*",
) -> dict[str, ModelComparison]:
    """Each WKV mode of ``model`` in ``dtype`` against the reference forward (fp64 weights, WKV in fp64), every
    selected module judged by the calibrated floor (:func:`parity_kit.compare_models`): the floor is what a
    rounding-only run in ``dtype`` shows there, so a mode whose WKV loses more than rounding at its boundaries
    explains reads "own error above floor" at the WKV op. Keyed by mode; ``model`` itself is not modified.

    >>> from parity_kit.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
    >>> cfg = RWKV7Config(hidden_size=32, num_hidden_layers=2, head_dim=16, vocab_size=20, decay_low_rank_dim=8,
    ...                   gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8)
    >>> v = mode_verdicts(RWKV7ForCausalLM(cfg).eval(), torch.tensor([[0, 3, 4, 5]]), chunk_size=2)
    >>> sorted(v), v["chunk_low"].verdict["n_modules"] > 0
    (['chunk_low', 'recurrent_fp32_state'], True)
    """
    modes = list(modes)
    _check_model_modes(modes)
    master = _model_variant(model, torch.float64, "reference", chunk_size)
    ids = input_ids.to(next(model.parameters()).device)
    out = {}
    for mode in modes:
        cand = _model_variant(master, parse_dtype(dtype), mode, chunk_size)
        out[mode] = compare_models(master, cand, ids, modules=modules, show_progress=False)
        del cand
    return out


def lastword_by_mode(
    model: torch.nn.Module,
    tokenizer: Any,
    path: Any,
    *,
    dtypes: Iterable[DtypeLike] = ("bf16", "fp16"),
    modes: Iterable[str] = ("recurrent_fp32_state", "chunk_low"),
    chunk_size: int = 64,
    reference_dtype: DtypeLike = "fp64",
    limit: int | None = None,
    n_bootstrap: int = 10_000,
) -> pd.DataFrame:
    """Last-word perplexity and accuracy of every (dtype, mode), plus the reference (``reference_dtype``
    weights, fp64 WKV), via :func:`parity_kit.evaluate_lastword` (BOS prepended); with the paired
    difference in mean log-likelihood against the reference and its z score. A mode whose logits overflow
    gets ``status`` "non-finite logits" and NaN figures instead of stopping the whole table.

    >>> table = lastword_by_mode(model, tok, "parity_kit/data/eval/lastword.jsonl", limit=20)  # doctest: +SKIP
    >>> list(table.columns)[:4]  # doctest: +SKIP
    ['dtype', 'mode', 'ppl', 'ppl_stderr']
    """

    modes = list(modes)
    _check_model_modes(modes)
    master = _model_variant(model, parse_dtype(reference_dtype), "reference", chunk_size)
    ref = evaluate_lastword(master, tokenizer, path, limit=limit, n_bootstrap=n_bootstrap, progress=False,
                            label="reference")
    rows = [{"dtype": dtype_name(parse_dtype(reference_dtype)), "mode": "reference", "ppl": ref.ppl,
             "ppl_stderr": ref.ppl_stderr, "acc": ref.acc, "acc_stderr": ref.acc_stderr, "n": ref.n,
             "mean_nll_diff": 0.0, "z": math.nan, "status": "ok"}]
    for dtype in dtypes:
        torch_dtype = parse_dtype(dtype)
        for mode in modes:
            cand = _model_variant(master, torch_dtype, mode, chunk_size)
            head = {"dtype": dtype_name(torch_dtype), "mode": mode}
            try:
                res = evaluate_lastword(cand, tokenizer, path, limit=limit, n_bootstrap=n_bootstrap, progress=False,
                                        label=f"{dtype_name(torch_dtype)} {mode}")
            except ParityKitError as e:
                if "non-finite" not in str(e):
                    raise
                # an overflowing mode is a result of this comparison, not a reason to lose the others
                rows.append({**head, "ppl": math.nan, "ppl_stderr": math.nan, "acc": math.nan,
                             "acc_stderr": math.nan, "n": ref.n, "mean_nll_diff": math.nan, "z": math.nan,
                             "status": "non-finite logits"})
                continue
            finally:
                del cand
            paired = paired_comparison(ref, res, n_bootstrap=min(n_bootstrap, 2000))
            rows.append({**head, "ppl": res.ppl, "ppl_stderr": res.ppl_stderr, "acc": res.acc,
                         "acc_stderr": res.acc_stderr, "n": res.n, "mean_nll_diff": paired["mean_nll_diff"],
                         "z": paired["z"], "status": "ok"})
    return pd.DataFrame(rows)
