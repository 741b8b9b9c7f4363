"""BlinkDL's original RWKV-7 ``.pth`` layout ⇄ our (= flash-linear-attention's) layout.

BlinkDL (RWKV-LM ``RWKV-v7``) stores ``emb.weight``, ``blocks.{i}.ln0/ln1/ln2``, ``att.x_r … x_g``
([1,1,C]), the low-rank MLPs as raw matrices used as ``x @ w1`` (``w1``: [C, rank], ``w2``: [rank, C],
bias ``w0``: [1,1,C]), ``att.k_k``/``att.k_a`` ([1,1,C]), ``att.r_k`` ([H,N]),
``att.receptance/key/value/output.weight``, ``att.ln_x``, ``ffn.x_k`` ([1,1,C]), ``ffn.key/value``,
``ln_out``, ``head``. FLA uses ``nn.Linear`` for the low-rank MLPs, so ``w1``/``w2`` are transposed
into ``lora.0.weight``/``lora.2.weight`` and ``w0`` becomes ``lora.2.bias``; [1,1,C] vectors other
than the six lerp weights become [C].

>>> import tempfile, pathlib, torch
>>> from parity_kit.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
>>> cfg = RWKV7Config(hidden_size=32, num_hidden_layers=2, head_dim=16, vocab_size=20, decay_low_rank_dim=8,
...                   gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8)
>>> tmp = pathlib.Path(tempfile.mkdtemp())
>>> pth = write_blinkdl_checkpoint(RWKV7ForCausalLM(cfg), tmp / "rwkv.pth")
>>> out = convert_rwkv7_to_fla(pth, tmp / "converted")
>>> sorted(p.name for p in out.iterdir())
['config.json', 'generation_config.json', 'model.safetensors']
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch

from ..dtypes import DtypeLike, parse_dtype
from ..errors import ParityKitError
from .._util.atomic import atomic_path
from .rwkv7 import RWKV7Config, RWKV7ForCausalLM
from .rwkv7_norm import groupnorm_variant

__all__ = ["convert_rwkv7_to_fla", "write_blinkdl_checkpoint", "blinkdl_to_fla_state_dict", "fla_to_blinkdl_state_dict"]

_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}
_LORA = ("w", "a", "v", "g")
_NORMS = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}


def _key_map(config: RWKV7Config) -> dict[str, tuple[str, str]]:
    """BlinkDL name -> (our name, transform) with transform ∈ {"same", "t" (transpose), "flat" ([1,1,C] -> [C])}."""
    mapping = {
        "emb.weight": ("model.embeddings.weight", "same"),
        "ln_out.weight": ("model.norm.weight", "same"),
        "ln_out.bias": ("model.norm.bias", "same"),
        "head.weight": ("lm_head.weight", "same"),
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        for blink, ours in _NORMS.items():
            if blink == "ln0" and not (i == 0 and config.norm_first):
                continue
            mapping[f"{src}{blink}.weight"] = (f"{dst}{ours}.weight", "same")
            if config.norm_bias:
                mapping[f"{src}{blink}.bias"] = (f"{dst}{ours}.bias", "same")
        for x in "rwkvag":
            mapping[f"{src}att.x_{x}"] = (f"{dst}attn.x_{x}", "same")
        for name in ("k_k", "k_a"):
            mapping[f"{src}att.{name}"] = (f"{dst}attn.{name}", "flat")
        mapping[f"{src}att.r_k"] = (f"{dst}attn.r_k", "same")
        for blink, ours in _PROJ.items():
            mapping[f"{src}att.{blink}.weight"] = (f"{dst}attn.{ours}.weight", "same")
        for lora in _LORA:
            if lora == "v" and i == 0:
                continue
            if lora != "g":
                mapping[f"{src}att.{lora}0"] = (f"{dst}attn.{lora}_lora.lora.2.bias", "flat")
            mapping[f"{src}att.{lora}1"] = (f"{dst}attn.{lora}_lora.lora.0.weight", "t")
            mapping[f"{src}att.{lora}2"] = (f"{dst}attn.{lora}_lora.lora.2.weight", "t")
        mapping[f"{src}att.ln_x.weight"] = (f"{dst}attn.g_norm.weight", "same")
        mapping[f"{src}att.ln_x.bias"] = (f"{dst}attn.g_norm.bias", "same")
        mapping[f"{src}ffn.x_k"] = (f"{dst}ffn.x_k", "flat")
        mapping[f"{src}ffn.key.weight"] = (f"{dst}ffn.key.weight", "same")
        mapping[f"{src}ffn.value.weight"] = (f"{dst}ffn.value.weight", "same")
    return mapping


# Present in some BlinkDL checkpoints but never used: the value-residual MLP of layer 0.
_IGNORED = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def _config_from_blinkdl(weights: dict[str, torch.Tensor]) -> RWKV7Config:
    for required in ("emb.weight", "blocks.0.att.r_k", "blocks.0.ffn.key.weight", "blocks.0.att.w1",
                     "blocks.0.att.a1", "blocks.0.att.g1"):
        if required not in weights:
            raise ParityKitError(
                f"not a BlinkDL RWKV-7 checkpoint: key {required!r} is missing (found e.g. "
                f"{sorted(weights)[:5]}); expected the RWKV-LM v7 layout (emb.weight, blocks.N.att.*, ...)"
            )
    layers = 0
    while f"blocks.{layers}.ffn.key.weight" in weights:
        layers += 1
    vocab, hidden = weights["emb.weight"].shape
    heads, head_dim = weights["blocks.0.att.r_k"].shape
    v_rank = weights["blocks.1.att.v1"].shape[1] if "blocks.1.att.v1" in weights else 16
    return RWKV7Config(
        hidden_size=hidden, num_hidden_layers=layers, head_dim=head_dim, vocab_size=vocab,
        intermediate_size=weights["blocks.0.ffn.key.weight"].shape[0],
        decay_low_rank_dim=weights["blocks.0.att.w1"].shape[1], a_low_rank_dim=weights["blocks.0.att.a1"].shape[1],
        gate_low_rank_dim=weights["blocks.0.att.g1"].shape[1], v_low_rank_dim=v_rank,
        norm_bias="blocks.0.ln1.bias" in weights, bos_token_id=0, eos_token_id=0,
    )


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def blinkdl_to_fla_state_dict(
    weights: dict[str, torch.Tensor], config: RWKV7Config | None = None,
) -> tuple[dict[str, torch.Tensor], RWKV7Config]:
    """Rename and reshape a BlinkDL RWKV-7 state dict to FLA's names; returns ``(state_dict, config)``.

    Missing or unexpected keys raise :class:`ParityKitError` listing them.

    >>> from parity_kit.models.rwkv7 import RWKV7ForCausalLM
    >>> cfg = RWKV7Config(hidden_size=32, num_hidden_layers=1, head_dim=16, vocab_size=20, decay_low_rank_dim=8,
    ...                   gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8)
    >>> sd, _ = blinkdl_to_fla_state_dict(fla_to_blinkdl_state_dict(RWKV7ForCausalLM(cfg)))
    >>> "model.layers.0.attn.w_lora.lora.0.weight" in sd
    True
    """
    config = config or _config_from_blinkdl(weights)
    mapping = _key_map(config)
    missing = [k for k in mapping if k not in weights]
    unexpected = [k for k in weights if k not in mapping and k not in _IGNORED]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe(unexpected)}")
        raise ParityKitError(
            "the BlinkDL checkpoint does not match the RWKV-7 layout inferred from it "
            f"({config.num_hidden_layers} layers, hidden {config.hidden_size}, head_dim {config.head_dim}); "
            + "; ".join(parts) + ". Check that the file is an RWKV-7 (x070) checkpoint and is not truncated"
        )
    out: dict[str, torch.Tensor] = {}
    for blink, (ours, how) in mapping.items():
        t = weights[blink]
        if how == "t":
            t = t.t()
        elif how == "flat":
            t = t.reshape(-1)
        out[ours] = t.contiguous()
    return out, config


def fla_to_blinkdl_state_dict(model: RWKV7ForCausalLM) -> dict[str, torch.Tensor]:
    """The inverse renaming: our model's weights in BlinkDL's layout ([1,1,C] vectors, ``x @ w1`` matrices)."""
    state = model.state_dict()
    hidden = model.config.hidden_size
    out = {}
    for blink, (ours, how) in _key_map(model.config).items():
        t = state[ours].detach()
        if how == "t":
            t = t.t()
        elif how == "flat":
            t = t.reshape(1, 1, hidden)
        out[blink] = t.contiguous().clone()
    return out


def write_blinkdl_checkpoint(model: RWKV7ForCausalLM, path: str | os.PathLike[str]) -> Path:
    """Save ``model``'s weights as a BlinkDL RWKV-7 ``.pth`` (``torch.save`` of a flat state dict), atomically.

    >>> import tempfile, pathlib
    >>> cfg = RWKV7Config(hidden_size=32, num_hidden_layers=1, head_dim=16, vocab_size=20)
    >>> p = write_blinkdl_checkpoint(RWKV7ForCausalLM(cfg), pathlib.Path(tempfile.mkdtemp()) / "m.pth")
    >>> sorted(torch.load(p))[:3]
    ['blocks.0.att.a0', 'blocks.0.att.a1', 'blocks.0.att.a2']
    """
    if not isinstance(model, RWKV7ForCausalLM):
        raise ParityKitError(
            f"write_blinkdl_checkpoint needs a parity_kit RWKV7ForCausalLM, got {type(model).__name__}"
        )
    target = Path(path)
    with atomic_path(target) as tmp:
        torch.save(fla_to_blinkdl_state_dict(model), tmp)
    return target


def _load_weights(src: Path) -> dict[str, torch.Tensor]:
    if not src.is_file():
        raise ParityKitError(f"source checkpoint {str(src)!r} does not exist or is not a file; pass the BlinkDL .pth")
    if src.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(src))
    try:
        weights = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for non-checkpoints and truncated zips
        raise ParityKitError(
            f"could not read {str(src)!r} as a PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ParityKitError(f"{str(src)!r} does not hold a flat state dict of tensors (BlinkDL's .pth format)")
    return weights


def convert_rwkv7_to_fla(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, overwrite: bool = False,
    dtype: DtypeLike | None = None, groupnorm: str | None = None,
) -> Path:
    """Convert BlinkDL's RWKV-7 ``.pth`` at ``src`` into a folder ``dst`` (config.json,
    generation_config.json, model.safetensors) that loads with :class:`RWKV7ForCausalLM.from_pretrained`
    and with FLA's ``RWKV7ForCausalLM``.

    The weights keep the checkpoint's dtype unless ``dtype`` is given. ``groupnorm`` names how the converted
    model treats ``ln_x`` (:data:`parity_kit.models.rwkv7_norm.GROUPNORM_VARIANTS`): ``"as converted"`` casts
    its weights with the rest and computes it in the model dtype without an upcast (the bug report's
    conversion), ``"fixed"`` keeps its weights in fp32 on disk and upcasts as the original does; None keeps
    the default (the fused kernel in the model dtype). ``dst`` must not exist (or be empty) unless
    ``overwrite``; the folder appears complete or not at all.

    >>> import tempfile, pathlib
    >>> cfg = RWKV7Config(hidden_size=32, num_hidden_layers=1, head_dim=16, vocab_size=20)
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> out = convert_rwkv7_to_fla(write_blinkdl_checkpoint(RWKV7ForCausalLM(cfg), tmp / "m.pth"), tmp / "fla")
    >>> RWKV7ForCausalLM.from_pretrained(out).config.num_hidden_layers
    1
    """
    src_path, dst_path = Path(src), Path(dst)
    if dst_path.exists() and not overwrite and (not dst_path.is_dir() or any(dst_path.iterdir())):
        raise ParityKitError(
            f"destination {str(dst_path)!r} already exists; choose another folder or pass overwrite=True"
        )
    weights = _load_weights(src_path)
    state, config = blinkdl_to_fla_state_dict(weights)
    target_dtype = (parse_dtype(dtype) if dtype is not None
                    else Counter(t.dtype for t in weights.values()).most_common(1)[0][0])
    if groupnorm is not None:
        for field_name, value in groupnorm_variant(groupnorm).items():
            setattr(config, field_name, value)
    model = RWKV7ForCausalLM(config)
    expected = model.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ParityKitError(
                f"{name}: the checkpoint gives shape {tuple(tensor.shape)}, the inferred config expects "
                f"{tuple(expected[name].shape)}; the checkpoint is inconsistent or not RWKV-7"
            )
    model.load_state_dict(state, strict=True)
    model.to(target_dtype)  # "fixed": RWKV7GroupNorm keeps its fp32 weights through the cast
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst_path.name}.", dir=dst_path.parent))
    try:
        model.save_pretrained(staging)
        if dst_path.exists():
            shutil.rmtree(dst_path) if dst_path.is_dir() else dst_path.unlink()
        os.replace(staging, dst_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dst_path
