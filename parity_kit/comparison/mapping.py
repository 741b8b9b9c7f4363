"""Module-name maps between two architectures, with tensor transforms on the reference side.

A :class:`ModuleMapping` is a list of rules ``reference pattern -> candidate pattern``; patterns may
hold ``{i}`` (a layer index, digits) or any ``{name}`` (one name component). Every rule that matches a
reference module yields one target, so a fused reference module can map to several candidates, each
with a transform that cuts its part out of the reference tensor (e.g. the q slice of a fused qkv).
Transforms apply to *output* leaves only; input leaves are compared as they are.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ParityKitError

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MappingTarget:
    """One candidate counterpart of a reference module."""

    cand: str
    transform: Transform | None = None
    label: str | None = None


@dataclass(frozen=True)
class MappingRule:
    """``ref`` pattern → ``cand`` pattern, with an optional transform of the reference output."""

    ref: str
    cand: str
    transform: Transform | None = None
    label: str | None = None

    @functools.cached_property
    def _regex(self) -> re.Pattern[str]:
        parts = re.split(r"(\{\w+\})", self.ref)
        body = "".join(
            (r"(?P<%s>\d+)" % p[1:-1] if p == "{i}" else r"(?P<%s>[^.]+)" % p[1:-1])
            if p.startswith("{") and p.endswith("}") else re.escape(p)
            for p in parts
        )
        return re.compile(body)

    def apply(self, ref_name: str) -> MappingTarget | None:
        m = self._regex.fullmatch(ref_name)
        if m is None:
            return None
        try:
            cand = self.cand.format(**m.groupdict())
        except KeyError as e:
            raise ParityKitError(
                f"mapping rule {self.ref!r} -> {self.cand!r}: placeholder {e} of the candidate pattern "
                "does not appear in the reference pattern"
            ) from None
        return MappingTarget(cand, self.transform, self.label)


class ModuleMapping:
    """Rules mapping reference module names to candidate names (see the module docstring).

    >>> mm = ModuleMapping([("model.layers.{i}.attention.wo", "model.layers.{i}.self_attn.o_proj")])
    >>> [t.cand for t in mm.targets("model.layers.3.attention.wo")]
    ['model.layers.3.self_attn.o_proj']
    """

    def __init__(self, rules: Iterable[MappingRule | tuple[Any, ...]] = (), *, identity: bool = False):
        self.rules: list[MappingRule] = [r if isinstance(r, MappingRule) else MappingRule(*r) for r in rules]
        self.identity = identity

    def add(self, ref: str, cand: str, transform: Transform | None = None, label: str | None = None) -> ModuleMapping:
        """Append a rule; returns ``self`` so calls chain."""
        self.rules.append(MappingRule(ref, cand, transform, label))
        return self

    def targets(self, ref_name: str) -> list[MappingTarget]:
        """Every candidate counterpart of ``ref_name`` (empty: no counterpart)."""
        found = [t for rule in self.rules if (t := rule.apply(ref_name)) is not None]
        if not found and self.identity:
            found = [MappingTarget(ref_name)]
        return found

    @classmethod
    def coerce(cls, mapping: ModuleMapping | Mapping[str, str] | Callable[[str], str | None] | None) -> ModuleMapping:
        """A ModuleMapping from None (identity), a dict ``{ref: cand}`` or a callable ``ref -> cand | None``."""
        if mapping is None:
            return cls(identity=True)
        if isinstance(mapping, ModuleMapping):
            return mapping
        if isinstance(mapping, Mapping):
            return _DictMapping(dict(mapping))
        if callable(mapping):
            return _CallableMapping(mapping)
        raise ParityKitError(
            f"mapping={mapping!r} is not understood; pass None, a dict {{ref_name: cand_name}}, "
            "a callable ref_name -> cand_name | None, or a parity_kit.ModuleMapping"
        )

    def unmatched(self, ref_model: nn.Module | Iterable[str], cand_model: nn.Module | Iterable[str]) -> tuple[list[str], list[str]]:
        """Names the mapping leaves uncovered: ``(reference names with no target or whose target is
        not in the candidate, candidate names no reference module maps to)``; the root is ignored.

        >>> mm = ModuleMapping([("a", "x")])
        >>> mm.unmatched(["a", "b"], ["x", "y"])
        (['b'], ['y'])
        """
        ref_names = _names(ref_model)
        cand_names = _names(cand_model)
        cand_set = set(cand_names)
        hit: set[str] = set()
        ref_left = []
        for name in ref_names:
            targets = [t.cand for t in self.targets(name)]
            hit.update(targets)
            if not targets or any(t not in cand_set for t in targets):
                ref_left.append(name)
        return ref_left, [n for n in cand_names if n not in hit]

    def __repr__(self) -> str:
        return f"ModuleMapping({len(self.rules)} rules{', identity fallback' if self.identity else ''})"


class _DictMapping(ModuleMapping):
    def __init__(self, table: dict[str, str]):
        super().__init__()
        self.table = table

    def targets(self, ref_name: str) -> list[MappingTarget]:
        return [MappingTarget(self.table[ref_name])] if ref_name in self.table else []


class _CallableMapping(ModuleMapping):
    def __init__(self, fn: Callable[[str], str | None]):
        super().__init__()
        self.fn = fn

    def targets(self, ref_name: str) -> list[MappingTarget]:
        cand = self.fn(ref_name)
        return [] if cand is None else [MappingTarget(cand)]


def _names(model_or_names: nn.Module | Iterable[str]) -> list[str]:
    if isinstance(model_or_names, nn.Module):
        return [n for n, _ in model_or_names.named_modules() if n]
    return [n for n in model_or_names if n]


# ---------------------------------------------------------------------------------------- presets
def split_fused_qkv(t: torch.Tensor, part: str, num_kv_heads: int, group: int, head_dim: int) -> torch.Tensor:
    """Cut q, k or v out of a fused wqkv output laid out per KV head as [q_0 … q_(G-1), k, v].

    >>> t = torch.arange(2 * (2 + 2) * 1.0).reshape(1, 8)   # H_kv=2, G=2, head_dim=1
    >>> split_fused_qkv(t, "q", 2, 2, 1).tolist(), split_fused_qkv(t, "v", 2, 2, 1).tolist()
    ([[0.0, 1.0, 4.0, 5.0]], [[3.0, 7.0]])
    """
    expected = num_kv_heads * (group + 2) * head_dim
    if t.shape[-1] != expected:
        raise ParityKitError(
            f"fused qkv tensor has last dim {t.shape[-1]}, expected H_kv·(G+2)·head_dim = {expected}; "
            "check num_attention_heads / num_key_value_heads / hidden_size of the config"
        )
    blocks = t.reshape(*t.shape[:-1], num_kv_heads, group + 2, head_dim)  # [..., H_kv, G+2, hd]
    if part == "q":
        return blocks[..., :group, :].reshape(*t.shape[:-1], num_kv_heads * group * head_dim)
    index = {"k": group, "v": group + 1}[part]
    return blocks[..., index, :].reshape(*t.shape[:-1], num_kv_heads * head_dim)


def _config_value(config: Any, key: str) -> int:
    value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
    if value is None:
        raise ParityKitError(f"config lacks {key!r}; pass the InternLM2 config (object or dict) with it")
    return int(value)


def internlm2_to_llama(config: Any) -> ModuleMapping:
    """Mapping from InternLM2 module names to those of the converted ``LlamaForCausalLM``.

    ``config`` (object or dict) provides num_attention_heads, num_key_value_heads, hidden_size and
    num_hidden_layers. ``attention.wqkv`` maps to q_proj, k_proj and v_proj, each with the transform
    that cuts its part out of the fused output.

    >>> mm = internlm2_to_llama({"num_attention_heads": 8, "num_key_value_heads": 2,
    ...                          "hidden_size": 64, "num_hidden_layers": 2})
    >>> [t.cand for t in mm.targets("model.layers.1.attention.wqkv")]
    ['model.layers.1.self_attn.q_proj', 'model.layers.1.self_attn.k_proj', 'model.layers.1.self_attn.v_proj']
    """
    heads = _config_value(config, "num_attention_heads")
    kv_heads = _config_value(config, "num_key_value_heads")
    hidden = _config_value(config, "hidden_size")
    _config_value(config, "num_hidden_layers")
    if heads % kv_heads or hidden % heads:
        raise ParityKitError(
            f"config has num_attention_heads={heads}, num_key_value_heads={kv_heads}, hidden_size={hidden}: "
            "heads must be a multiple of KV heads and hidden_size a multiple of heads"
        )
    group, head_dim = heads // kv_heads, hidden // heads
    layer, new = "model.layers.{i}", "model.layers.{i}"
    mm = ModuleMapping([
        ("model", "model"),
        ("model.tok_embeddings", "model.embed_tokens"),
        ("model.layers", "model.layers"),
        (layer, new),
        (f"{layer}.attention", f"{new}.self_attn"),
        (f"{layer}.attention.wo", f"{new}.self_attn.o_proj"),
        (f"{layer}.feed_forward", f"{new}.mlp"),
        (f"{layer}.feed_forward.w1", f"{new}.mlp.gate_proj"),
        (f"{layer}.feed_forward.w2", f"{new}.mlp.down_proj"),
        (f"{layer}.feed_forward.w3", f"{new}.mlp.up_proj"),
        (f"{layer}.feed_forward.act_fn", f"{new}.mlp.act_fn"),
        (f"{layer}.attention_norm", f"{new}.input_layernorm"),
        (f"{layer}.ffn_norm", f"{new}.post_attention_layernorm"),
        ("model.norm", "model.norm"),
        ("model.rotary_emb", "model.rotary_emb"),  # our InternLM2 shares one rotary module, like Llama
        ("output", "lm_head"),
    ])
    for part in ("q", "k", "v"):
        cut = functools.partial(split_fused_qkv, part=part, num_kv_heads=kv_heads, group=group, head_dim=head_dim)
        mm.add(f"{layer}.attention.wqkv", f"{new}.self_attn.{part}_proj", cut, label=part)
    return mm
