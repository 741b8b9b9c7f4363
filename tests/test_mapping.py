from __future__ import annotations

import pytest
import torch

from parity_kit.comparison.mapping import (
    ModuleMapping,
    internlm2_to_llama,
    split_fused_qkv,
)
from parity_kit.errors import ParityKitError

CONFIG = {"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 64, "num_hidden_layers": 2}


def test_qkv_split_matches_gqa_layout():
    heads, kv, hd = 8, 2, 8
    group = heads // kv
    # a fused output whose value encodes (kv head, block, position in head): [batch 1, seq 3, features]
    kv_idx = torch.arange(kv).view(kv, 1, 1).expand(kv, group + 2, hd)
    block = torch.arange(group + 2).view(1, group + 2, 1).expand(kv, group + 2, hd)
    pos = torch.arange(hd).view(1, 1, hd).expand(kv, group + 2, hd)
    code = (kv_idx * 1000 + block * 100 + pos).reshape(-1).float()
    fused = torch.stack([code, code + 0.5, code + 0.25]).unsqueeze(0)  # [1, 3, kv*(G+2)*hd]
    mm = internlm2_to_llama(CONFIG)
    parts = {t.label: t.transform(fused) for t in mm.targets("model.layers.0.attention.wqkv")}
    assert parts["q"].shape == (1, 3, heads * hd) and parts["k"].shape == (1, 3, kv * hd)
    q = parts["q"][0, 0].view(heads, hd)
    for i in range(heads):  # query head i belongs to KV head i // G, block i % G
        assert torch.equal(q[i], (i // group) * 1000 + (i % group) * 100 + torch.arange(hd).float())
    k = parts["k"][0, 1].view(kv, hd)
    v = parts["v"][0, 2].view(kv, hd)
    for h in range(kv):
        assert torch.equal(k[h], h * 1000 + group * 100 + torch.arange(hd).float() + 0.5)
        assert torch.equal(v[h], h * 1000 + (group + 1) * 100 + torch.arange(hd).float() + 0.25)


def test_split_equals_splitting_the_weight():
    """Projecting with the fused weight and splitting the output equals projecting with split weights."""
    heads, kv, hidden = 8, 2, 64
    hd, group = hidden // heads, heads // kv
    torch.manual_seed(0)
    wqkv = torch.randn(kv * (group + 2) * hd, hidden, dtype=torch.float64)
    x = torch.randn(2, 5, hidden, dtype=torch.float64)
    rows = wqkv.view(kv, group + 2, hd, hidden)
    wq = rows[:, :group].reshape(-1, hidden)
    wk, wv = rows[:, group].reshape(-1, hidden), rows[:, group + 1].reshape(-1, hidden)
    fused_out = x @ wqkv.T
    for part, w in (("q", wq), ("k", wk), ("v", wv)):
        torch.testing.assert_close(split_fused_qkv(fused_out, part, kv, group, hd), x @ w.T, rtol=0, atol=1e-12)


def test_preset_renames_and_unmatched():
    mm = internlm2_to_llama(CONFIG)
    renames = {
        "model.tok_embeddings": "model.embed_tokens", "model.layers.1.attention.wo": "model.layers.1.self_attn.o_proj",
        "model.layers.0.feed_forward.w1": "model.layers.0.mlp.gate_proj",
        "model.layers.0.feed_forward.w2": "model.layers.0.mlp.down_proj",
        "model.layers.0.feed_forward.w3": "model.layers.0.mlp.up_proj",
        "model.layers.1.attention_norm": "model.layers.1.input_layernorm",
        "model.layers.1.ffn_norm": "model.layers.1.post_attention_layernorm",
        "model.norm": "model.norm", "output": "lm_head", "model.layers.12": "model.layers.12",
    }
    for ref, cand in renames.items():
        assert [t.cand for t in mm.targets(ref)] == [cand]
    assert mm.targets("model.layers.x.attention.wo") == []
    ref_names = ["model.tok_embeddings", "model.layers.0.attention.wqkv", "model.layers.0.rotary", "output"]
    cand_names = ["model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                  "model.layers.0.self_attn.v_proj", "model.rotary_emb", "lm_head"]
    assert mm.unmatched(ref_names, cand_names) == (["model.layers.0.rotary"], ["model.rotary_emb"])
    assert mm.unmatched(ref_names[:2], cand_names[:2]) == (["model.layers.0.attention.wqkv"], [])


def test_mapping_errors():
    with pytest.raises(ParityKitError, match="num_key_value_heads"):
        internlm2_to_llama({"num_attention_heads": 8, "hidden_size": 64, "num_hidden_layers": 2})
    with pytest.raises(ParityKitError, match="multiple"):
        internlm2_to_llama({**CONFIG, "num_key_value_heads": 3})
    with pytest.raises(ParityKitError, match="expected H_kv"):
        split_fused_qkv(torch.ones(1, 10), "q", 2, 4, 8)
    with pytest.raises(ParityKitError, match="placeholder"):
        ModuleMapping([("a.{i}", "b.{j}")]).targets("a.1")


def test_named_placeholders_and_identity():
    mm = ModuleMapping([("blocks.{i}.{part}", "layers.{i}.{part}_new")], identity=True)
    assert [t.cand for t in mm.targets("blocks.3.attn")] == ["layers.3.attn_new"]
    assert [t.cand for t in mm.targets("blocks.3.attn.inner")] == ["blocks.3.attn.inner"]  # one component only
