"""Checkpoint converters: InternLM2 → Llama layout (bit-identical slices, no arithmetic).

The InternLM2 ``wqkv`` rows are grouped per KV head h as ``[q_(h,0) .. q_(h,G-1), k_h, v_h]`` (G query heads per
KV head, each block ``head_dim`` rows). Splitting them into ``q_proj`` / ``k_proj`` / ``v_proj`` keeps query head
``i`` attached to KV head ``i // G``, which is what Llama's ``repeat_kv`` assumes. Everything else is a rename.

>>> import tempfile, pathlib, torch
>>> from parity_kit.models.internlm2 import InternLM2Config, InternLM2ForCausalLM
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> config = InternLM2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...                          num_attention_heads=4, num_key_value_heads=2, bias=False)
>>> InternLM2ForCausalLM(config).save_pretrained(folder / "internlm2")
>>> rows = convert_internlm2_to_llama(folder / "internlm2", folder / "llama")
>>> rows[1]
('model.layers.0.attention.wqkv.weight', 'model.layers.0.self_attn.q_proj.weight', (16, 16))
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import ParityKitError

MappingRow = tuple[str, str, tuple[int, ...]]

_LAYER_RENAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_RENAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Config keys that describe the InternLM2 code rather than the network; Llama gets its own values.
_DROPPED_CONFIG_KEYS = (
    "auto_map", "architectures", "model_type", "attn_implementation", "bias", "rope_scaling",
    "rotary_fp32_every_forward", "_name_or_path", "transformers_version",
)
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
)


def convert_internlm2_to_llama(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, dry_run: bool = False, overwrite: bool = False
) -> list[MappingRow]:
    """Convert an InternLM2 checkpoint folder into a folder ``transformers.LlamaForCausalLM`` loads.

    ``src`` holds ``config.json`` and ``*.safetensors`` (single or sharded with an index) or ``*.bin`` weights,
    written by parity_kit or by the hub's remote code. The result has ``config.json`` (model_type "llama"),
    safetensors shards (one per input shard, converted one shard at a time), an index when sharded, and the
    generation config and tokenizer files copied. Tensors are bit-identical slices in the source dtype. The
    destination appears complete or not at all (written to a temporary folder next to it, then renamed).

    Returns the mapping rows ``(source name, target name, target shape)``; with ``dry_run=True`` nothing is
    written. An existing ``dst`` is refused unless ``overwrite=True``.

    >>> import tempfile, pathlib
    >>> from parity_kit.models.internlm2 import InternLM2Config, InternLM2ForCausalLM
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> config = InternLM2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                          num_attention_heads=4, num_key_value_heads=1, bias=False)
    >>> InternLM2ForCausalLM(config).save_pretrained(folder / "src")
    >>> rows = convert_internlm2_to_llama(folder / "src", folder / "dst", dry_run=True)
    >>> [target.split(".")[-2] for _, target, _ in rows[1:4]]
    ['q_proj', 'k_proj', 'v_proj']
    >>> (folder / "dst").exists()
    False
    """
    src, dst = Path(src), Path(dst)
    config = _read_internlm2_config(src)
    shards = _weight_files(src)
    layout = _Layout.from_config(config)
    shapes, shard_of = _tensor_shapes(shards)
    _check_tensor_set(layout, shapes)
    rows = [row for name in layout.source_names() for row in layout.rows(name, shapes[name])]
    if dry_run:
        return rows
    _check_destination(src, dst, overwrite)

    llama_config = _llama_config(config, layout)
    with _atomic_folder(dst, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(llama_config, indent=2, sort_keys=True) + "\n")
        weight_map: dict[str, str] = {}
        total_size = 0
        names_by_shard = {shard: [n for n in layout.source_names() if shard_of[n] == shard] for shard in shards}
        for index, shard in enumerate(tqdm(shards, desc="converting shards", unit="shard"), start=1):
            out_name = (
                "model.safetensors" if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            )
            converted: dict[str, torch.Tensor] = {}
            with _open_shard(shard) as reader:
                for name in names_by_shard[shard]:
                    converted.update(layout.convert(name, reader.read(name)))
            save_file(converted, str(tmp / out_name), metadata={"format": "pt"})
            for target, tensor in converted.items():
                weight_map[target] = out_name
                total_size += tensor.numel() * tensor.element_size()
            del converted
        if len(shards) > 1:
            index_doc = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
        for path in sorted(src.iterdir()):
            if path.is_file() and (
                path.name == "generation_config.json"
                or path.name in _TOKENIZER_FILES
                or (path.name.startswith("tokenization_") and path.suffix == ".py")
            ):
                shutil.copy2(path, tmp / path.name)
    return rows


class _Layout:
    """Names and shapes of an InternLM2 checkpoint as its config predicts, and the per-tensor conversion."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.kv_heads = int(config.get("num_key_value_heads") or self.heads)
        self.layers = int(config["num_hidden_layers"])
        self.vocab = int(config["vocab_size"])
        self.intermediate = int(config["intermediate_size"])
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.head_dim = self.hidden // self.heads
        self.groups = self.heads // self.kv_heads

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _Layout:
        missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                               "intermediate_size") if k not in config]
        if missing:
            raise ParityKitError(f"the InternLM2 config.json lacks {missing}; it needs the full model configuration")
        fields = ["hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"]
        if config.get("num_key_value_heads") is not None:
            fields.append("num_key_value_heads")
        for key in fields:
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ParityKitError(f"config.json: {key} is {value!r}, but it must be a positive integer; restore the "
                                     "checkpoint's config")
        if config.get("bias", True) is not False:
            raise ParityKitError(
                "this checkpoint has bias=True (or no 'bias' field, which defaults to True): InternLM2's fused wqkv "
                "bias would have to be split into q/k/v biases, and the Llama layout produced here has no such "
                "split — converting bias=True checkpoints is not supported"
            )
        heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        if hidden % heads:
            raise ParityKitError(
                f"hidden_size {hidden} is not divisible by num_attention_heads {heads}; the config is inconsistent"
            )
        if heads % kv_heads:
            raise ParityKitError(
                f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}; "
                "the config is inconsistent with grouped-query attention"
            )
        return cls(config)

    def source_names(self) -> list[str]:
        names = ["model.tok_embeddings.weight"]
        for i in range(self.layers):
            names.append(f"model.layers.{i}.attention.wqkv.weight")
            names.extend(f"model.layers.{i}.{suffix}" for suffix in _LAYER_RENAMES)
        names.append("model.norm.weight")
        if not self.tied:
            names.append("output.weight")
        return names

    def expected_shape(self, name: str) -> tuple[int, ...]:
        if name == "model.tok_embeddings.weight" or name == "output.weight":
            return (self.vocab, self.hidden)
        suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        return {
            "attention.wqkv.weight": ((self.heads + 2 * self.kv_heads) * self.head_dim, self.hidden),
            "attention.wo.weight": (self.hidden, self.heads * self.head_dim),
            "feed_forward.w1.weight": (self.intermediate, self.hidden),
            "feed_forward.w3.weight": (self.intermediate, self.hidden),
            "feed_forward.w2.weight": (self.hidden, self.intermediate),
            "attention_norm.weight": (self.hidden,),
            "ffn_norm.weight": (self.hidden,),
            "model.norm.weight": (self.hidden,),
        }[suffix]

    def rows(self, name: str, shape: tuple[int, ...]) -> list[MappingRow]:
        if name.endswith("attention.wqkv.weight"):
            prefix = name.removesuffix("attention.wqkv.weight") + "self_attn."
            q_rows, kv_rows = self.heads * self.head_dim, self.kv_heads * self.head_dim
            return [
                (name, prefix + "q_proj.weight", (q_rows, shape[1])),
                (name, prefix + "k_proj.weight", (kv_rows, shape[1])),
                (name, prefix + "v_proj.weight", (kv_rows, shape[1])),
            ]
        return [(name, _target_name(name), shape)]

    def convert(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if not name.endswith("attention.wqkv.weight"):
            return {_target_name(name): tensor.clone(memory_format=torch.contiguous_format)}
        blocks = tensor.view(self.kv_heads, self.groups + 2, self.head_dim, self.hidden)  # rows per KV head
        q = blocks[:, : self.groups].reshape(self.heads * self.head_dim, self.hidden)  # query head i ↔ KV head i // G
        k = blocks[:, self.groups].reshape(self.kv_heads * self.head_dim, self.hidden)
        v = blocks[:, self.groups + 1].reshape(self.kv_heads * self.head_dim, self.hidden)
        q_name, k_name, v_name = (target for _, target, _ in self.rows(name, tuple(tensor.shape)))
        return {t_name: t.clone(memory_format=torch.contiguous_format) for t_name, t in
                ((q_name, q), (k_name, k), (v_name, v))}


def _target_name(name: str) -> str:
    if name in _GLOBAL_RENAMES:
        return _GLOBAL_RENAMES[name]
    model, layers, index, suffix = name.split(".", 3)  # "model.layers.{i}.<suffix>"
    return f"{model}.{layers}.{index}.{_LAYER_RENAMES[suffix]}"


def _read_internlm2_config(src: Path) -> dict[str, Any]:
    if not src.is_dir():
        raise ParityKitError(f"source {str(src)!r} is not a folder; pass an InternLM2 checkpoint folder")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ParityKitError(f"{str(src)!r} has no config.json, so it is not an InternLM2 checkpoint folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ParityKitError(f"{str(config_path)!r} is not valid JSON ({e}); restore the checkpoint's config") from e
    if not isinstance(config, dict) or config.get("model_type") != "internlm2":
        found = config.get("model_type") if isinstance(config, dict) else None
        raise ParityKitError(
            f"{str(src)!r} is not an InternLM2 folder: config.json has model_type {found!r}, expected 'internlm2'"
        )
    return config


def _weight_files(src: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = src / index_name
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text()).get("weight_map", {})
            files = [src / name for name in sorted(set(weight_map.values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise ParityKitError(f"{index_name} in {str(src)!r} names shards that are missing: {absent}")
            return files
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.bin"):
        files = sorted(p for p in src.glob(pattern) if p.is_file())
        if files:
            return files
    raise ParityKitError(f"{str(src)!r} has no *.safetensors or *.bin weights; the checkpoint folder is incomplete")


class _ShardReader:
    """Names, shapes and tensors of one weight file; safetensors are read lazily, one tensor at a time."""

    def __init__(self, handle: Any, state: dict[str, torch.Tensor] | None) -> None:
        self._handle, self._state = handle, state

    def names(self) -> list[str]:
        return list(self._state) if self._state is not None else list(self._handle.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        if self._state is not None:
            return tuple(self._state[name].shape)
        return tuple(self._handle.get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        return self._state[name] if self._state is not None else self._handle.get_tensor(name)


@contextlib.contextmanager
def _open_shard(path: Path) -> Iterator[_ShardReader]:
    try:
        if path.suffix == ".safetensors":
            opened: Any = safe_open(str(path), framework="pt", device="cpu")
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                raise ValueError("it does not hold a state dict of tensors")
    except Exception as e:  # noqa: BLE001 - every unreadable shard is the same user problem
        raise ParityKitError(f"cannot read weights from {str(path)!r} ({e}); the file is damaged or not weights") from e
    if path.suffix == ".safetensors":
        with opened as handle:
            yield _ShardReader(handle, None)
    else:
        yield _ShardReader(None, state)


def _tensor_shapes(shards: list[Path]) -> tuple[dict[str, tuple[int, ...]], dict[str, Path]]:
    shapes: dict[str, tuple[int, ...]] = {}
    shard_of: dict[str, Path] = {}
    for shard in shards:
        with _open_shard(shard) as reader:
            for name in reader.names():
                if name in shard_of:
                    raise ParityKitError(f"tensor {name!r} appears in both {shard_of[name].name} and {shard.name}")
                shapes[name], shard_of[name] = reader.shape(name), shard
    return shapes, shard_of


def _check_tensor_set(layout: _Layout, shapes: dict[str, tuple[int, ...]]) -> None:
    expected = layout.source_names()
    missing = [n for n in expected if n not in shapes]
    unexpected = sorted(set(shapes) - set(expected))
    if layout.tied and "output.weight" in unexpected:
        unexpected.remove("output.weight")  # a tied head may be stored anyway; Llama ties it again
    if missing:
        raise ParityKitError(
            f"the checkpoint lacks {len(missing)} tensor(s) its config requires: {missing}; "
            "check that every shard is present and that config.json belongs to these weights"
        )
    if unexpected:
        raise ParityKitError(
            f"the checkpoint has {len(unexpected)} tensor(s) the InternLM2 layout does not know: {unexpected}; "
            "it is not a plain InternLM2 causal LM (or config.json belongs to another model)"
        )
    wqkv = "model.layers.0.attention.wqkv.weight"
    if layout.layers and shapes[wqkv] != layout.expected_shape(wqkv):
        rows = layout.expected_shape(wqkv)[0]
        raise ParityKitError(
            f"{wqkv} has shape {shapes[wqkv]}, but the config (num_attention_heads {layout.heads}, "
            f"num_key_value_heads {layout.kv_heads}, head_dim {layout.head_dim}) needs {rows} rows = "
            f"kv_heads * (G + 2) * head_dim; the head counts in config.json do not match the weights"
        )
    wrong = {n: (shapes[n], layout.expected_shape(n)) for n in expected if shapes[n] != layout.expected_shape(n)}
    if wrong:
        listed = "; ".join(f"{n}: {got} (expected {want})" for n, (got, want) in list(wrong.items())[:8])
        raise ParityKitError(f"{len(wrong)} tensor(s) do not have the shapes config.json implies: {listed}")


def _llama_config(config: dict[str, Any], layout: _Layout) -> dict[str, Any]:
    llama = {k: v for k, v in config.items() if k not in _DROPPED_CONFIG_KEYS}
    rope_theta = float(config.get("rope_theta", 10000.0))
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
    scaling = config.get("rope_scaling")
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in ("linear", "dynamic"):
            raise ParityKitError(
                f"rope_scaling {scaling!r} has no Llama equivalent here; only 'linear' and 'dynamic' are converted"
            )
        rope_parameters = {"rope_type": kind, "factor": float(scaling["factor"]), "rope_theta": rope_theta}
        # transformers 4.x reads rope_scaling and rope_theta (4.36 accepts exactly {"type", "factor"}, as InternLM's
        # convert2llama.py writes it); 5.x reads rope_parameters and agrees with the former.
        llama["rope_scaling"] = {"type": kind, "factor": float(scaling["factor"])}
    llama.update(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        attention_bias=False,
        mlp_bias=False,
        head_dim=layout.head_dim,
        num_key_value_heads=layout.kv_heads,
        rope_theta=rope_theta,
        rope_parameters=rope_parameters,
    )
    return llama


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    src_resolved, dst_resolved = src.resolve(), dst.resolve()
    if dst_resolved == src_resolved or src_resolved.is_relative_to(dst_resolved):
        raise ParityKitError(f"destination {str(dst)!r} is (or contains) the source; choose another folder")
    if dst.exists() and not overwrite:
        raise ParityKitError(
            f"destination {str(dst)!r} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    if dst.exists() and not dst.is_dir():
        raise ParityKitError(f"destination {str(dst)!r} exists and is not a folder; remove it or choose another path")


@contextlib.contextmanager
def _atomic_folder(dst: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to ``dst``; on success it replaces ``dst``, on error it is removed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        yield tmp
        if overwrite and dst.exists():
            holder = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
            os.replace(dst, holder / dst.name)
            try:
                os.replace(tmp, dst)
            except BaseException:
                os.replace(holder / dst.name, dst)
                shutil.rmtree(holder)
                raise
            shutil.rmtree(holder)
        else:
            try:
                os.rename(tmp, dst)
            except OSError as e:
                raise ParityKitError(
                    f"could not move the result to {str(dst)!r} ({e}): it was created during the conversion; "
                    "remove it or pass overwrite=True"
                ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
