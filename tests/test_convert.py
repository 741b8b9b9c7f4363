"""InternLM2 → Llama converter: exact parity with plain transformers Llama, bit-identical slices, safe writing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import parity_kit.models.convert as convert_module
from parity_kit.errors import ParityKitError
from parity_kit.models.convert import convert_internlm2_to_llama
from parity_kit.models.internlm2 import InternLM2Config, InternLM2ForCausalLM

torch.set_num_threads(1)


def build(heads: int = 4, kv_heads: int = 2, hidden: int = 32, layers: int = 2, seed: int = 0,
          **overrides) -> InternLM2ForCausalLM:
    torch.manual_seed(seed)
    fields = dict(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32, bias=False,
                  pad_token_id=2, bos_token_id=0, eos_token_id=1)
    fields.update(overrides)
    model = InternLM2ForCausalLM(InternLM2Config(**fields)).eval()
    with torch.no_grad():  # logits of order 1 and norm weights that differ, so a swapped name cannot hide
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def max_logit_gap(model: InternLM2ForCausalLM, llama: LlamaForCausalLM, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(ids).logits - llama(ids).logits).abs().max())


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A saved fp32 InternLM2 folder (read-only for the tests: copy it before editing)."""
    folder = tmp_path_factory.mktemp("internlm2") / "src"
    build().save_pretrained(folder)
    return folder


def editable_copy(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "src"))


@pytest.mark.parametrize(
    ("heads", "kv_heads", "hidden"),
    [(4, 4, 32), (4, 2, 32), (8, 2, 32), (8, 1, 32), (32, 8, 256)],  # G = 1, 2, 4, 8, and the 7B head layout
)
def test_converted_llama_reproduces_fp32_logits(tmp_path, heads, kv_heads, hidden):
    model = build(heads=heads, kv_heads=kv_heads, hidden=hidden)
    model.save_pretrained(tmp_path / "src")
    convert_internlm2_to_llama(tmp_path / "src", tmp_path / "dst")
    ids = torch.randint(0, 64, (2, 20))
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        llama = LlamaForCausalLM.from_pretrained(tmp_path / "dst", attn_implementation=implementation).eval()
        assert max_logit_gap(model, llama, ids) <= 1e-5


def rope_of(config) -> dict:
    """What transformers 5.x made of the rope fields (it keeps a 4.x-style ``type`` key beside them)."""
    return {k: config.rope_parameters[k] for k in ("rope_type", "factor", "rope_theta")}


def llama_4_36_accepts_rope_scaling(config: dict) -> bool:
    """The rule of transformers 4.36's ``LlamaConfig._rope_scaling_validation`` (the generation InternLM2
    checkpoints and InternLM's convert2llama.py were made with): None, or a dict of exactly the two fields
    ``type`` ("linear" or "dynamic") and ``factor`` (a float above 1)."""
    scaling = config.get("rope_scaling")
    if scaling is None:
        return True
    return (isinstance(scaling, dict) and len(scaling) == 2 and scaling.get("type") in ("linear", "dynamic")
            and isinstance(scaling.get("factor"), float) and scaling["factor"] > 1.0)


