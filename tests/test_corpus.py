"""Corpus, eval items, prompts and tokenizer: deterministic from the seed, held-out data disjoint."""

from __future__ import annotations

import json
import random
import re

import pytest
from transformers import AutoTokenizer

from parity_kit._util.paths import data_dir
from parity_kit.builtins import corpus, data, tokenizer
from parity_kit.errors import ParityKitError


def test_training_documents_are_deterministic_and_depend_on_the_seed():
    a = corpus.training_documents(300, seed=0)
    assert a == corpus.training_documents(300, seed=0)
    assert a != corpus.training_documents(300, seed=1)


def test_generators_never_touch_the_global_random_state():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    corpus.training_documents(50)
    corpus.lastword_eval_items(5)
    corpus.chat_prompts(5)
    assert random.random() == expected


def test_corpus_has_every_kind_of_document():
    docs = corpus.training_documents(2000)
    chats = [d for d in docs if d.startswith("User: ")]
    assert 0.3 < len(chats) / len(docs) < 0.6
    turns = [a for d in chats for a in re.findall(r"Assistant: (.*?)(?=\nUser: |\n$)", d, flags=re.S)]
    # several different multi-line answers to "who are you"
    answers = {a for a in turns if "Tiny" in a.split("\n")[0]}
    assert len(answers) > 20
    assert all("\n" in a.strip() for a in answers)
    assert any("\n1. " in d for d in chats)  # numbered lists
    assert any(not d.startswith("User: ") and d.endswith(".") for d in docs)  # narrative paragraphs


def test_eval_items_are_well_formed_and_predictable_from_context():
    items = corpus.lastword_eval_items(600)
    assert len(items) == 600
    assert len({it["context"] for it in items}) == 600
    for it in items:
        target = it["target"]
        assert target.startswith(" ") and target[1:].isalpha(), target
        assert not it["context"].endswith(" ")
        assert target[1:] in it["context"]  # introduced earlier in the passage
        assert corpus.is_eval_passage(it["context"], target)


def test_eval_items_are_disjoint_from_the_training_corpus():
    items = corpus.lastword_eval_items(600)
    train = corpus.training_documents(20_000)
    assert not {it["context"] + it["target"] for it in items} & set(train)
    passages = [d for d in train if not d.startswith("User: ") and not d.endswith(".")]
    assert len(passages) > 5000
    # training never uses the held-out hash bucket, and no eval context starts a training passage
    assert not any(corpus.is_eval_passage(*_split_last_word(d)) for d in passages)
    by_start = {d[:60] for d in passages}
    assert not any(it["context"][:60] in by_start and any(d.startswith(it["context"]) for d in passages)
                   for it in items)


def _split_last_word(doc: str) -> tuple[str, str]:
    head, _, last = doc.rpartition(" ")
    return head, " " + last


def test_committed_data_matches_the_generator():
    items = corpus.read_lastword_items()
    assert len(items) >= 500
    assert items == corpus.lastword_eval_items(len(items), seed=0)
    prompts = json.loads((data_dir() / "prompts.json").read_text())
    assert prompts == corpus.chat_prompts(len(prompts), seed=0)


def test_prompts():
    prompts = json.loads((data_dir() / "prompts.json").read_text())
    assert len(prompts) >= 30
    assert prompts[0] == "User: who are you\nAssistant:"
    assert len(set(prompts)) == len(prompts)
    assert all(p.startswith("User: ") and p.endswith("\nAssistant:") for p in prompts)
    # formatted exactly as the training chats: every prompt is a prefix of some training turn's format
    train_text = "\n".join(corpus.training_documents(3000))
    assert sum(p + " " in train_text for p in prompts) > len(prompts) // 2


def test_tokenizer_is_deterministic_and_has_the_special_ids():
    docs = corpus.training_documents(1500)
    a = tokenizer.train_tokenizer(docs, vocab_size=600)
    b = tokenizer.train_tokenizer(docs, vocab_size=600)
    assert a.to_str() == b.to_str()
    assert [a.token_to_id(t) for t in ("<s>", "</s>", "<pad>", "<unk>")] == [0, 1, 2, 3]
    assert a.get_vocab_size() == 600
    text = "User: who are you\nAssistant: I am Tiny.\n1. Boil some water."
    assert a.decode(a.encode(text).ids) == text


def test_committed_tokenizer_is_the_one_the_seed_builds():
    committed = tokenizer.load_base_tokenizer()
    rebuilt = tokenizer.train_tokenizer(corpus.training_documents(data.TOKENIZER_DOCS, 0))
    assert committed.get_vocab() == rebuilt.get_vocab()
    assert 1000 <= committed.get_vocab_size() <= 2000


@pytest.mark.parametrize("add_bos", [True, False])
def test_tokenizer_flavours_load_with_autotokenizer(tmp_path, add_bos):
    tokenizer.save_tokenizer(tokenizer.load_base_tokenizer(), tmp_path, add_bos=add_bos)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = tok("User: who are you\nAssistant:").input_ids
    plain = tok("User: who are you\nAssistant:", add_special_tokens=False).input_ids
    assert 0 not in plain
    assert ids == ([0] + plain if add_bos else plain)
    assert tok.decode(ids, skip_special_tokens=True) == "User: who are you\nAssistant:"


def test_missing_eval_file_is_a_clear_error(tmp_path):
    with pytest.raises(ParityKitError, match="build_data"):
        corpus.read_lastword_items(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ParityKitError, match="context"):
        corpus.read_lastword_items(bad)


def test_build_data_is_deterministic(tmp_path):
    a = data.build_data(0, tmp_path / "a", n_eval=20, n_prompts=5, vocab_size=400)
    b = data.build_data(0, tmp_path / "b", n_eval=20, n_prompts=5, vocab_size=400)
    for rel in ("prompts.json", "eval/lastword.jsonl", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
