"""The static checks of a triage (:func:`parity_kit.triage`): which module mapping joins two models, which
configuration fields that change numerics differ, and which weights differ under the mapping.

None of these runs a model: they read configs and parameters, so they are cheap and run first.

>>> from parity_kit.testing import tiny_llama
>>> a, b = tiny_llama(layers=1), tiny_llama(layers=1)
>>> detect_mapping(a, b)[1], config_diff(a, b).empty, weight_diff(a, b, None)["status"].unique().tolist()
('identity', True, ['same'])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch
from torch import nn

from .._util.calling import model_dtype
from ..comparison.mapping import ModuleMapping, internlm2_to_llama
from ..dtypes import dtype_name
from ..errors import ParityKitError

#: Configuration fields that change what the model computes, by the name the triage reports them under,
#: with the spellings different architectures use (first present wins).
NUMERICS_FIELDS: dict[str, tuple[str, ...]] = {
    "norm_eps": ("rms_norm_eps", "norm_eps", "layer_norm_eps", "layer_norm_epsilon"),
    "rope_theta": ("rope_theta",),
    "rope_scaling": ("rope_scaling",),
    "num_attention_heads": ("num_attention_heads", "num_heads", "n_head"),
    "num_key_value_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "hidden_size": ("hidden_size", "n_embd"),
    "intermediate_size": ("intermediate_size",),
    "num_hidden_layers": ("num_hidden_layers", "n_layer"),
    "vocab_size": ("vocab_size",),
    "hidden_act": ("hidden_act", "activation_function"),
    "tie_word_embeddings": ("tie_word_embeddings",),
    "max_position_embeddings": ("max_position_embeddings",),
    "attention_bias": ("attention_bias", "bias"),
    "wkv_mode": ("wkv_mode",),
    "chunk_size": ("chunk_size",),
    "wkv_state_dtype": ("wkv_state_dtype",),
    "gn_fp32": ("gn_fp32",),
}
#: Fields that are the settings under test (the run's dtype and attention kernel), reported but never a cause
#: by themselves: whether they explain the difference is what the precision step measures.
SETTINGS_FIELDS = ("dtype", "attn_implementation")
#: What to try when a field differs.
FIELD_ADVICE = {
    "norm_eps": "set the candidate's epsilon to the reference's value (a config copied from another checkpoint?)",
    "rope_theta": "set the candidate's rope_theta to the reference's value (check rope_parameters too)",
    "rope_scaling": "give the candidate the reference's rope scaling (type and factor)",
    "tie_word_embeddings": "tie or untie the output embedding as the reference does",
    "hidden_act": "use the reference's activation function",
}


def _config_dict(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


def _rope(d: Mapping[str, Any]) -> tuple[Any, Any]:
    """(theta, scaling) from either spelling: ``rope_theta``/``rope_scaling`` or transformers 5's ``rope_parameters``."""
    params = d.get("rope_parameters")
    params = params if isinstance(params, Mapping) else {}
    theta = d.get("rope_theta", params.get("rope_theta"))
    scaling = d.get("rope_scaling")
    if not isinstance(scaling, Mapping) and params.get("rope_type", "default") != "default":
        scaling = params
    if isinstance(scaling, Mapping):
        kind = scaling.get("rope_type", scaling.get("type"))
        scaling = None if kind in (None, "default") else {"type": kind, "factor": scaling.get("factor")}
    return theta, scaling


def numerics_config(model: nn.Module) -> dict[str, Any]:
    """The numerics fields of ``model.config`` under the triage's names, plus the settings (dtype, attention).

    >>> from parity_kit.testing import tiny_llama
    >>> c = numerics_config(tiny_llama(layers=1))
    >>> c["norm_eps"], c["dtype"], c["rope_scaling"]
    (1e-06, 'fp32', None)
    """
    d = _config_dict(model)
    out: dict[str, Any] = {}
    for name, spellings in NUMERICS_FIELDS.items():
        out[name] = next((d[s] for s in spellings if d.get(s) is not None), None)
    out["rope_theta"], out["rope_scaling"] = _rope(d)
    if out["head_dim"] is None and out["hidden_size"] and out["num_attention_heads"]:
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    if out["num_key_value_heads"] is None and d:
        out["num_key_value_heads"] = out["num_attention_heads"]
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None) or d.get("attn_implementation")
    out["attn_implementation"] = attn
    out["dtype"] = dtype_name(model_dtype(model))
    return out


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return not math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a != b


