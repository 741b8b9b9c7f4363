"""Tests for parity_kit.analyses.evaluation: lm-eval statistics, paired comparison, BOS handling, provenance."""

from __future__ import annotations

import json
import math
import random
import statistics

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from parity_kit.analyses.evaluation import (
    LastWordItem,
    LastWordResult,
    evaluate_lastword,
    load_lastword_items,
)
from parity_kit.analyses.paired import PairedComparison, paired_comparison
from parity_kit.analyses.provenance import token_provenance
from parity_kit.analyses.statistics import mean_stderr, perplexity_bootstrap_stderr
from parity_kit.errors import ParityKitError

torch.set_num_threads(1)

WORDS = ("the cat sat on a mat while dog ran to park and bird sang in tree every morning "
         "she said that he would come home late because rain fell hard").split()
BOS, EOS, PAD = 0, 1, 2


def _tokenizer(adds_bos: bool, with_bos_token: bool = True) -> PreTrainedTokenizerFast:
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if with_bos_token:
        specials["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


@pytest.fixture(scope="module")
def tok_plain() -> PreTrainedTokenizerFast:
    return _tokenizer(adds_bos=False)


@pytest.fixture(scope="module")
def tok_adds_bos() -> PreTrainedTokenizerFast:
    return _tokenizer(adds_bos=True)


def _llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama(tok_plain) -> LlamaForCausalLM:
    return _llama(len(tok_plain))


def _items(n: int = 24, seed: int = 1) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        out.append({"context": " ".join(words[:-1]), "target": " " + words[-1]})
    return out


class _Recurrent(nn.Module):
    """A small causal GRU LM whose forward takes no attention mask, like RWKV's."""

    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(0)
        self.config = type("Cfg", (), {"model_type": "rwkv7"})()
        self.emb = nn.Embedding(vocab, 16)
        self.rnn = nn.GRU(16, 16, batch_first=True)
        self.head = nn.Linear(16, vocab)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(input_ids))[0])


def _fed_sequences(model: nn.Module) -> tuple[list[list[int]], torch.utils.hooks.RemovableHandle]:
    """Capture the real (unpadded) ids of every forward, as the model receives them."""
    seen: list[list[int]] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        for row in range(ids.shape[0]):
            n = int(mask[row].sum()) if mask is not None else ids.shape[1]
            seen.append(ids[row, :n].tolist())

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


# ------------------------------------------------------------------------------------ statistics


def _lm_eval_bootstrap_reference(xs: list[float], iters: int) -> float:
    """Independent re-implementation of lm-evaluation-harness' bootstrap_stderr for perplexity."""
    chunk = min(1000, iters)
    replicates = []
    for seed in range(iters // chunk):
        rnd = random.Random(seed)
        for _ in range(chunk):
            sample = rnd.choices(xs, k=len(xs))
            replicates.append(math.exp(-sum(sample) / len(sample)))
    return statistics.stdev(replicates)


@pytest.mark.parametrize("iters", [400, 1000, 2500])
def test_bootstrap_stderr_matches_lm_eval_formula(iters):
    rng = np.random.default_rng(3)
    ll = (-np.abs(rng.normal(2.0, 1.5, size=137))).tolist()
    ours = perplexity_bootstrap_stderr(ll, n_bootstrap=iters)
    assert ours == pytest.approx(_lm_eval_bootstrap_reference(ll, iters), rel=1e-9)


def test_bootstrap_stderr_depends_on_the_seeding_scheme():
    # a different draw (seed offset by one) must give a different value, so the match above is not luck
    ll = (-np.abs(np.random.default_rng(4).normal(2.0, 1.5, size=80))).tolist()
    shifted = statistics.stdev(
        math.exp(-sum(s) / len(s)) for s in (random.Random(1).choices(ll, k=len(ll)) for _ in range(1000))
    )
    assert perplexity_bootstrap_stderr(ll, n_bootstrap=1000) != pytest.approx(shifted, rel=1e-6)


def test_mean_stderr_is_sample_sd_over_sqrt_n():
    acc = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1]
    assert mean_stderr(acc) == pytest.approx(statistics.stdev(acc) / math.sqrt(len(acc)), rel=1e-12)
    with pytest.raises(ParityKitError, match="at least 2"):
        mean_stderr([1.0])


def test_result_summary_from_loglikelihoods():
    ll = [-1.0, -2.5, -0.2, -3.0]
    r = LastWordResult.from_loglikelihoods(ll, acc=[1, 0, 1, 0], n_bootstrap=500)
    assert r.ppl == pytest.approx(math.exp(-sum(ll) / 4))
    assert r.acc == 0.5 and r.acc_stderr == pytest.approx(statistics.stdev([1, 0, 1, 0]) / 2)
    assert r.ppl_stderr == pytest.approx(_lm_eval_bootstrap_reference(ll, 500), rel=1e-9)


# ------------------------------------------------------------------------------------ paired comparison


def _ll_vector(n: int = 500, seed: int = 0) -> np.ndarray:
    return -np.abs(np.random.default_rng(seed).normal(2.5, 2.0, size=n))


