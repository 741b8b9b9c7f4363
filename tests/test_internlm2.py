"""tiny-internlm2 architecture: real parameter names, eager/sdpa attention, rotary tables, KV cache, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from parity_kit.errors import ParityKitError
from parity_kit.models.internlm2 import InternLM2Config, InternLM2ForCausalLM

torch.set_num_threads(1)


def build(heads: int = 4, kv_heads: int = 2, hidden: int = 32, layers: int = 2, seed: int = 0,
          **overrides) -> InternLM2ForCausalLM:
    """A randomly initialised model whose weights are large enough for logits of order 1 (and norms not all ones)."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32, bias=False,
                  pad_token_id=2, bos_token_id=0, eos_token_id=1)
    fields.update(overrides)
    model = InternLM2ForCausalLM(InternLM2Config(**fields)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def real_parameter_names(layers: int) -> set[str]:
    names = {"model.tok_embeddings.weight", "model.norm.weight", "output.weight"}
    for i in range(layers):
        names |= {f"model.layers.{i}.{s}" for s in (
            "attention.wqkv.weight", "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
            "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight")}
    return names


def test_state_dict_has_exactly_the_real_checkpoint_names_and_shapes():
    model = build(heads=8, kv_heads=2, hidden=32, layers=3)
    state = model.state_dict()
    assert set(state) == real_parameter_names(3)  # rotary tables are non-persistent buffers
    head_dim = 32 // 8
    assert state["model.layers.0.attention.wqkv.weight"].shape == (2 * (4 + 2) * head_dim, 32)
    assert state["model.layers.0.attention.wo.weight"].shape == (32, 32)
    assert state["model.layers.0.feed_forward.w2.weight"].shape == (32, 64)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(hidden_size=30, num_attention_heads=4), "not divisible by num_attention_heads"),
        (dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=3), "not divisible by num_key_value_heads"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "rope_scaling"),
    ],
)
def test_invalid_config_raises(fields, message):
    with pytest.raises(ParityKitError, match=message):
        InternLM2Config(**fields)


def test_default_attention_is_eager_and_sdpa_is_selectable(tmp_path):
    model = build()
    assert model.config._attn_implementation == "eager"
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "internlm2" and saved["attn_implementation"] == "eager"
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "eager"
    sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert type(sdpa) is InternLM2ForCausalLM and sdpa.config._attn_implementation == "sdpa"


def test_save_load_round_trip_by_path(tmp_path):
    model = build(heads=8, kv_heads=4)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == real_parameter_names(2)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (8, 2), (8, 1)])
def test_eager_and_sdpa_agree_in_fp32(heads, kv_heads):
    model = build(heads=heads, kv_heads=kv_heads)
    ids = torch.randint(0, 64, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in row 1
    with torch.no_grad():
        eager, eager_padded = model(ids).logits, model(ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
        sdpa, sdpa_padded = model(ids).logits, model(ids, attention_mask=mask).logits
    assert (eager - sdpa).abs().max() <= 1e-5
    assert (eager_padded[mask.bool()] - sdpa_padded[mask.bool()]).abs().max() <= 1e-5
    assert (eager - eager_padded)[1, 5:].abs().max() > 1e-3  # the mask really removed the padded keys


def greedy_by_full_forward(model: InternLM2ForCausalLM, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
    return ids


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_generate_with_kv_cache_equals_full_forward_greedy_chain(implementation):
    model = build(layers=2, seed=3)
    model.set_attn_implementation(implementation)
    prompt = torch.tensor([[0, 5, 9, 13, 17]])
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=2)
    assert torch.equal(generated, greedy_by_full_forward(model, prompt, 12))


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = build(seed=4)
    prompts = [[0, 7, 8, 9, 10, 11, 12], [0, 20, 21]]
    width = max(map(len, prompts))
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=2)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=2)
        assert batch[row, width:].tolist() == alone[0, len(prompt):].tolist()


def test_rotary_tables_are_stored_in_the_load_dtype(tmp_path):
    build(heads=4, kv_heads=2, hidden=64).save_pretrained(tmp_path)
    fp32 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).model.rotary_emb
    fp16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float16).model.rotary_emb
    cos, sin = fp32.tables(32)  # recomputed in fp32 here, independently of the loaded buffers
    assert fp32.cos_cached.dtype == torch.float32 and torch.equal(fp32.cos_cached, cos)
    assert fp16.cos_cached.dtype == torch.float16 and fp16.sin_cached.dtype == torch.float16
    assert torch.equal(fp16.cos_cached, cos.half()) and torch.equal(fp16.sin_cached, sin.half())


def test_rotary_every_forward_rounds_fp32_values_to_the_activation_dtype():
    cached = build(hidden=64).model.rotary_emb.half()
    every = build(hidden=64, rotary_fp32_every_forward=True).model.rotary_emb
    positions = torch.arange(20)[None]
    x = torch.zeros(1, 20, 4, dtype=torch.float16)
    cos_every, sin_every = every(x, positions)
    angles = positions[0, :, None].double() * every.inv_freq(32).double()
    reference = torch.cat([angles, angles], dim=-1)
    assert cos_every.dtype == torch.float16
    assert (cos_every[0].double() - reference.cos()).abs().max() <= 1e-3  # fp16 rounding only
    # Within max_position_embeddings both ways round the same fp32 values, so they agree exactly.
    cos_cached, sin_cached = cached(x, positions)
    assert torch.equal(cos_cached, cos_every) and torch.equal(sin_cached, sin_every)


def test_rotary_modes_give_the_same_fp32_logits():
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        cached = build(seed=5)(ids).logits
        every = build(seed=5, rotary_fp32_every_forward=True)(ids).logits
    assert (cached - every).abs().max() <= 1e-5


@pytest.mark.parametrize("every_forward", [False, True])
def test_dynamic_ntk_scaling_acts_only_beyond_max_positions(every_forward):
    plain = build(seed=6, max_position_embeddings=16, rotary_fp32_every_forward=every_forward)
    scaled = build(seed=6, max_position_embeddings=16, rotary_fp32_every_forward=every_forward,
                   rope_scaling={"type": "dynamic", "factor": 2.0})
    short, long = torch.randint(0, 64, (1, 16)), torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        assert torch.equal(plain(short).logits, scaled(short).logits)
        assert (plain(long).logits - scaled(long).logits).abs().max() > 1e-3


def test_unknown_attention_implementation_is_refused():
    model = build()
    model.config._attn_implementation_internal = "flash_attention_2"  # bypasses transformers' own check
    with pytest.raises(ParityKitError, match="eager"):
        model(torch.tensor([[0, 1, 2]]))


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_cache_is_taken_under_its_new_and_its_old_name(name):
    from parity_kit.models.cache_compat import output_cache

    model = build(layers=2, seed=5)
    ids = torch.tensor([[0, 5, 9, 13, 17, 4]])
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], use_cache=True, **{name: output_cache(prefix)}).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_an_argument_the_model_would_swallow_is_refused():
    model = build(layers=1, seed=6)
    ids = torch.tensor([[0, 5, 9]])
    with pytest.raises(ParityKitError, match=r"does not take \['past_key_value'\]"):
        model(ids, past_key_value=None)
    with pytest.raises(ParityKitError, match="both cache= and past_key_values="):
        from transformers import DynamicCache
        model(ids, cache=DynamicCache(), past_key_values=DynamicCache())
