"""BlinkDL .pth -> FLA layout converter, tested on checkpoints our writer produces."""

from __future__ import annotations

import pytest
import torch

from parity_kit.errors import ParityKitError
from parity_kit.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
from parity_kit.models.rwkv7_convert import (
    convert_rwkv7_to_fla,
    write_blinkdl_checkpoint,
)


@pytest.fixture()
def model() -> RWKV7ForCausalLM:
    torch.manual_seed(0)
    cfg = RWKV7Config(hidden_size=64, num_hidden_layers=3, head_dim=16, vocab_size=70, decay_low_rank_dim=8,
                      gate_low_rank_dim=16, a_low_rank_dim=12, v_low_rank_dim=4, intermediate_size=96, chunk_size=16)
    m = RWKV7ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_blinkdl_layout_names_and_shapes(model, tmp_path):
    sd = torch.load(write_blinkdl_checkpoint(model, tmp_path / "m.pth"))
    assert sd["blocks.1.att.w1"].shape == (64, 8)        # used as x @ w1
    assert sd["blocks.1.att.w2"].shape == (8, 64)
    assert sd["blocks.1.att.w0"].shape == (1, 1, 64)
    assert sd["blocks.1.att.k_k"].shape == (1, 1, 64)
    assert sd["blocks.1.ffn.x_k"].shape == (1, 1, 64)
    assert sd["blocks.0.att.r_k"].shape == (4, 16)
    assert "blocks.0.ln0.weight" in sd and "blocks.0.att.v1" not in sd and "blocks.1.att.v1" in sd
    assert torch.equal(sd["blocks.2.att.a1"], model.model.layers[2].attn.a_lora.lora[0].weight.t())
    # x @ w1 in BlinkDL equals the first Linear of FLA's LoRA
    x = torch.randn(5, 64)
    assert torch.allclose(torch.tanh(x @ sd["blocks.1.att.w1"]) @ sd["blocks.1.att.w2"] + sd["blocks.1.att.w0"][0, 0],
                          model.model.layers[1].attn.w_lora(x), atol=1e-6)


def test_round_trip_logits_equal(model, tmp_path):
    pth = write_blinkdl_checkpoint(model, tmp_path / "m.pth")
    sd = torch.load(pth)
    # Real checkpoints may carry layer 0's unused value-residual MLP; it is dropped.
    sd["blocks.0.att.v0"], sd["blocks.0.att.v1"], sd["blocks.0.att.v2"] = (
        sd["blocks.1.att.v0"], sd["blocks.1.att.v1"], sd["blocks.1.att.v2"])
    torch.save(sd, pth)
    out = convert_rwkv7_to_fla(pth, tmp_path / "fla")
    loaded = RWKV7ForCausalLM.from_pretrained(out).eval()
    assert loaded.config.intermediate_size == 96 and loaded.config.a_low_rank_dim == 12
    assert loaded.config.v_low_rank_dim == 4
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    ids = torch.tensor([[0, 3, 9, 27, 11, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_dtype_is_kept(model, tmp_path):
    pth = write_blinkdl_checkpoint(model.to(torch.bfloat16), tmp_path / "m.pth")
    loaded = RWKV7ForCausalLM.from_pretrained(convert_rwkv7_to_fla(pth, tmp_path / "fla"), dtype="auto")
    assert loaded.model.embeddings.weight.dtype == torch.bfloat16


def test_missing_and_unexpected_keys_raise(model, tmp_path):
    sd = torch.load(write_blinkdl_checkpoint(model, tmp_path / "m.pth"))
    broken = dict(sd)
    del broken["blocks.1.att.a2"]
    torch.save(broken, tmp_path / "missing.pth")
    with pytest.raises(ParityKitError, match=r"missing keys: 'blocks.1.att.a2'"):
        convert_rwkv7_to_fla(tmp_path / "missing.pth", tmp_path / "out1")
    extra = dict(sd)
    extra["blocks.1.att.time_decay"] = torch.zeros(3)
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ParityKitError, match=r"unexpected keys: 'blocks.1.att.time_decay'"):
        convert_rwkv7_to_fla(tmp_path / "extra.pth", tmp_path / "out2")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_destination_and_source_errors(model, tmp_path):
    pth = write_blinkdl_checkpoint(model, tmp_path / "m.pth")
    dst = convert_rwkv7_to_fla(pth, tmp_path / "fla")
    with pytest.raises(ParityKitError, match="already exists"):
        convert_rwkv7_to_fla(pth, dst)
    assert convert_rwkv7_to_fla(pth, dst, overwrite=True) == dst
    assert {"config.json", "model.safetensors"} <= {p.name for p in dst.iterdir()}
    with pytest.raises(ParityKitError, match="does not exist"):
        convert_rwkv7_to_fla(tmp_path / "nope.pth", tmp_path / "x")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ParityKitError, match="could not read"):
        convert_rwkv7_to_fla(tmp_path / "junk.pth", tmp_path / "y")
    torch.save({"emb.weight": torch.zeros(3, 4)}, tmp_path / "other.pth")
    with pytest.raises(ParityKitError, match="not a BlinkDL RWKV-7"):
        convert_rwkv7_to_fla(tmp_path / "other.pth", tmp_path / "z")
