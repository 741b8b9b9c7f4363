"""RWKV-7 model: FLA names, modes, incremental decoding, generate(), bf16, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from parity_kit.errors import ParityKitError
from parity_kit.models.rwkv7 import (
    WKV7,
    RWKV7Config,
    RWKV7ForCausalLM,
    RWKV7State,
    set_wkv_mode,
)


def small_config(**kw) -> RWKV7Config:
    base = dict(hidden_size=64, num_hidden_layers=3, head_dim=16, vocab_size=61, decay_low_rank_dim=8,
                gate_low_rank_dim=16, a_low_rank_dim=8, v_low_rank_dim=8, chunk_size=16)
    return RWKV7Config(**{**base, **kw})


def make_model(seed: int = 0, **kw) -> RWKV7ForCausalLM:
    torch.manual_seed(seed)
    model = RWKV7ForCausalLM(small_config(**kw)).eval()
    # Training-from-scratch init zeroes some projections; perturb so every path carries signal.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def rel_rms(ref, x):
    ref, x = ref.double(), x.double()
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def fla_state_dict_keys(cfg: RWKV7Config) -> set[str]:
    """The key set FLA 0.6.0's RWKV7ForCausalLM has (read off fla/layers/rwkv7.py and fla/models/rwkv7)."""
    keys = {"model.embeddings.weight", "model.norm.weight", "model.norm.bias", "lm_head.weight",
            "model.layers.0.pre_norm.weight", "model.layers.0.pre_norm.bias"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        keys |= {p + f"{n}.{w}" for n in ("attn_norm", "ffn_norm") for w in ("weight", "bias")}
        keys |= {p + f"attn.x_{x}" for x in "rwkvag"} | {p + "attn.k_k", p + "attn.k_a", p + "attn.r_k"}
        keys |= {p + f"attn.{x}_proj.weight" for x in "rkvo"}
        for lora in ("w", "a", "g") + (("v",) if i else ()):
            keys |= {p + f"attn.{lora}_lora.lora.0.weight", p + f"attn.{lora}_lora.lora.2.weight"}
            if lora != "g":
                keys.add(p + f"attn.{lora}_lora.lora.2.bias")
        keys |= {p + "attn.g_norm.weight", p + "attn.g_norm.bias", p + "ffn.x_k", p + "ffn.key.weight",
                 p + "ffn.value.weight"}
    return keys


def test_state_dict_has_fla_names_and_shapes():
    cfg = small_config()
    sd = RWKV7ForCausalLM(cfg).state_dict()
    assert set(sd) == fla_state_dict_keys(cfg)
    c = cfg.hidden_size
    assert sd["model.layers.1.attn.x_r"].shape == (1, 1, c)
    assert sd["model.layers.1.attn.k_k"].shape == (c,)
    assert sd["model.layers.1.attn.r_k"].shape == (cfg.num_heads, cfg.head_dim)
    assert sd["model.layers.1.ffn.x_k"].shape == (c,)
    assert sd["model.layers.1.attn.w_lora.lora.0.weight"].shape == (cfg.decay_low_rank_dim, c)
    assert sd["model.layers.1.ffn.key.weight"].shape == (cfg.intermediate_size, c)


def test_init_follows_rwkv_recipe():
    model = RWKV7ForCausalLM(small_config())
    attn = model.model.layers[1].attn
    assert torch.allclose(attn.k_a, torch.full_like(attn.k_a, 1.02))
    assert torch.allclose(attn.r_k, torch.full_like(attn.r_k, -0.04))
    assert attn.x_r.abs().sum() > 0 and model.model.layers[0].ffn.x_k.abs().sum() > 0
    assert attn.g_norm.eps == pytest.approx(16 * 1e-5)
    assert model.model.embeddings.weight.abs().max() <= 1e-4
    assert torch.equal(model.model.layers[2].ffn.value.weight, torch.zeros_like(model.model.layers[2].ffn.value.weight))


def test_modes_agree_in_fp32():
    model = make_model()
    ids = torch.randint(0, 61, (2, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.set_wkv_mode("fp64")(ids).logits
        rec = model.set_wkv_mode("recurrent")(ids).logits
        chk = model.set_wkv_mode("chunk", chunk_size=16)(ids).logits
    assert rel_rms(ref, rec) < 1e-5 and rel_rms(ref, chk) < 1e-5
    assert not torch.equal(rec, chk)


@pytest.mark.parametrize("mode", ["recurrent", "chunk", "fp64"])
def test_prefill_then_decode_equals_full_prefill(mode):
    model = make_model(wkv_mode=mode)
    ids = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :19], use_cache=True)
        state = out.past_key_values
        assert isinstance(state, RWKV7State) and state.get_seq_length() == 19
        steps = [out.logits]
        for t in range(19, 30):
            out = model(ids[:, t: t + 1], past_key_values=state)
            steps.append(out.logits)
    assert rel_rms(full, torch.cat(steps, dim=1)) < 1e-5
    assert state.get_seq_length() == 30


def test_generate_greedy_matches_manual_loop():
    model = make_model(wkv_mode="recurrent")
    prompt = torch.tensor([[0, 5, 9, 11, 3]])
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=2)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(generated, ids)