def test_paired_detects_a_small_constant_shift_that_one_runs_stderr_misses():
    ll_a = _ll_vector()
    noise = np.random.default_rng(1).normal(0.0, 0.01, size=ll_a.size)
    a = LastWordResult.from_loglikelihoods(ll_a, n_bootstrap=1000, label="a")
    b = LastWordResult.from_loglikelihoods(ll_a - 0.03 + noise, n_bootstrap=1000, label="b")
    cmp = paired_comparison(a, b, n_bootstrap=2000)
    assert cmp.flagged
    # b is worse: the loss difference, its z and the perplexity difference all carry the same (positive) sign
    assert cmp["z"] > 3 and cmp["mean_nll_diff"] > 0 and cmp["ppl_diff"] > 0 and cmp["ppl_diff_ci_low"] > 0
    # the unpaired figure ("how many of a's standard errors") is well under one: it would miss it
    assert abs(cmp["ppl_diff_in_a_stderr"]) < 1.0
    assert "real difference" in cmp.verdict and "paired" in cmp.verdict


def test_paired_z_has_the_sign_of_the_perplexity_difference_both_ways():
    ll_a = _ll_vector()
    noise = np.random.default_rng(3).normal(0.0, 0.01, size=ll_a.size)
    a = LastWordResult.from_loglikelihoods(ll_a, n_bootstrap=100)
    better = LastWordResult.from_loglikelihoods(ll_a + 0.03 + noise, n_bootstrap=100)
    worse = LastWordResult.from_loglikelihoods(ll_a - 0.03 + noise, n_bootstrap=100)
    for b, sign in ((better, -1), (worse, 1)):
        cmp = paired_comparison(a, b, n_bootstrap=200)
        assert np.sign(cmp["z"]) == np.sign(cmp["mean_nll_diff"]) == np.sign(cmp["ppl_diff"]) == sign
        assert ("worse" if sign > 0 else "better") in cmp.verdict


def test_paired_does_not_flag_a_permuted_copy():
    # every document's score changes (large per-document differences), but the set of scores is the
    # same, so perplexity is unchanged: a sound test must not call this a difference
    ll_a = _ll_vector()
    ll_b = np.random.default_rng(2).permutation(ll_a)
    a = LastWordResult.from_loglikelihoods(ll_a, n_bootstrap=1000)
    b = LastWordResult.from_loglikelihoods(ll_b, n_bootstrap=1000)
    cmp = paired_comparison(a, b, n_bootstrap=2000)
    assert cmp["docs_changed"] > 0.99 * ll_a.size
    assert abs(cmp["z"]) < 1e-6
    assert cmp["ppl_diff_ci_low"] < 0 < cmp["ppl_diff_ci_high"]
    assert not cmp.flagged and "not distinguishable" in cmp.verdict


def test_paired_bootstrap_is_seeded():
    a = LastWordResult.from_loglikelihoods(_ll_vector(200), n_bootstrap=100)
    b = LastWordResult.from_loglikelihoods(_ll_vector(200) - 0.01, n_bootstrap=100)
    one, two = paired_comparison(a, b, n_bootstrap=500), paired_comparison(a, b, n_bootstrap=500)
    other = paired_comparison(a, b, n_bootstrap=500, seed=1)
    assert one.stats == two.stats
    assert one["ppl_diff_boot_sd"] != other["ppl_diff_boot_sd"]


def test_paired_refuses_different_documents():
    docs = [LastWordItem("a b", " c"), LastWordItem("d e", " f")]
    a = LastWordResult.from_loglikelihoods([-1.0, -2.0], documents=docs, n_bootstrap=10)
    b = LastWordResult.from_loglikelihoods([-1.0, -2.0], documents=[docs[0], LastWordItem("d e", " g")],
                                           n_bootstrap=10)
    with pytest.raises(ParityKitError, match="document 1 differs"):
        paired_comparison(a, b)
    c = LastWordResult.from_loglikelihoods([-1.0, -2.0, -3.0], n_bootstrap=10)
    with pytest.raises(ParityKitError, match="different numbers of documents"):
        paired_comparison(a, c)


# ------------------------------------------------------------------------------------ evaluation