def config_diff(ref: nn.Module, cand: nn.Module) -> pd.DataFrame:
    """The numerics fields and settings whose values differ: columns ``field, reference, candidate, kind``
    (``kind`` "numerics" or "setting"). A field one config lacks is not compared (architectures spell some
    things in code, not in the config).

    >>> from parity_kit.testing import tiny_llama
    >>> cand = tiny_llama(layers=1)
    >>> cand.config.rms_norm_eps = 1e-5
    >>> config_diff(tiny_llama(layers=1), cand)[["field", "reference", "candidate"]].values.tolist()
    [['norm_eps', 1e-06, 1e-05]]
    """
    a, b = numerics_config(ref), numerics_config(cand)
    rows = []
    for name in a:
        if name not in SETTINGS_FIELDS and (a[name] is None or b[name] is None):
            continue
        if _differs(a[name], b[name]):
            rows.append({"field": name, "reference": a[name], "candidate": b[name],
                         "kind": "setting" if name in SETTINGS_FIELDS else "numerics"})
    return pd.DataFrame(rows, columns=["field", "reference", "candidate", "kind"])


def detect_mapping(ref: nn.Module, cand: nn.Module) -> tuple[ModuleMapping | None, str]:
    """The module mapping between two models and its name: ``"identity"`` for one architecture (or the same
    module names), ``"internlm2_to_llama"`` for an InternLM2 reference and its Llama conversion.

    >>> from parity_kit.testing import tiny_llama, tiny_gpt2
    >>> detect_mapping(tiny_llama(layers=1), tiny_gpt2())
    Traceback (most recent call last):
    ...
    parity_kit.errors.ParityKitError: no module mapping is known from LlamaForCausalLM to GPT2LMHeadModel (their module names differ); pass mapping= (a dict or a pk.ModuleMapping) to pk.triage
    """
    ref_type = getattr(getattr(ref, "config", None), "model_type", None)
    cand_type = getattr(getattr(cand, "config", None), "model_type", None)
    if ref_type == "internlm2" and cand_type == "llama":
        return internlm2_to_llama(ref.config), "internlm2_to_llama"
    if ref_type == cand_type and ref_type is not None:
        return None, "identity"
    ref_names = {n for n, _ in ref.named_modules()}
    if ref_names == {n for n, _ in cand.named_modules()}:
        return None, "identity"
    raise ParityKitError(
        f"no module mapping is known from {type(ref).__name__} to {type(cand).__name__} (their module names "
        "differ); pass mapping= (a dict or a pk.ModuleMapping) to pk.triage")