def test_bf16_is_finite_and_close():
    model = make_model()
    ids = torch.randint(0, 61, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
        model.to(torch.bfloat16)
        for mode, extra in (("chunk", {"intermediate_dtype": "input"}), ("recurrent", {"state_dtype": "model"})):
            out = model.set_wkv_mode(mode, **extra)(ids).logits
            assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
            assert rel_rms(ref, out) < 0.1


def test_gn_fp32_keeps_groupnorm_weights_in_fp32():
    plain, fixed = make_model(seed=5), make_model(seed=5, gn_fp32=True)
    original = fixed.model.layers[1].attn.g_norm.weight.detach().clone()
    ids = torch.randint(0, 61, (1, 20), generator=torch.Generator().manual_seed(3))
    plain.to(torch.bfloat16)
    fixed.to(torch.bfloat16)
    g_norm = fixed.model.layers[1].attn.g_norm
    assert isinstance(g_norm, torch.nn.GroupNorm)
    assert g_norm.weight.dtype == torch.float32 and torch.equal(g_norm.weight, original)
    assert plain.model.layers[1].attn.g_norm.weight.dtype == torch.bfloat16
    assert fixed.model.layers[1].attn.r_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out_plain, out_fixed = plain(ids).logits, fixed(ids).logits
    assert out_fixed.dtype == torch.bfloat16 and not torch.equal(out_plain, out_fixed)


def test_training_step_in_chunk_mode():
    model = make_model().train()
    ids = torch.randint(0, 61, (2, 33), generator=torch.Generator().manual_seed(4))
    out = model(ids, labels=ids)
    assert out.past_key_values is None and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_wkv_is_a_hookable_module():
    model = make_model()
    seen = []
    handle = model.model.layers[1].attn.wkv.register_forward_hook(lambda m, i, o: seen.append((len(i), o[0].shape)))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    handle.remove()
    assert seen == [(7, torch.Size([1, 3, 4, 16]))]
    assert set_wkv_mode(model, chunk_size=8) == 3
    assert all(m.chunk_size == 8 for m in model.modules() if isinstance(m, WKV7)) and model.config.chunk_size == 8


def test_save_load_and_auto_classes(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "rwkv7"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, RWKV7ForCausalLM)
    ids = torch.tensor([[0, 4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_bad_config_and_padding_raise():
    with pytest.raises(ParityKitError, match="wkv_mode"):
        small_config(wkv_mode="parallel")
    with pytest.raises(ParityKitError, match="value_dim"):
        small_config(value_dim=128)
    model = make_model()
    with pytest.raises(ParityKitError, match="padding"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[0, 1, 1]]))
    with pytest.raises(ParityKitError, match="mode"):
        model.set_wkv_mode("fast")


def test_an_unknown_argument_is_refused_not_swallowed():
    model = make_model()
    with pytest.raises(ParityKitError, match=r"does not take \['cache_params'\]"):
        model(torch.tensor([[0, 3, 4]]), cache_params=None)