def test_ll_and_acc_match_a_manual_forward(tok_plain, llama):
    items = _items(6)
    r = evaluate_lastword(llama, tok_plain, items, batch_size=4, n_bootstrap=100, progress=False)
    for i, it in enumerate(items):
        ctx = tok_plain(it["context"], add_special_tokens=False)["input_ids"]
        whole = tok_plain(it["context"] + it["target"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([[BOS, *whole]])
        with torch.no_grad():
            logp = torch.log_softmax(llama(ids).logits.float(), -1)[0]
        start = 1 + len(ctx)
        tgt = ids[0, start:]
        expected = logp[start - 1:-1].gather(-1, tgt[:, None]).sum().item()
        assert r.per_doc.loc[i, "ll"] == pytest.approx(expected, abs=1e-5)
        assert r.per_doc.loc[i, "acc"] == int(bool((logp[start - 1:-1].argmax(-1) == tgt).all()))
        assert r.per_doc.loc[i, "n_target_tokens"] == len(whole) - len(ctx)
    assert r.ppl == pytest.approx(math.exp(-r.per_doc["ll"].mean()))


def test_acc_counts_a_greedy_hit(tok_plain):
    # a model whose argmax is always the target's token makes acc 1
    target_id = tok_plain(" cat", add_special_tokens=False)["input_ids"]
    assert len(target_id) == 1

    class Always(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(len(tok_plain), 4)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, input_ids, attention_mask=None):
            logits = torch.zeros(*input_ids.shape, len(tok_plain)) + self.emb.weight.sum() * 0
            logits[..., target_id[0]] = 5.0
            return logits

    items = [{"context": "the dog sat", "target": " cat"}, {"context": "the dog sat", "target": " mat"}]
    r = evaluate_lastword(Always(), tok_plain, items, n_bootstrap=10, progress=False)
    assert r.per_doc["acc"].tolist() == [1, 0]


def test_batched_equals_per_document(tok_plain, llama):
    items = _items(20)
    batched = evaluate_lastword(llama, tok_plain, items, batch_size=8, n_bootstrap=100, progress=False)
    single = evaluate_lastword(llama, tok_plain, items, batch_size=1, n_bootstrap=100, progress=False)
    assert batched.config["batched"] and batched.config["batch_size"] == 8
    np.testing.assert_allclose(batched.per_doc["ll"], single.per_doc["ll"], atol=1e-5, rtol=0)
    assert batched.per_doc["acc"].tolist() == single.per_doc["acc"].tolist()


def test_recurrent_model_gets_one_document_per_forward(tok_plain):
    model = _Recurrent(len(tok_plain))
    seen, handle = _fed_sequences(model)
    try:
        r = evaluate_lastword(model, tok_plain, _items(5), batch_size=8, n_bootstrap=100, progress=False)
    finally:
        handle.remove()
    assert not r.config["batched"] and r.config["batch_size"] == 1
    assert len(seen) == 5 and sorted(map(tuple, seen)) == sorted(r.per_doc["input_ids"])


def test_recurrent_model_batched_right_padded_scores_as_one_document_per_forward(tok_plain):
    model = _Recurrent(len(tok_plain))
    items = _items(12)
    widths: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[0]))
    try:
        batched = evaluate_lastword(model, tok_plain, items, batch_size=8, n_bootstrap=100, progress=False,
                                    batch_recurrent=True)
    finally:
        handle.remove()
    single = evaluate_lastword(model, tok_plain, items, n_bootstrap=100, progress=False)
    assert batched.config["batched"] and batched.config["padding"] == "right, no mask (causal recurrence)"
    assert widths == [8, 4]  # 12 documents, 8 to a forward
    np.testing.assert_allclose(batched.per_doc["ll"], single.per_doc["ll"], atol=1e-5, rtol=0)
    assert batched.per_doc["acc"].tolist() == single.per_doc["acc"].tolist()


def test_evaluation_is_deterministic(tok_plain, llama):
    items = _items(16)
    one = evaluate_lastword(llama, tok_plain, items, n_bootstrap=1000, progress=False)
    two = evaluate_lastword(llama, tok_plain, items, n_bootstrap=1000, progress=False)
    assert one.per_doc["ll"].to_numpy().tobytes() == two.per_doc["ll"].to_numpy().tobytes()
    assert (one.ppl, one.ppl_stderr, one.acc, one.acc_stderr) == (two.ppl, two.ppl_stderr, two.acc, two.acc_stderr)


@pytest.mark.parametrize("adds_bos", [True, False])
@pytest.mark.parametrize("add_special_tokens", [True, False])
@pytest.mark.parametrize("prepend_bos", [True, False])
def test_never_two_bos_tokens(adds_bos, add_special_tokens, prepend_bos, tok_plain, tok_adds_bos, llama):
    tok = tok_adds_bos if adds_bos else tok_plain
    items = _items(6)
    seen, handle = _fed_sequences(llama)
    try:
        r = evaluate_lastword(llama, tok, items, prepend_bos=prepend_bos, add_special_tokens=add_special_tokens,
                              batch_size=4, n_bootstrap=100, progress=False)
    finally:
        handle.remove()
    assert len(seen) == len(items)
    plain = {tuple(tok_plain(it["context"] + it["target"], add_special_tokens=False)["input_ids"]) for it in items}
    for ids in seen:
        assert ids.count(BOS) == (1 if prepend_bos else 0)
        body = ids[1:] if prepend_bos else ids
        assert (ids[0] == BOS) == prepend_bos
        assert tuple(body) in plain
    assert sorted(map(tuple, seen)) == sorted(r.per_doc["input_ids"])
    assert (r.per_doc["first_input_id"] == BOS).all() == prepend_bos


def test_bos_token_id_replaces_the_tokenizers_bos(tok_adds_bos, llama):
    seen, handle = _fed_sequences(llama)
    try:
        evaluate_lastword(llama, tok_adds_bos, _items(3), bos_token_id=EOS, add_special_tokens=True,
                          n_bootstrap=10, progress=False)
    finally:
        handle.remove()
    assert all(ids[0] == EOS and BOS not in ids and ids.count(EOS) == 1 for ids in seen)


