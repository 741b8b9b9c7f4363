"""parity_kit.models.load: built-ins, local folders, hub ids offline, bad names."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from parity_kit import models
from parity_kit.builtins import tokenizer
from parity_kit.errors import ParityKitError

PROMPT = "User: who are you\nAssistant:"


def test_registry_lists_the_three_builtins():
    assert models.list_models() == ["tiny-internlm2", "tiny-internlm2-llama", "tiny-rwkv7"]
    assert all(isinstance(d, str) and d for d in models.BUILTINS.values())
    assert models.builtin_path("tiny-rwkv7").parts[-2:] == ("models", "tiny-rwkv7")


@pytest.mark.parametrize("name, model_type, adds_bos", [
    ("tiny-internlm2", "internlm2", True), ("tiny-internlm2-llama", "llama", True), ("tiny-rwkv7", "rwkv7", False),
])
def test_builtins_load_in_eval_mode_with_their_tokenizer(name, model_type, adds_bos):
    model, tok = models.load(name)
    assert model.config.model_type == model_type
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert (ids[0, 0].item() == 0) == adds_bos
    assert int((ids == 0).sum()) == int(adds_bos)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_dtype_and_attention_implementation_are_applied():
    model, _ = models.load("tiny-internlm2", dtype="bf16", attn_implementation="sdpa")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "sdpa"
    model, _ = models.load("tiny-internlm2")
    assert model.config._attn_implementation == "eager"  # the InternLM2 default, as in the real checkpoint


def test_config_overrides_reach_the_model():
    model, _ = models.load("tiny-rwkv7", dtype="fp64", wkv_mode="recurrent")
    assert model.config.wkv_mode == "recurrent"
    assert next(model.parameters()).dtype == torch.float64


def test_local_llama_folder(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.DEFAULT_VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    reference = LlamaForCausalLM(config).eval()
    reference.save_pretrained(tmp_path)
    tokenizer.save_tokenizer(tokenizer.load_base_tokenizer(), tmp_path, add_bos=True)

    model, tok = models.load(tmp_path, dtype="fp16")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert next(model.parameters()).dtype == torch.float16
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids[0, 0] == 0
    model32, _ = models.load(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(model32(ids).logits, reference(ids).logits)


def test_hub_id_offline_names_the_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ParityKitError, match="pass the folder path"):
        models.load("parity-kit-test/definitely-not-cached-model")


@pytest.mark.parametrize("bad, message", [
    ("tiny-internlm3", "tiny-internlm2"),          # close to a built-in: suggested
    ("not a model!", "Built-in models"),
    ("./no/such/folder", "does not exist"),
])
def test_bad_names_are_clear_errors(bad, message):
    with pytest.raises(ParityKitError, match=message):
        models.load(bad)


def test_folder_without_config_and_file_paths_are_errors(tmp_path):
    with pytest.raises(ParityKitError, match="config.json"):
        models.load(tmp_path)
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ParityKitError, match="is a file"):
        models.load(f)


def test_unknown_dtype_and_missing_builtin_files(tmp_path, monkeypatch):
    with pytest.raises(ParityKitError, match="unknown dtype"):
        models.load("tiny-internlm2", dtype="fp8")
    monkeypatch.setenv("PARITY_KIT_DATA", str(tmp_path))
    with pytest.raises(ParityKitError, match="parity-kit train tiny-rwkv7"):
        models.load("tiny-rwkv7")


def _greedy_without_cache(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
    return ids


@pytest.mark.parametrize("name", ["tiny-internlm2", "tiny-internlm2-llama", "tiny-rwkv7"])
def test_generate_with_cache_equals_a_greedy_chain_without_cache(name, deprecation_messages):
    """``model.generate`` decodes with the cache the installed transformers passes (``cache=`` from 5.24 on);
    a cache that did not reach the model would decode from position 0 and part from this chain within tokens."""
    model, tok = models.load(name)
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    generated = model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=2, eos_token_id=None)
    assert torch.equal(generated, _greedy_without_cache(model, prompt, 24))
    assert deprecation_messages() == []