def _direct_params(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {name: dict(m.named_parameters(recurse=False)) for name, m in model.named_modules()
            if any(True for _ in m.named_parameters(recurse=False))}


def _mapped_param(module: nn.Module, param: torch.Tensor, transform: Any) -> torch.Tensor:
    """A reference parameter cut by the output transform of its module's mapping. The transform acts on the
    output's last dimension, which indexes a Linear weight's rows: it is applied to the transposed weight."""
    if transform is None:
        return param
    if isinstance(module, nn.Linear) and param.dim() == 2:
        return transform(param.t()).t()
    return transform(param)


def _tensor_row(ref_name: str, cand_name: str, ref_t: torch.Tensor, cand_t: torch.Tensor) -> dict[str, Any]:
    row: dict[str, Any] = {"reference": ref_name, "candidate": cand_name, "shape": tuple(cand_t.shape),
                           "ref_dtype": dtype_name(ref_t.dtype), "cand_dtype": dtype_name(cand_t.dtype)}
    if tuple(ref_t.shape) != tuple(cand_t.shape):
        return {**row, "shape": f"{tuple(ref_t.shape)} vs {tuple(cand_t.shape)}", "max_abs": math.nan,
                "rel_rms": math.nan, "status": "shape mismatch"}
    # both rounded to the narrower dtype: a cast alone then leaves no difference at all
    narrow = ref_t.dtype if torch.finfo(ref_t.dtype).eps > torch.finfo(cand_t.dtype).eps else cand_t.dtype
    r = ref_t.detach().to("cpu", narrow).double()
    c = cand_t.detach().to("cpu", narrow).double()
    diff = c - r
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    scale = float(r.pow(2).mean().sqrt()) if r.numel() else 0.0
    rel = float(diff.pow(2).mean().sqrt()) / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    status = "same" if rel <= torch.finfo(narrow).eps else "differs"
    return {**row, "max_abs": max_abs, "rel_rms": rel, "status": status}


def weight_diff(ref: nn.Module, cand: nn.Module, mapping: ModuleMapping | None) -> pd.DataFrame:
    """Every parameter of the reference against its counterpart under ``mapping`` (None: the same names).

    Columns ``reference, candidate, shape, ref_dtype, cand_dtype, max_abs, rel_rms, status``; both tensors are
    rounded to the narrower dtype first, so a cast alone reads "same"; "differs" means rel_rms above one unit
    roundoff of that dtype. ``status`` also reads "shape mismatch", "missing in candidate" (a reference
    parameter with no counterpart) or "missing in reference" (a candidate parameter nothing maps to).

    >>> from parity_kit.testing import tiny_llama
    >>> cand = tiny_llama(layers=1)
    >>> with torch.no_grad():
    ...     _ = cand.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    >>> t = weight_diff(tiny_llama(layers=1), cand, None)
    >>> t.loc[t["status"] == "differs", "candidate"].tolist()
    ['model.layers.0.mlp.down_proj.weight']
    """
    mm = ModuleMapping.coerce(mapping) if mapping is not None else None
    ref_modules, cand_modules = dict(ref.named_modules()), dict(cand.named_modules())
    cand_params = _direct_params(cand)
    seen: set[str] = set()
    rows = []
    for ref_name, params in _direct_params(ref).items():
        targets = [(ref_name, None)] if mm is None else [(t.cand, t.transform) for t in mm.targets(ref_name)]
        for pname, ref_t in params.items():
            found = False
            for cand_name, transform in targets:
                cand_t = cand_params.get(cand_name, {}).get(pname)
                if cand_t is None or cand_name not in cand_modules:
                    continue
                found = True
                seen.add(f"{cand_name}.{pname}")
                mapped = _mapped_param(ref_modules[ref_name], ref_t, transform)
                rows.append(_tensor_row(f"{ref_name}.{pname}", f"{cand_name}.{pname}", mapped, cand_t))
            if not found:
                rows.append({"reference": f"{ref_name}.{pname}", "candidate": None, "shape": tuple(ref_t.shape),
                             "ref_dtype": dtype_name(ref_t.dtype), "cand_dtype": None, "max_abs": math.nan,
                             "rel_rms": math.nan, "status": "missing in candidate"})
    for cand_name, params in cand_params.items():
        for pname, cand_t in params.items():
            if f"{cand_name}.{pname}" not in seen:
                rows.append({"reference": None, "candidate": f"{cand_name}.{pname}", "shape": tuple(cand_t.shape),
                             "ref_dtype": None, "cand_dtype": dtype_name(cand_t.dtype), "max_abs": math.nan,
                             "rel_rms": math.nan, "status": "missing in reference"})
    return pd.DataFrame(rows, columns=["reference", "candidate", "shape", "ref_dtype", "cand_dtype", "max_abs",
                                       "rel_rms", "status"])