def test_bos_changes_the_score(tok_plain, llama):
    items = _items(12)
    with_bos = evaluate_lastword(llama, tok_plain, items, n_bootstrap=100, progress=False, label="with")
    without = evaluate_lastword(llama, tok_plain, items, prepend_bos=False, n_bootstrap=100, progress=False)
    assert not np.array_equal(with_bos.per_doc["ll"], without.per_doc["ll"])
    # the token positions are aligned by text token: without BOS the first token has no prediction
    lp_with, lp_without = with_bos.per_doc.loc[0, "token_logprobs"], without.per_doc.loc[0, "token_logprobs"]
    assert len(lp_with) == len(lp_without) and math.isnan(lp_without[0]) and not math.isnan(lp_with[0])
    assert paired_comparison(with_bos, without, n_bootstrap=200).stats["n"] == 12


def test_trailing_space_moves_to_the_target(tok_plain, llama):
    spaced = evaluate_lastword(llama, tok_plain, [{"context": "the cat sat on ", "target": "mat"},
                                                  {"context": "a dog", "target": " ran"}],
                               n_bootstrap=10, progress=False)
    normal = evaluate_lastword(llama, tok_plain, [{"context": "the cat sat on", "target": " mat"},
                                                  {"context": "a dog", "target": " ran"}],
                               n_bootstrap=10, progress=False)
    assert spaced.per_doc["ll"].tolist() == normal.per_doc["ll"].tolist()


# ------------------------------------------------------------------------------------ bad input


def test_jsonl_loading_and_errors(tmp_path, tok_plain, llama):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(it) for it in _items(5)) + "\n\n")
    assert len(load_lastword_items(good)) == 5 and len(load_lastword_items(good, limit=2)) == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "a b"}) + "\n")
    with pytest.raises(ParityKitError, match=r"bad.jsonl:1: missing key\(s\) \['target'\]"):
        evaluate_lastword(llama, tok_plain, bad, progress=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"context": "a", "target": " b"}) + "\n{not json\n")
    with pytest.raises(ParityKitError, match="broken.jsonl:2: not valid JSON"):
        load_lastword_items(broken)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ParityKitError, match="empty"):
        evaluate_lastword(llama, tok_plain, empty, progress=False)
    with pytest.raises(ParityKitError, match="empty"):
        evaluate_lastword(llama, tok_plain, [], progress=False)
    with pytest.raises(ParityKitError, match="does not exist"):
        load_lastword_items(tmp_path / "missing.jsonl")


def test_target_without_leading_space_raises(tok_plain, llama):
    with pytest.raises(ParityKitError, match="no leading space"):
        evaluate_lastword(llama, tok_plain, [{"context": "the cat sat on the", "target": "mat"}], progress=False)
    r = evaluate_lastword(llama, tok_plain, [{"context": "the cat", "target": "!"}, {"context": "a", "target": "?"}],
                          require_leading_space=False, n_bootstrap=10, progress=False)
    assert r.n == 2 and r.per_doc["n_target_tokens"].tolist() == [1, 1]
    # glued onto the last context token, the target has no token of its own
    with pytest.raises(ParityKitError, match="produced no token of its own"):
        evaluate_lastword(llama, tok_plain, [{"context": "the cat", "target": " a"}, {"context": "a", "target": "t"}],
                          require_leading_space=False, progress=False)


def test_tokenizer_without_bos_needs_an_id(llama):
    tok = _tokenizer(adds_bos=False, with_bos_token=False)
    assert tok.bos_token_id is None
    with pytest.raises(ParityKitError, match="no BOS token; pass bos_token_id"):
        evaluate_lastword(llama, tok, _items(2), progress=False)
    r = evaluate_lastword(llama, tok, _items(2), bos_token_id=BOS, n_bootstrap=10, progress=False)
    assert (r.per_doc["first_input_id"] == BOS).all()


def test_vocab_mismatch_raises(tok_plain):
    small = _llama(vocab=50)
    with pytest.raises(ParityKitError, match="vocabulary mismatch"):
        evaluate_lastword(small, tok_plain, _items(2), progress=False)


def test_other_bad_arguments(tok_plain, llama):
    with pytest.raises(ParityKitError, match="batch_size"):
        evaluate_lastword(llama, tok_plain, _items(2), batch_size=0, progress=False)
    with pytest.raises(ParityKitError, match="limit"):
        evaluate_lastword(llama, tok_plain, _items(2), limit=0, progress=False)
    with pytest.raises(ParityKitError, match="context is empty"):
        evaluate_lastword(llama, tok_plain, [{"context": "", "target": " cat"}, {"context": "a", "target": " b"}],
                          prepend_bos=False, progress=False)
    with pytest.raises(ParityKitError, match="n_bootstrap"):
        perplexity_bootstrap_stderr([-1.0, -2.0], n_bootstrap=1)


# ------------------------------------------------------------------------------------ provenance


def test_token_provenance_with_and_without_bos(tok_adds_bos):
    text = "the cat sat on the mat"
    prov = token_provenance(text, {
        "tokenizer default": (tok_adds_bos, {}),
        "no special tokens": (tok_adds_bos, {"add_special_tokens": False}),
    })
    plain = tok_adds_bos(text, add_special_tokens=False)["input_ids"]
    assert prov.ids["tokenizer default"] == [BOS, *plain] and prov.ids["no special tokens"] == plain
    assert prov.first_difference == 0
    assert "1 leading token(s) [0]" in prov.summary
    assert prov.table.loc[0, "tokenizer default token"] == "<s>"
    assert list(prov.table.index) == list(range(len(plain) + 1))
    text_view = prov.text()
    assert text_view.splitlines()[2].startswith(">>") and text_view.count(">>") == 1
    assert "#ffd6d6" in prov.styler().to_html()