def test_the_4_36_rule_refuses_what_transformers_5_alone_writes():
    assert llama_4_36_accepts_rope_scaling({"rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert not llama_4_36_accepts_rope_scaling({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    assert not llama_4_36_accepts_rope_scaling({"rope_scaling": {"type": "dynamic", "factor": 2}})


@pytest.mark.parametrize("kind", ["dynamic", "linear"])
def test_rope_scaling_is_converted_and_matches_beyond_max_positions(tmp_path, kind):
    model = build(heads=8, kv_heads=2, max_position_embeddings=16, rope_theta=50000.0,
                  rope_scaling={"type": kind, "factor": 2.0})
    model.save_pretrained(tmp_path / "src")
    convert_internlm2_to_llama(tmp_path / "src", tmp_path / "dst")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert rope_of(llama.config) == {"rope_type": kind, "factor": 2.0, "rope_theta": 50000.0}
    assert llama_4_36_accepts_rope_scaling(json.loads((tmp_path / "dst" / "config.json").read_text()))
    long_ids = torch.randint(0, 64, (1, 28))  # beyond max_position_embeddings: dynamic NTK scaling is active
    assert max_logit_gap(model, llama, long_ids) <= 1e-5


def test_slices_are_bit_identical_and_keep_the_dtype(tmp_path):
    heads, kv_heads, hidden = 8, 2, 32
    groups, head_dim = heads // kv_heads, hidden // heads
    build(heads=heads, kv_heads=kv_heads, hidden=hidden).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    convert_internlm2_to_llama(tmp_path / "src", tmp_path / "dst")
    src, dst = load_file(tmp_path / "src" / "model.safetensors"), load_file(tmp_path / "dst" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in dst.values())
    for i in range(2):
        wqkv = src[f"model.layers.{i}.attention.wqkv.weight"]

        def rows(block: int) -> torch.Tensor:  # rows of one head_dim block of wqkv
            return wqkv[block * head_dim:(block + 1) * head_dim]

        q = torch.cat([rows((h // groups) * (groups + 2) + h % groups) for h in range(heads)])
        k = torch.cat([rows(kv * (groups + 2) + groups) for kv in range(kv_heads)])
        v = torch.cat([rows(kv * (groups + 2) + groups + 1) for kv in range(kv_heads)])
        prefix = f"model.layers.{i}."
        assert torch.equal(dst[prefix + "self_attn.q_proj.weight"], q)
        assert torch.equal(dst[prefix + "self_attn.k_proj.weight"], k)
        assert torch.equal(dst[prefix + "self_attn.v_proj.weight"], v)
        for old, new in [("attention.wo", "self_attn.o_proj"), ("feed_forward.w1", "mlp.gate_proj"),
                         ("feed_forward.w2", "mlp.down_proj"), ("feed_forward.w3", "mlp.up_proj"),
                         ("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]:
            assert torch.equal(dst[f"{prefix}{new}.weight"], src[f"{prefix}{old}.weight"])
    assert torch.equal(dst["model.embed_tokens.weight"], src["model.tok_embeddings.weight"])
    assert torch.equal(dst["lm_head.weight"], src["output.weight"])
    assert torch.equal(dst["model.norm.weight"], src["model.norm.weight"])
    assert len(dst) == 3 + 9 * 2


def test_sharded_safetensors_input_gives_sharded_output(tmp_path):
    model = build(layers=3)
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    n_shards = len(list((tmp_path / "src").glob("*.safetensors")))
    assert n_shards > 1
    convert_internlm2_to_llama(tmp_path / "src", tmp_path / "dst")
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == n_shards == len(list((tmp_path / "dst").glob("*.safetensors")))
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert max_logit_gap(model, llama, torch.randint(0, 64, (1, 12))) <= 1e-5


def test_bin_input(tmp_path):
    model = build()
    (tmp_path / "src").mkdir()
    model.config.to_json_file(tmp_path / "src" / "config.json")
    torch.save(model.state_dict(), tmp_path / "src" / "pytorch_model.bin")
    convert_internlm2_to_llama(tmp_path / "src", tmp_path / "dst")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert max_logit_gap(model, llama, torch.randint(0, 64, (1, 12))) <= 1e-5


def write_remote_code_style_folder(model: InternLM2ForCausalLM, folder: Path) -> None:
    """A folder as the hub's remote code writes it: auto_map, old field names, tokenizer with its own code."""
    folder.mkdir()
    c = model.config
    config = {
        "architectures": ["InternLM2ForCausalLM"], "attn_implementation": "eager",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "bias": False, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "hidden_act": "silu",
        "hidden_size": c.hidden_size, "initializer_range": 0.02, "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings, "model_type": "internlm2",
        "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads, "pad_token_id": c.pad_token_id, "pretraining_tp": 1,
        "rms_norm_eps": c.rms_norm_eps, "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "rope_theta": 1000000, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.33.2", "use_cache": True, "vocab_size": c.vocab_size,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 3]}))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
         "tokenizer_class": "InternLM2Tokenizer"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (folder / "tokenizer.model").write_bytes(bytes(range(256)))
    (folder / "tokenization_internlm2.py").write_text("# the remote tokenizer code\n")
    (folder / "modeling_internlm2.py").write_text("# the remote model code, not needed by Llama\n")


def test_remote_code_style_folder(tmp_path):
    model = build(heads=8, kv_heads=2, max_position_embeddings=16)
    src = tmp_path / "src"
    write_remote_code_style_folder(model, src)
    # Our architecture loads the folder by path without trusting remote code ...
    ours = AutoModelForCausalLM.from_pretrained(src).eval()
    assert type(ours) is InternLM2ForCausalLM and ours.config._attn_implementation == "eager"
    convert_internlm2_to_llama(src, tmp_path / "dst")
    # ... and the converted one is plain Llama with the translated config and the copied tokenizer files.
    written = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert written["model_type"] == "llama" and written["architectures"] == ["LlamaForCausalLM"]
    assert not {"auto_map", "attn_implementation", "bias"} & set(written)
    assert written["attention_bias"] is False and written["head_dim"] == 4 and written["pretraining_tp"] == 1
    for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "tokenization_internlm2.py"):
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes()
    assert not (tmp_path / "dst" / "modeling_internlm2.py").exists()
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert rope_of(llama.config) == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}
    assert llama_4_36_accepts_rope_scaling(written)
    assert max_logit_gap(ours, llama, torch.randint(0, 64, (1, 24))) <= 1e-5


def test_dry_run_lists_the_mapping_and_writes_nothing(source, tmp_path):
    before = sorted(os.listdir(tmp_path))
    rows = convert_internlm2_to_llama(source, tmp_path / "dst", dry_run=True)
    assert sorted(os.listdir(tmp_path)) == before
    assert len(rows) == 3 + 9 * 2
    assert rows[0] == ("model.tok_embeddings.weight", "model.embed_tokens.weight", (64, 32))
    assert rows[1:4] == [
        ("model.layers.0.attention.wqkv.weight", "model.layers.0.self_attn.q_proj.weight", (32, 32)),
        ("model.layers.0.attention.wqkv.weight", "model.layers.0.self_attn.k_proj.weight", (16, 32)),
        ("model.layers.0.attention.wqkv.weight", "model.layers.0.self_attn.v_proj.weight", (16, 32)),
    ]
    assert rows[-1] == ("output.weight", "lm_head.weight", (64, 32))
    assert convert_internlm2_to_llama(source, tmp_path / "dst") == rows  # the real run does what it listed


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder: Path, drop: str | None = None, add: str | None = None) -> None:
    tensors = load_file(folder / "model.safetensors")
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = torch.zeros(3)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: edit_config(f, bias=True), r"bias=True.*no such split.*not supported"),
        (lambda f: edit_config(f, hidden_size=30), "hidden_size 30 is not divisible by num_attention_heads 4"),
        (lambda f: edit_config(f, num_key_value_heads=3),
         "num_attention_heads 4 is not divisible by num_key_value_heads 3"),
        (lambda f: edit_config(f, num_key_value_heads=4), r"wqkv.weight has shape \(64, 32\).*needs 96 rows"),
        (lambda f: edit_weights(f, drop="model.layers.1.ffn_norm.weight"),
         r"lacks 1 tensor.*model\.layers\.1\.ffn_norm"),
        (lambda f: edit_weights(f, add="model.layers.0.attention.extra"),
         r"does not know.*model\.layers\.0\.attention\.extra"),
        (lambda f: edit_config(f, model_type="llama"), "not an InternLM2 folder.*'llama'"),
        (lambda f: (f / "config.json").unlink(), "has no config.json"),
        (lambda f: (f / "model.safetensors").unlink(), r"no \*.safetensors or \*.bin weights"),
        (lambda f: (f / "model.safetensors").write_bytes(b"not safetensors"), "cannot read weights"),
    ],
    ids=["bias", "hidden-heads", "heads-kv", "wqkv-rows", "missing", "unexpected", "not-internlm2",
         "no-config", "no-weights", "damaged"],
)
def test_bad_input_raises_and_writes_nothing(source, tmp_path, edit, message):
    src = editable_copy(source, tmp_path)
    edit(src)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ParityKitError, match=message):
        convert_internlm2_to_llama(src, tmp_path / "dst")
    assert sorted(os.listdir(tmp_path)) == before


