"""Batched greedy decoding: the same traces as one prompt at a time (up to batch variance), per-row stopping."""

from __future__ import annotations

import pytest
import torch

import parity_kit as pk
from parity_kit.analyses.batch_decoding import greedy_decode_batch
from parity_kit.analyses.decoding import greedy_decode
from parity_kit.analyses.divergence import ModelPair
from parity_kit.errors import ParityKitError
from parity_kit.models.rwkv7_state import RWKV7State
from parity_kit.testing import tiny_llama

LENGTHS = (5, 9, 3, 9, 7)


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def models():
    return {"llama": tiny_llama(layers=2, vocab_size=64),
            "tiny-internlm2": pk.models.load("tiny-internlm2")[0].eval(),
            "tiny-rwkv7": pk.models.load("tiny-rwkv7")[0].eval()}


@pytest.mark.parametrize("name", ["llama", "tiny-internlm2", "tiny-rwkv7"])
def test_batched_traces_match_one_prompt_at_a_time_in_fp32(models, name):
    model = models[name]
    prompts = _prompts(model.config.vocab_size)
    alone = [greedy_decode(model, p, 12, 3, set()) for p in prompts]
    batched = greedy_decode_batch(model, prompts, 12, 3, set(), batch_size=4)
    assert [t.prompt for t in batched] == prompts
    for a, b in zip(alone, batched):
        assert a.tokens == b.tokens and a.topk_ids == b.topk_ids
        for x, y in zip(a.logits, b.logits):
            # Batch variance in fp32: other GEMM shapes and reduction lengths, a few ULPs of the logits' scale.
            assert float((x - y).abs().max()) <= 1e-4 * float(x.abs().max())
        assert a.margins == pytest.approx(b.margins, abs=1e-3)


def test_each_row_stops_at_its_own_end_of_sequence(models):
    model = models["tiny-internlm2"]
    prompts = _prompts(model.config.vocab_size, seed=1)
    free = [greedy_decode(model, p, 10, 2, set()) for p in prompts]
    stop = free[0].tokens[2]  # row 0 stops at its third token; other rows stop wherever they meet it
    alone = [greedy_decode(model, p, 10, 2, {stop}) for p in prompts]
    batched = greedy_decode_batch(model, prompts, 10, 2, {stop})
    assert [t.tokens for t in batched] == [t.tokens for t in alone]
    assert len(batched[0].tokens) <= 3 and batched[0].tokens[-1] == stop
    assert max(len(t.tokens) for t in batched) > len(batched[0].tokens) or all(stop in t.tokens for t in batched)


def test_recurrent_states_stack_row_by_row():
    a, b = RWKV7State(2), RWKV7State(2)
    a.wkv = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)]
    b.wkv = [torch.ones(2, 2, 4, 4), torch.ones(2, 2, 4, 4)]
    a.seen_tokens, b.seen_tokens = 3, 5
    merged = RWKV7State.stack([a, b])
    assert merged.wkv[1][:, 0, 0, 0].tolist() == [0.0, 1.0, 1.0]
    assert merged.attn_x == [None, None] and merged.seen_tokens == 5


def test_a_model_whose_cache_cannot_stack_decodes_each_prompt_alone(models, monkeypatch):
    model = models["tiny-rwkv7"]
    prompts = _prompts(model.config.vocab_size)[:3]
    monkeypatch.delattr(RWKV7State, "stack")
    batched = greedy_decode_batch(model, prompts, 6, 2, set())
    assert [t.tokens for t in batched] == [greedy_decode(model, p, 6, 2, set()).tokens for p in prompts]


def test_bad_batches_are_refused(models):
    model = models["llama"]
    with pytest.raises(ParityKitError, match="no prompts"):
        greedy_decode_batch(model, [], 4, 2, set())
    with pytest.raises(ParityKitError, match="has no tokens"):
        greedy_decode_batch(model, [[1, 2], []], 4, 2, set())
    with pytest.raises(ParityKitError, match="batch_size must be at least 1"):
        greedy_decode_batch(model, [[1, 2]], 4, 2, set(), batch_size=0)
    with pytest.raises(ParityKitError, match="batch sizes must be at least 1"):
        pk.divergence_statistics([ModelPair("m", model, model, candidate_batch=-1)], [[1, 2]], None,
                                 max_new_tokens=2, progress=False)


def test_divergence_statistics_batched_equals_unbatched_and_measures_batch_variance(models):
    model = models["tiny-internlm2"]
    half = pk.models.load("tiny-internlm2", dtype="bf16")[0].eval()
    prompts = _prompts(model.config.vocab_size, seed=2)
    pairs = [ModelPair("bf16 vs fp32", model, half, varies="dtype"),
             ModelPair("alone vs batch of 4", model, model, varies="batch composition",
                          reference_batch=1, candidate_batch=4)]
    one = pk.divergence_statistics(pairs[:1], prompts, None, max_new_tokens=8, progress=False, stop_at_eos=False)
    four = pk.divergence_statistics(pairs, prompts, None, max_new_tokens=8, progress=False, stop_at_eos=False,
                                    batch_size=4)
    dtype_rows = four[four["pair"] == "bf16 vs fp32"].reset_index(drop=True)
    # The fp32 reference is batch-invariant up to a few ULPs; the bf16 candidate decides its tokens itself.
    assert dtype_rows["prompt_index"].tolist() == one["prompt_index"].tolist()
    assert (dtype_rows["steps"] == one["steps"]).all()
    batch_rows = four[four["pair"] == "alone vs batch of 4"]
    assert not batch_rows["diverged"].any()
    variance = batch_rows["logit_max_abs_median"]
    assert (variance >= 0).all() and (variance < 1e-3).all()
    assert (variance < dtype_rows["logit_max_abs_median"].to_numpy()).all()