def test_token_provenance_kit_bos_policy_and_agreement(tok_plain, tok_adds_bos):
    text = "a dog ran"
    prov = token_provenance(text, {
        "llama-like": (tok_adds_bos, {"prepend_bos": True}),
        "rwkv-like + BOS": (tok_plain, {"prepend_bos": True}),
    })
    assert prov.first_difference is None and "equals" in prov.summary
    with pytest.raises(ParityKitError, match="at least two"):
        token_provenance(text, {"one": (tok_plain, {})})
    diverging = token_provenance(text, {"a": lambda t: [5, 6, 7], "b": lambda t: [5, 9, 7]}, tokenizer=tok_plain)
    assert diverging.first_difference == 1 and diverging.table.loc[1, "b token"] != ""


# ------------------------------------------------------------------------------------ position and activation views


def test_position_loss_difference_aligns_text_tokens(tok_plain, llama):
    from parity_kit.analyses.paired import position_loss_difference

    items = _items(10)
    with_bos = evaluate_lastword(llama, tok_plain, items, n_bootstrap=10, progress=False)
    without = evaluate_lastword(llama, tok_plain, items, prepend_bos=False, n_bootstrap=10, progress=False)
    diff = position_loss_difference(with_bos, without)
    start = diff[diff["axis"] == "from_start"].set_index("position")
    assert 0 not in start.index  # without BOS the first text token has no prediction
    manual = np.mean([lw[2] - lo[2] for lw, lo in zip(with_bos.per_doc["token_logprobs"],
                                                       without.per_doc["token_logprobs"])])
    assert start.loc[2, "mean"] == pytest.approx(manual, rel=1e-12) and start.loc[2, "n_docs"] == 10
    target = diff[diff["axis"] == "from_target"].set_index("position")
    assert target.loc[0, "n_docs"] == 10
    # the target tokens' differences add up to the per-document ll difference
    per_doc = without.per_doc["ll"] - with_bos.per_doc["ll"]
    summed = sum(target.loc[k, "mean"] * target.loc[k, "n_docs"] for k in target.index if k >= 0)
    assert summed == pytest.approx(-per_doc.sum(), rel=1e-9)
    with pytest.raises(ParityKitError, match="per-token"):
        position_loss_difference(LastWordResult.from_loglikelihoods([-1.0, -2.0], n_bootstrap=10), with_bos)


