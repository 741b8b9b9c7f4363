"""The committed checkpoints: present, small, consistent with their recipe, and as good as recorded."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from parity_kit import models
from parity_kit._util.paths import data_dir
from parity_kit.builtins import corpus, tokenizer
from parity_kit.builtins.train import SPECS, evaluate

SUBSET = 64  # items re-scored per model: enough to catch a wrong checkpoint, fast on 2 cores


def _record(name: str) -> dict:
    return json.loads((models.builtin_path(name) / "training.json").read_text())


def test_the_three_checkpoints_are_committed_and_small():
    total = 0
    for name in models.BUILTINS:
        folder = models.builtin_path(name)
        for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "training.json", "loss.png"):
            assert (folder / file).is_file(), f"{name}: {file} missing"
        total += sum(f.stat().st_size for f in folder.iterdir())
    assert total <= 40 * 2**20
    readme = (data_dir() / "models" / "README.md").read_text()
    for name in models.BUILTINS:
        r = _record(name)
        assert f"{r['eval']['with_bos']['acc']:.3f}" in readme


@pytest.mark.parametrize("name", sorted(SPECS))
def test_configs_follow_the_recipe(name):
    recorded = json.loads(json.dumps(asdict(SPECS[name].settings)))  # tuples become lists, as in the file
    assert _record(name)["settings"] == recorded
    config = json.loads((models.builtin_path(name) / "config.json").read_text())
    for key, value in SPECS[name].config.items():
        if key != "attn_implementation":  # transformers keeps it outside config.json's fields
            assert config[key] == value, key
    assert config["vocab_size"] == tokenizer.load_base_tokenizer().get_vocab_size()


@pytest.mark.parametrize("name", list(models.BUILTINS))
def test_tokenizers_share_the_committed_vocabulary(name):
    committed = tokenizer.load_base_tokenizer()
    own = tokenizer.load_base_tokenizer(models.builtin_path(name))
    assert own.get_vocab() == committed.get_vocab()


@pytest.mark.parametrize("name", list(models.BUILTINS))
def test_held_out_accuracy_matches_the_record(name):
    recorded = _record(name)["eval"]
    model, tok = models.load(name)
    items = corpus.read_lastword_items()[:SUBSET]
    now = evaluate(model, tok, items, n_bootstrap=100)
    for key in ("with_bos", "without_bos"):
        was = recorded[key]["correct"][:SUBSET]
        agree = sum(a == b for a, b in zip(now[key]["correct"], was))
        assert agree >= SUBSET - 2, (key, now[key]["correct"], was)
    # the model learnt something: chance is 1 / 1536 per token, an untrained model's ppl is above 1000
    assert recorded["with_bos"]["acc"] > 0.02
    assert recorded["with_bos"]["ppl"] < 100


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_converted_checkpoint_matches_its_source(attn):
    a, tok = models.load("tiny-internlm2")
    b, _ = models.load("tiny-internlm2-llama", attn_implementation=attn)
    ids = tok("User: who are you\nAssistant:", return_tensors="pt").input_ids
    with torch.no_grad():
        gap = (a(ids).logits - b(ids).logits).abs().max().item()
    assert gap <= 1e-5, f"fp32 logits of the converted model differ by {gap:.2e} (max abs)"