def test_missing_source_folder(tmp_path):
    with pytest.raises(ParityKitError, match="is not a folder"):
        convert_internlm2_to_llama(tmp_path / "nowhere", tmp_path / "dst")


def test_existing_destination_is_refused_and_left_untouched(source, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ParityKitError, match="already exists.*overwrite=True"):
        convert_internlm2_to_llama(source, dst)
    assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["dst"]
    convert_internlm2_to_llama(source, dst, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["dst"]  # no temporary or backup folder left behind


def test_destination_equal_to_source_is_refused(source, tmp_path):
    src = editable_copy(source, tmp_path)
    with pytest.raises(ParityKitError, match="is \\(or contains\\) the source"):
        convert_internlm2_to_llama(src, src, overwrite=True)
    assert (src / "model.safetensors").is_file()


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_conversion_leaves_no_half_written_destination(tmp_path, monkeypatch, existing):
    build(layers=3).save_pretrained(tmp_path / "src", max_shard_size="20KB")
    dst = tmp_path / "dst"
    if existing:
        dst.mkdir()
        (dst / "keep.txt").write_text("old result")
    calls = []

    def failing_save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(convert_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="injected"):
        convert_internlm2_to_llama(tmp_path / "src", dst, overwrite=True)
    assert len(calls) == 2  # one shard was written before the failure
    assert sorted(os.listdir(tmp_path)) == (["dst", "src"] if existing else ["src"])
    if existing:
        assert os.listdir(dst) == ["keep.txt"]