def test_bos_activation_diff_drops_the_bos_position(tok_plain, llama):
    from parity_kit.analyses.provenance import bos_activation_diff

    text = "the cat sat on a mat while dog ran"
    table = bos_activation_diff(llama, tok_plain, text)
    content = tok_plain(text, add_special_tokens=False)["input_ids"]
    assert list(table.index) == ["model.layers.0", "model.layers.1"]
    assert list(table.columns) == list(range(len(content)))

    outputs = []
    handle = llama.model.layers[0].register_forward_hook(
        lambda mod, args, out: outputs.append((out[0] if isinstance(out, tuple) else out).detach().double()))
    try:
        with torch.no_grad():
            llama(torch.tensor([[BOS, *content]]))
            llama(torch.tensor([content]))
    finally:
        handle.remove()
    ref, cand = outputs[0][0, 1:], outputs[1][0]  # [T, D] each, BOS position dropped from the reference
    manual = ((cand - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()
    np.testing.assert_allclose(table.loc["model.layers.0"].to_numpy(float), manual, rtol=1e-9)
    assert (table.to_numpy() > 0).all()  # a transformer sees the BOS at every position through attention


def test_evaluation_plots_return_figures(tok_plain, llama):
    from matplotlib.figure import Figure

    from parity_kit import plots
    from parity_kit.analyses.paired import position_loss_difference

    items = _items(8)
    a = evaluate_lastword(llama, tok_plain, items, n_bootstrap=10, progress=False, label="with BOS")
    b = evaluate_lastword(llama, tok_plain, items, prepend_bos=False, n_bootstrap=10, progress=False, label="without")
    fig = plots.loss_difference_by_position(position_loss_difference(a, b), label_a="with BOS", label_b="without")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    bars = plots.perplexity_with_errorbars([a, b])
    assert isinstance(bars, Figure)
    ticks = {t.get_text(): t.get_position()[1] for t in bars.axes[0].get_yticklabels()}
    assert set(ticks) == {"with BOS", "without"} and ticks["with BOS"] > ticks["without"]  # first run on top
    with pytest.raises(ParityKitError, match="no results"):
        plots.perplexity_with_errorbars([])
    with pytest.raises(ParityKitError, match="lacks columns"):
        plots.loss_difference_by_position(a.per_doc)
    t = paired_comparison(a, b, n_bootstrap=100)
    sweep = pd.DataFrame([{"model": "llama", "context_words": k, "ppl_diff": t["ppl_diff"],
                           "ci_low": t["ppl_diff_ci_low"], "ci_high": t["ppl_diff_ci_high"]} for k in (2, 4)])
    assert isinstance(plots.bos_effect_by_context_length(sweep), Figure)
    with pytest.raises(ParityKitError, match="lacks columns"):
        plots.bos_effect_by_context_length(sweep.drop(columns="ci_low"))


# ------------------------------------------------------------------------------------ the BOS story's analyses


def test_reported_gap_in_stderr_divides_by_the_reference_stderr():
    from parity_kit.stories.bos_token import reported_gap_in_stderr

    gap = reported_gap_in_stderr({"ppl_without_bos": 5.0, "ppl_with_bos": 4.25, "ppl_reference": 4.0,
                                  "stderr_reference": 0.5})
    assert gap == {"real_case_in_stderr": pytest.approx(2.0), "real_case_fixed_in_stderr": pytest.approx(0.5)}
    with pytest.raises(ParityKitError, match="lack"):
        reported_gap_in_stderr({"ppl_without_bos": 5.0})
    with pytest.raises(ParityKitError, match="not positive"):
        reported_gap_in_stderr({"ppl_without_bos": 5.0, "ppl_with_bos": 4.0, "ppl_reference": 4.0,
                                "stderr_reference": 0.0})


def _positions(first_mean: float, first_stderr: float, target: list[tuple[int, float, int]]) -> pd.DataFrame:
    rows = [{"axis": "from_start", "position": 1, "mean": first_mean, "stderr": first_stderr, "n_docs": 5},
            {"axis": "from_start", "position": 2, "mean": 9.0, "stderr": 1.0, "n_docs": 5},
            {"axis": "from_target", "position": -1, "mean": 9.0, "stderr": 1.0, "n_docs": 5}]
    rows += [{"axis": "from_target", "position": p, "mean": m, "stderr": 0.1, "n_docs": n} for p, m, n in target]
    return pd.DataFrame(rows)


def test_bos_position_effect_weights_target_positions_by_documents():
    from parity_kit.stories.bos_token import bos_position_effect

    effect = bos_position_effect(_positions(0.6, 0.2, [(0, 0.1, 3), (1, 0.5, 1)]))
    assert effect["first_position"] == 1 and effect["first_position_nats"] == pytest.approx(0.6)
    assert effect["first_position_z"] == pytest.approx(3.0)
    assert effect["target_nats_per_token"] == pytest.approx((0.1 * 3 + 0.5 * 1) / 4)  # context rows (−1) left out
    assert bos_position_effect(_positions(0.6, 0.0, [(0, 0.1, 3)]))["first_position_z"] == 0.0
    assert bos_position_effect(_positions(0.6, math.nan, [(0, 0.1, 3)]))["first_position_z"] == 0.0
    with pytest.raises(ParityKitError, match="no 'from_start' rows"):
        bos_position_effect(_positions(0.6, 0.2, []))


def _comparison(ppl_diff: float, z: float, flagged: bool, **extra: float) -> PairedComparison:
    stats = {"ppl_diff": ppl_diff, "ppl_diff_in_a_stderr": ppl_diff / 2.0, "mean_nll_diff": ppl_diff / 40,
             "mean_nll_diff_stderr": 0.01, "z": z, "ppl_diff_ci_low": ppl_diff - 0.5, "ppl_diff_ci_high": ppl_diff + 0.5,
             "acc_diff": 0.0, "acc_diff_stderr": 0.01, **extra}
    return PairedComparison(table=pd.DataFrame({"statistic": list(stats), "value": list(stats.values())}),
                            flagged=flagged, verdict="constructed", stats=stats)


def test_bos_factor_table_puts_both_suspects_side_by_side():
    from parity_kit.stories.bos_token import bos_factor_table

    table = bos_factor_table({"m": _comparison(3.0, 6.0, True)}, {"m": _comparison(-0.2, 0.5, False)},
                             ref_dtype="fp32", cand_dtype="fp16")
    assert table["factor"].tolist() == ["no BOS (fp32)", "fp16 (with BOS)"]
    assert table["ppl_diff"].tolist() == [3.0, -0.2] and table["paired_z"].tolist() == [6.0, 0.5]
    assert table["in_one_run_stderr"].tolist() == [1.5, -0.1] and table["flagged"].tolist() == [True, False]
    assert table["ci_low"].tolist() == [2.5, -0.7]
    with pytest.raises(ParityKitError, match="no precision comparison"):
        bos_factor_table({"m": _comparison(3.0, 6.0, True)}, {}, ref_dtype="fp32", cand_dtype="fp16")


def test_bos_activation_summary_reads_the_last_layer():
    from parity_kit.stories.bos_token import bos_activation_summary

    view = pd.DataFrame([[9.0, 9.0, 9.0, 9.0], [0.4, 0.1, 0.3, 0.2]], index=["layers.0", "layers.1"])
    summary = bos_activation_summary({"a": view, "b": view * 2})
    assert list(summary.index) == ["a", "b"] and list(summary.columns) == ["first position", "last position", "median"]
    assert summary.loc["a"].tolist() == pytest.approx([0.4, 0.2, 0.25])
    assert summary.loc["b", "median"] == pytest.approx(0.5)
    with pytest.raises(ParityKitError, match="empty"):
        bos_activation_summary({"a": pd.DataFrame()})


def _story(bos: PairedComparison, precision: PairedComparison, *, first_z: float = 1.0,
           sweep_z: tuple[float, ...] = (1.0, 2.0), sweep_flagged: tuple[bool, ...] = (False, False),
           sweep_diff: tuple[float, ...] = (0.5, 0.25)) -> tuple:
    """Story 04's conclusion of one model "m-1" from constructed tests, with the judgements it is rendered from."""
    from parity_kit.stories.bos_token import conclude_bos_story, judge_bos_effect

    with_bos = LastWordResult.from_loglikelihoods([-3.0, -3.5, -2.5, -3.2], n_bootstrap=50, label="with")
    without = LastWordResult.from_loglikelihoods([-3.1, -3.6, -2.6, -3.3], n_bootstrap=50, label="without")
    low = LastWordResult.from_loglikelihoods([-3.0, -3.5, -2.5, -3.25], n_bootstrap=50, label="low")
    results = {("m-1", "fp32", True): with_bos, ("m-1", "fp32", False): without, ("m-1", "bf16", True): low}
    effect = {"first_position": 1, "first_position_nats": 0.25 * first_z, "first_position_z": first_z,
              "target_nats_per_token": 0.002}
    # a second model's rows, all flagged, must not leak into m-1's judgement
    sweep = pd.DataFrame({"model": ["m-1", "m-1", "other"], "context_words": [2, 8, 2],
                          "ppl_diff": [*sweep_diff, 99.0], "ci_low": [d - 1 for d in sweep_diff] + [98.0],
                          "ci_high": [d + 1 for d in sweep_diff] + [100.0], "z": [*sweep_z, 99.0],
                          "flagged": [*sweep_flagged, True]})
    acts = pd.DataFrame({"first position": [0.3], "last position": [0.01], "median": [0.05]}, index=["m-1"])
    text, figures = conclude_bos_story(results, {"m-1": bos}, {"m-1": precision}, {"m-1": effect}, sweep, acts,
                                       ref_dtype="fp32", cand_dtype="bf16", leading_figures={"n_documents": 4})
    return text, figures, judge_bos_effect(bos, precision, effect, sweep[sweep["model"] == "m-1"])


def test_conclusion_says_bos_matters_when_only_bos_is_flagged():
    text, figures, verdict = _story(_comparison(2.0, 5.0, True), _comparison(0.5, 1.0, False), first_z=4.0)
    assert (verdict.bos_effect, verdict.precision_flagged, verdict.leading_factor) == ("higher", False, "bos")
    assert verdict.bos_over_precision == 4.0 and f"{verdict.bos_over_precision:.3g}×" in text
    assert verdict.bos_noticed == "acts"  # |z| 4 at the first text position, last-word score flagged
    assert verdict.clearest_cut_words is None and (verdict.cuts_flagged, verdict.cuts) == (0, 2)
    assert figures["m_1_bos_flagged"] == 1 and figures["m_1_precision_flagged"] == 0
    assert figures["m_1_bos_ppl_diff"] == 2.0 and figures["m_1_precision_z"] == 1.0
    assert text.startswith("m-1:")  # one paragraph per model, named first


def test_conclusion_flips_to_precision_when_precision_moves_the_score_more():
    text, figures, verdict = _story(_comparison(-0.5, -3.5, True), _comparison(2.0, 8.0, True))
    assert (verdict.bos_effect, verdict.precision_flagged, verdict.leading_factor) == ("lower", True, "precision")
    assert verdict.bos_over_precision == 0.25 and f"{1 / verdict.bos_over_precision:.3g}×" in text
    assert figures["m_1_bos_flagged"] == 1 and figures["m_1_precision_flagged"] == 1
    assert figures["m_1_precision_ppl_diff"] == 2.0
    # the same two flagged effects, the BOS one larger: the BOS leads again
    assert _story(_comparison(-3.0, -6.0, True), _comparison(1.0, 3.0, True))[2].leading_factor == "bos"


def test_conclusion_with_neither_factor_and_an_early_only_bos_effect():
    _, _, early = _story(_comparison(0.01, 0.5, False), _comparison(0.0, 0.0, False), first_z=5.0)
    assert (early.bos_effect, early.leading_factor, early.bos_noticed) == ("none", "neither", "early only")
    assert early.bos_over_precision == math.inf  # precision changes nothing
    _, _, quiet = _story(_comparison(0.01, 0.5, False), _comparison(0.0, 0.0, False), first_z=1.0)
    assert quiet.bos_noticed == "hardly"
    # a BOS change of exactly zero against a flagged precision change still renders (no division by zero)
    text, _, zero = _story(_comparison(0.0, 0.0, False), _comparison(1.0, 4.0, True))
    assert (zero.leading_factor, zero.bos_over_precision) == ("precision", 0.0) and "inf×" in text


def test_conclusion_names_the_clearest_flagged_context_cut():
    text, figures, verdict = _story(_comparison(0.01, 0.5, False), _comparison(0.0, 0.0, False),
                                    sweep_z=(-4.0, -7.0), sweep_flagged=(True, True), sweep_diff=(-3.0, -12.5))
    assert (verdict.clearest_cut_words, verdict.clearest_cut_effect) == (8, "lower")  # the larger |z| of the two
    assert (verdict.cuts_flagged, verdict.cuts) == (2, 2)
    assert f"{figures['m_1_ctx8_ppl_diff']:+.4g}" in text and f"{figures['m_1_ctx8_z']:.1f}" in text
    assert figures["m_1_ctx8_z"] == -7.0 and figures["m_1_ctx8_flagged"] == 1 and figures["m_1_ctx2_ci_low"] == -4.0
    _, _, short = _story(_comparison(0.01, 0.5, False), _comparison(0.0, 0.0, False),
                         sweep_z=(6.0, 1.0), sweep_flagged=(True, False), sweep_diff=(4.0, 0.1))
    assert (short.clearest_cut_words, short.clearest_cut_effect, short.cuts_flagged) == (2, "higher", 1)
    assert verdict.flagged_cuts_agree and short.flagged_cuts_agree
    # two flagged cuts of opposite sign: the largest |z| is still named, as a selection, with no reading of its sign
    text, figures, split = _story(_comparison(0.01, 0.5, False), _comparison(0.0, 0.0, False),
                                  sweep_z=(4.0, -7.0), sweep_flagged=(True, True), sweep_diff=(3.0, -12.5))
    assert (split.clearest_cut_words, split.flagged_cuts_agree) == (8, False)
    assert f"{figures['m_1_ctx2_ppl_diff']:+.4g}" in text and f"{figures['m_1_ctx2_z']:.1f}" in text  # the other cut


def test_conclusion_tells_perplexities_apart_with_enough_digits():
    from parity_kit.stories.wording import distinct

    assert distinct(2.574880, 2.574890) == ("2.57488", "2.57489")
    assert distinct(26.633711, 26.639856) == ("26.63", "26.64")
    assert distinct(1.0, 1.0) == ("1", "1")


def test_conclusion_figures_hold_every_number_the_text_quotes():
    text, figures, _ = _story(_comparison(2.0, 5.0, True), _comparison(0.5, 1.0, False))
    assert list(figures)[0] == "n_documents" and figures["n_documents"] == 4
    assert {"m_1_fp32_bos_ppl", "m_1_fp32_nobos_ppl_stderr", "m_1_bf16_bos_acc", "m_1_first_position_z",
            "m_1_target_nats_per_token", "m_1_act_last_layer_first_position",
            "m_1_act_last_layer_last_position"} <= set(figures)
    assert 99.0 not in figures.values()  # the sweep rows of another model stay out
    assert figures["m_1_act_last_layer_last_position"] == 0.01 and figures["m_1_first_position_z"] == 1.0
    assert f"{figures['m_1_fp32_bos_ppl']:.4g}" in text and f"{figures['m_1_fp32_nobos_ppl']:.4g}" in text
    assert json.loads(json.dumps(figures, default=float))["m_1_bos_z"] == 5.0


def test_conclusion_refuses_a_model_with_missing_measurements():
    from parity_kit.stories.bos_token import conclude_bos_story

    with pytest.raises(ParityKitError, match="no precision comparison, no position effect"):
        conclude_bos_story({}, {"m": _comparison(1.0, 1.0, False)}, {}, {}, pd.DataFrame({"model": []}),
                           pd.DataFrame(), ref_dtype="fp32", cand_dtype="bf16")


def test_compare_with_and_without_bos_and_the_context_sweep(tok_plain, llama):
    from parity_kit.stories.bos_token import (
        bos_context_sweep,
        compare_with_and_without_bos,
    )

    items = load_lastword_items(_items(8))
    with_bos, without, test = compare_with_and_without_bos(llama, tok_plain, items, n_bootstrap=20,
                                                           n_paired_bootstrap=50, label="llama fp32")
    assert (with_bos.label, without.label) == ("llama fp32 with BOS", "llama fp32 without BOS")
    assert with_bos.config["prepend_bos"] and not without.config["prepend_bos"]
    assert test["ppl_diff"] == pytest.approx(without.ppl - with_bos.ppl)
    assert test.stats == paired_comparison(with_bos, without, n_bootstrap=50).stats

    sweep = bos_context_sweep(llama, tok_plain, items, [2, 5], name="llama", n_bootstrap=30)
    assert sweep["context_words"].tolist() == [2, 5] and set(sweep["model"]) == {"llama"}
    short = [LastWordItem(" ".join(it.context.split()[-2:]), it.target) for it in items]
    manual = [evaluate_lastword(llama, tok_plain, short, prepend_bos=b, n_bootstrap=30, progress=False)
              for b in (True, False)]
    row = sweep.iloc[0]
    assert row["ppl_with_bos"] == manual[0].ppl and row["ppl_without_bos"] == manual[1].ppl
    assert row["z"] == paired_comparison(*manual, n_bootstrap=30)["z"]
    assert sweep.iloc[1]["ppl_with_bos"] != row["ppl_with_bos"]  # the cut really changes the documents
    with pytest.raises(ParityKitError, match="positive word counts"):
        bos_context_sweep(llama, tok_plain, items, [0], name="llama")
