"""Tests for parity_kit.analyses.generation: lockstep greedy decoding, teacher forcing, statistics, bad input."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from parity_kit import generation as gen
from parity_kit.analyses import divergence
from parity_kit.analyses import layers as layer_view
from parity_kit.comparison.metrics import nominal_floor
from parity_kit.errors import ParityKitError
from parity_kit.stories import fp16_divergence as story01

torch.set_num_threads(1)

SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz \n.,?!")


def tiny_llama(seed: int = 0, vocab_size: int = 64, dtype: torch.dtype = torch.float64, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                      initializer_range=0.2, **overrides)  # wide init: varied greedy outputs, not one repeated token
    return LlamaForCausalLM(cfg).to(dtype).eval()


def char_tokenizer(order: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer; ``order`` permutes which id each character gets."""
    symbols = SPECIALS + (order or CHARS)
    tok = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def free_run_logits(model: LlamaForCausalLM, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Next-token logits at every generated step, from one full forward (no cache): [steps, vocab]."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)].double()


# --- lockstep decoding ---------------------------------------------------------------------------------

def test_model_against_itself_never_diverges():
    model = tiny_llama()
    result = gen.lockstep_greedy(model, model, [5, 9, 13], max_new_tokens=20, progress=False, stop_at_eos=False)
    assert result.first_divergent_step is None and not result.diverged
    assert len(result.steps) == 20 and result.steps["same"].all() and result.steps["shared_prefix"].all()
    assert (result.steps["logit_max_abs"] == 0).all() and (result.steps["logit_rel_rms"] == 0).all()
    assert result.ref_tokens == result.cand_tokens


def test_lockstep_with_cache_matches_transformers_greedy_generate():
    model = tiny_llama(seed=3)
    prompt = [4, 8, 15, 16]
    result = gen.lockstep_greedy(model, model, prompt, max_new_tokens=12, progress=False, stop_at_eos=False)
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              min_new_tokens=12, pad_token_id=2)
    assert result.ref_tokens == expected[0, len(prompt):].tolist()


def test_perturbed_copy_diverges_exactly_at_smallest_margin_step():
    """Add a constant to the runner-up token of the smallest-margin step, just enough to flip it there.

    Every earlier step has a larger margin, so the same constant cannot flip any of them; the first
    divergence must therefore be that step, not earlier (a lagging or leading step index fails this).
    """
    model = tiny_llama(seed=1)
    steps = 16
    for start in range(4, 60):
        prompt = [start, 7, 11]
        base = gen.lockstep_greedy(model, model, prompt, max_new_tokens=steps, progress=False, stop_at_eos=False)
        margins = torch.tensor(base.steps["ref_margin"].to_numpy())
        target = int(torch.argmin(margins))
        if target >= 3 and int((margins == margins[target]).sum()) == 1:
            break
    else:
        pytest.fail("no prompt whose smallest margin is unique and after step 2")

    runner_up = base.steps.at[target, "ref_topk_ids"][1]
    winner = base.ref_tokens[target]
    logits = free_run_logits(model, prompt, base.ref_tokens)
    earlier_gaps = [float(logits[j, base.ref_tokens[j]] - logits[j, runner_up]) for j in range(target)
                    if base.ref_tokens[j] != runner_up]
    smallest = float(margins[target])
    slack = min(earlier_gaps) - smallest
    assert slack > 0  # follows from the margin being the smallest; the construction relies on it
    bias = smallest + slack / 2

    perturbed = copy.deepcopy(model)
    offset = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    offset[runner_up] = bias
    perturbed.lm_head.register_forward_hook(lambda module, args, out: out + offset)

    result = gen.lockstep_greedy(model, perturbed, prompt, max_new_tokens=steps, progress=False, stop_at_eos=False)
    assert result.first_divergent_step == target
    row = result.steps.iloc[target]
    assert (row["ref_token"], row["cand_token"]) == (winner, runner_up)
    assert row["ref_margin"] == pytest.approx(smallest)
    assert row["ref_gap_to_cand_choice"] == pytest.approx(smallest)
    shared = result.steps[result.steps["shared_prefix"]]
    assert shared["step"].tolist() == list(range(target + 1))
    assert shared["logit_max_abs"].to_numpy() == pytest.approx([bias] * (target + 1))
    assert result.steps.loc[target + 1:, "logit_max_abs"].isna().all()
    ref_text, cand_text = result.marked_texts()
    assert ref_text.count(gen.DIVERGENCE_OPEN) == 1 and cand_text.endswith(gen.DIVERGENCE_CLOSE)
    assert result.summary()["first_divergent_step"] == target


def test_eos_stops_a_run_and_counts_as_divergence():
    model = tiny_llama(seed=2)
    prompt = [9, 10, 11]
    base = gen.lockstep_greedy(model, model, prompt, max_new_tokens=6, progress=False, stop_at_eos=False)
    forced = copy.deepcopy(model)
    boost = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    boost[model.config.eos_token_id] = 1e6
    forced.lm_head.register_forward_hook(lambda module, args, out: out + boost)
    result = gen.lockstep_greedy(model, forced, prompt, max_new_tokens=6, progress=False)
    assert result.cand_tokens == [model.config.eos_token_id]
    assert result.first_divergent_step == 0
    assert result.steps["cand_token"].iloc[1:].isna().all()
    assert result.ref_tokens[: len(base.ref_tokens)] == base.ref_tokens[: len(result.ref_tokens)]


def test_fp16_vs_fp64_records_logit_error_while_shared():
    ref = tiny_llama(seed=4)
    low = copy.deepcopy(ref).to(torch.float16)
    result = gen.lockstep_greedy(ref, low, [3, 4, 5], max_new_tokens=10, progress=False, stop_at_eos=False)
    shared = result.steps[result.steps["shared_prefix"]]
    assert (shared["logit_max_abs"] > 0).all()
    # fp16 carries ~3 decimal digits: the logit error is rounding-sized, neither zero nor O(1)
    assert (shared["logit_rel_rms"] < 5e-2).all()


def test_side_by_side_and_html_show_the_divergence():
    tok = char_tokenizer()
    model = tiny_llama(seed=5, vocab_size=len(tok))
    other = tiny_llama(seed=6, vocab_size=len(tok))
    result = gen.lockstep_greedy(model, other, "who are you", max_new_tokens=8, ref_tokenizer=tok, progress=False,
                                 stop_at_eos=False)
    table = result.side_by_side()
    assert table["run"].tolist() == ["reference", "candidate"]
    assert table["continuation"].iloc[0].replace(gen.DIVERGENCE_OPEN, "").replace(gen.DIVERGENCE_CLOSE, "") == \
        result.ref_text
    assert result.steps["ref_piece"].str.cat() == result.ref_text
    if result.diverged:
        assert "<mark>" in result._repr_html_()


def test_compare_by_text_with_permuted_vocabulary():
    """Same model, ids permuted: id comparison is refused; text comparison finds identical outputs."""
    tok = char_tokenizer()
    generator = torch.Generator().manual_seed(0)
    shuffled = [CHARS[i] for i in torch.randperm(len(CHARS), generator=generator)]
    tok2 = char_tokenizer(shuffled)
    model = tiny_llama(seed=7, vocab_size=len(tok))
    permuted = copy.deepcopy(model)
    # old id of each new id: new id n holds symbol s, which the first tokenizer calls old id
    old_of_new = torch.tensor([tok.convert_tokens_to_ids(s) for s in SPECIALS + shuffled]
                              + list(range(len(tok), model.config.vocab_size)))
    with torch.no_grad():
        permuted.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight[old_of_new])
        permuted.lm_head.weight.copy_(model.lm_head.weight[old_of_new])

    with pytest.raises(ParityKitError, match="different vocabularies"):
        gen.lockstep_greedy(model, permuted, "who are you", ref_tokenizer=tok, cand_tokenizer=tok2, progress=False)
    result = gen.lockstep_greedy(model, permuted, "who are you", max_new_tokens=10, ref_tokenizer=tok,
                                 cand_tokenizer=tok2, compare_by_text=True, progress=False, stop_at_eos=False)
    assert result.first_divergent_step is None
    assert result.ref_text == result.cand_text and result.ref_tokens != result.cand_tokens
    assert result.steps["logit_max_abs"].isna().all()  # ids mean different things: no id-wise logit error

    # the text comparison must still see a real difference
    other = tiny_llama(seed=8, vocab_size=len(tok))
    differs = gen.lockstep_greedy(model, other, "who are you", max_new_tokens=10, ref_tokenizer=tok,
                                  cand_tokenizer=tok2, compare_by_text=True, progress=False, stop_at_eos=False)
    pieces = differs.steps[["ref_piece", "cand_piece"]].to_numpy()
    first_diff = next((i for i, (a, b) in enumerate(pieces) if a != b), None)
    assert differs.first_divergent_step == first_diff


# --- teacher forcing -----------------------------------------------------------------------------------

def test_teacher_forced_identical_and_perturbed():
    model = tiny_llama(seed=9)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    same = gen.teacher_forced(model, model, ids)
    assert len(same) == len(ids) and same["argmax_agree"].all() and (same["logit_max_abs"] == 0).all()
    assert same["next_token"].tolist()[:-1] == ids[1:]

    shifted = copy.deepcopy(model)
    offset = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    offset[7] = 0.25
    shifted.lm_head.register_forward_hook(lambda module, args, out: out + offset)
    table = gen.teacher_forced(model, shifted, ids, prompt_length=3)
    assert table["logit_max_abs"].to_numpy() == pytest.approx([0.25] * len(ids))
    assert table["generated"].tolist() == [False, False] + [True] * (len(ids) - 2)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    flips = ((logits.argmax(-1) != 7) & (logits.max(-1).values - logits[:, 7] < 0.25)).tolist()
    assert (~table["argmax_agree"]).tolist() == flips
    summary = gen.summarize_teacher_forced(table)
    assert summary["argmax_disagreements"] == sum(flips) == summary["disagreements_below_error"]


def test_teacher_forced_on_logits_already_computed_runs_no_model():
    model, other = tiny_llama(seed=9), tiny_llama(seed=10)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        logits = tuple(m(input_ids=torch.tensor([ids])).logits for m in (model, other))  # [1, T, V]
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in (model, other)]
    given = gen.teacher_forced(model, other, ids, logits=logits)
    for h in handles:
        h.remove()
    assert calls == [] and given.equals(gen.teacher_forced(model, other, ids))
    with pytest.raises(ParityKitError, match="logits="):
        gen.teacher_forced(model, other, ids[:-1], logits=logits)


# --- statistics over prompts ---------------------------------------------------------------------------

def test_divergence_statistics_rows_and_summary():
    tok = char_tokenizer()
    model = tiny_llama(seed=10, vocab_size=len(tok))
    other = tiny_llama(seed=11, vocab_size=len(tok))
    prompts = ["who are you", "hello.\n", "what is this?"]
    stats = divergence.divergence_statistics({"self": (model, model), "other": (model, other)}, prompts, tok,
                                      max_new_tokens=6, progress=False, stop_at_eos=False)
    assert len(stats) == 6 and list(stats["pair"].unique()) == ["self", "other"]
    assert not stats.loc[stats["pair"] == "self", "diverged"].any()
    for i, prompt in enumerate(prompts):
        direct = gen.lockstep_greedy(model, other, prompt, max_new_tokens=6, ref_tokenizer=tok, progress=False,
                                     stop_at_eos=False)
        row = stats[(stats["pair"] == "other") & (stats["prompt_index"] == i)].iloc[0]
        assert (None if pd.isna(row["first_divergent_step"]) else int(row["first_divergent_step"])) == \
            direct.first_divergent_step
        if direct.diverged:
            d = direct.first_divergent_step
            previous = ([direct.prompt_ids[-1]] + direct.ref_tokens)[d]
            assert row["after_newline"] == ("\n" in tok.decode([previous]))
            assert row["ref_margin_at_divergence"] == direct.steps.at[d, "ref_margin"]
    summary = divergence.divergence_summary(stats)
    assert summary.set_index("pair").loc["self", "diverged"] == 0
    assert summary.set_index("pair").loc["other", "diverged"] == int(stats.loc[stats["pair"] == "other", "diverged"].sum())


def test_standard_pairs_isolate_one_factor_each():
    loads = []

    def loader(source, *, dtype, device, attn_implementation):
        loads.append((source, dtype, attn_implementation))
        return torch.nn.Linear(1, 1), f"tokenizer of {source}"

    pairs, tok = story01.standard_pairs("orig", "conv", loader=loader)
    assert tok == "tokenizer of orig"
    assert len(loads) == len(set(loads)) == 8  # 2 models × 2 dtypes × 2 attention implementations, once each
    assert sorted({p.varies for p in pairs}) == ["attention", "conversion", "dtype"]
    for p in pairs:
        assert p.reference is not p.candidate
    names = [p.name for p in pairs]
    assert "original fp16 vs fp32 (eager)" in names and "original vs converted fp16 (sdpa)" in names
    assert "converted fp16 eager vs sdpa" in names
    assert not any(p.varies == "as shipped" for p in pairs)

    loads.clear()
    shipped_pairs, _ = story01.standard_pairs("orig", "conv", loader=loader, shipped={"original": "eager", "converted": "sdpa"})
    extra = [p for p in shipped_pairs if p.varies == "as shipped"]
    assert [p.name for p in extra] == ["original vs converted fp32 (as shipped: eager vs sdpa)",
                                       "original vs converted fp16 (as shipped: eager vs sdpa)"]
    by_name = {p.name: p for p in shipped_pairs}
    assert extra[1].reference is by_name["original fp16 vs fp32 (eager)"].candidate
    assert extra[1].candidate is by_name["converted fp16 vs fp32 (sdpa)"].candidate
    assert len(loads) == 8  # the shipped runs are among the variants already loaded


def test_standard_pairs_skip_a_variant_that_cannot_load():
    def loader(source, *, dtype, device, attn_implementation):
        if source == "orig" and attn_implementation == "sdpa":
            raise ParityKitError("remote code without sdpa")
        return torch.nn.Linear(1, 1), None

    with pytest.warns(UserWarning, match="skipping pairs with orig"):
        pairs, _ = story01.standard_pairs("orig", "conv", loader=loader)
    names = [p.name for p in pairs]
    assert "converted fp16 vs fp32 (sdpa)" in names and "original fp16 vs fp32 (sdpa)" not in names
    assert "original fp16 eager vs sdpa" not in names and "converted fp16 eager vs sdpa" in names


# --- bad input -----------------------------------------------------------------------------------------

def test_bad_inputs_raise():
    model = tiny_llama()
    with pytest.raises(ParityKitError, match="vocabularies"):
        gen.lockstep_greedy(model, tiny_llama(vocab_size=80), [1, 2], progress=False)
    with pytest.raises(ParityKitError, match="vocabularies"):
        gen.teacher_forced(model, tiny_llama(vocab_size=80), [1, 2])
    with pytest.raises(ParityKitError, match="different vocabularies"):
        gen.lockstep_greedy(model, model, "ab", ref_tokenizer=char_tokenizer(),
                            cand_tokenizer=char_tokenizer(CHARS[::-1]), progress=False)
    with pytest.raises(ParityKitError, match="context"):
        gen.lockstep_greedy(model, model, list(range(4, 60)), max_new_tokens=10, progress=False)
    with pytest.raises(ParityKitError, match="context"):
        gen.teacher_forced(model, model, [5] * 65)
    for bad in (0, -3):
        with pytest.raises(ParityKitError, match="max_new_tokens"):
            gen.lockstep_greedy(model, model, [1, 2], max_new_tokens=bad, progress=False)
    with pytest.raises(ParityKitError, match="max_new_tokens"):
        divergence.divergence_statistics({"p": (model, model)}, [[1, 2]], None, max_new_tokens=0, progress=False)
    for empty in ([], torch.zeros(1, 0, dtype=torch.long)):
        with pytest.raises(ParityKitError, match="no tokens"):
            gen.lockstep_greedy(model, model, empty, progress=False)
        with pytest.raises(ParityKitError, match="no tokens"):
            gen.teacher_forced(model, model, empty)
    with pytest.raises(ParityKitError, match="empty"):
        gen.lockstep_greedy(model, model, "   ", ref_tokenizer=char_tokenizer(), progress=False)
    with pytest.raises(ParityKitError, match="batch"):
        gen.lockstep_greedy(model, model, torch.ones(2, 3, dtype=torch.long), progress=False)
    with pytest.raises(ParityKitError, match="string"):
        gen.lockstep_greedy(model, model, [1, 2], ref_tokenizer=char_tokenizer(), cand_tokenizer=char_tokenizer(),
                            compare_by_text=True, progress=False)
    with pytest.raises(ParityKitError, match="both ref_tokenizer and cand_tokenizer"):
        gen.lockstep_greedy(model, model, "ab", ref_tokenizer=char_tokenizer(), compare_by_text=True, progress=False)


# --- original InternLM2 vs its Llama conversion ----------------------------------------------------------

@pytest.fixture(scope="module")
def converted_pair(tmp_path_factory):
    """A random InternLM2 (GQA: 4 heads, 2 KV heads), saved, converted, and loaded back as plain Llama."""
    from parity_kit.models.convert import convert_internlm2_to_llama
    from parity_kit.models.internlm2 import InternLM2Config, InternLM2ForCausalLM

    folder = tmp_path_factory.mktemp("internlm2")
    torch.manual_seed(0)
    config = InternLM2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bias=False,
                             initializer_range=0.2)
    InternLM2ForCausalLM(config).save_pretrained(folder / "internlm2")
    convert_internlm2_to_llama(folder / "internlm2", folder / "llama")

    def load(dtype: torch.dtype):
        original = InternLM2ForCausalLM.from_pretrained(folder / "internlm2", dtype=dtype).eval()
        converted = LlamaForCausalLM.from_pretrained(folder / "llama", dtype=dtype).eval()
        return original, converted

    return load


def test_teacher_forced_converted_fp32_is_at_rounding_floor(converted_pair):
    original, converted = converted_pair(torch.float32)
    ids = list(range(4, 44))
    table = gen.teacher_forced(original, converted, ids)
    assert table["argmax_agree"].all()
    # A wrong q/k/v split or rename gives O(1). A right one differs by fp32 arithmetic only: no more than the
    # original's own fp32 logits differ from its fp64 logits, position by position (a few times at most).
    fp64, _ = converted_pair(torch.float64)
    rounding = gen.teacher_forced(fp64, original, ids)["logit_rel_rms"]
    assert rounding.max() < 1e-5
    assert table["logit_rel_rms"].max() < 4 * rounding.max()
    result = gen.lockstep_greedy(original, converted, ids[:6], max_new_tokens=20, progress=False, stop_at_eos=False)
    assert result.first_divergent_step is None


def test_teacher_forced_detects_a_wrong_qkv_split(converted_pair):
    original, converted = converted_pair(torch.float32)
    with torch.no_grad():  # swap two query heads that share a KV head: a plausible converter bug
        q = converted.model.layers[0].self_attn.q_proj.weight
        head = converted.config.hidden_size // converted.config.num_attention_heads
        q[:head], q[head:2 * head] = q[head:2 * head].clone(), q[:head].clone()
    table = gen.teacher_forced(original, converted, list(range(4, 44)))
    assert table["logit_rel_rms"].median() > 1000 * nominal_floor("fp32")


def test_mapping_covers_every_module_of_both_models(converted_pair):
    from parity_kit.comparison.mapping import internlm2_to_llama

    original, converted = converted_pair(torch.float32)
    assert internlm2_to_llama(original.config).unmatched(original, converted) == ([], [])


def test_layer_comparison_fp32_at_floor_and_fp16_above_it(converted_pair):
    profiles = {}
    for dtype in (torch.float32, torch.float16):
        original, converted = converted_pair(dtype)
        table = layer_view.layer_comparison(original, converted, list(range(4, 24)))
        layers = table[table["module"].str.fullmatch(r"model\.layers\.\d+")]
        assert (layers["status"] == "ok").all() and len(layers) == original.config.num_hidden_layers
        profiles[dtype] = layer_view.layer_profile(table)
    fp32, fp16 = profiles[torch.float32], profiles[torch.float16]
    assert fp32["label"].tolist() == ["embed", "0", "1", "norm", "logits"]
    assert fp32.loc[fp32["label"] == "embed", "rel_rms"].item() == 0  # the embedding is copied bit for bit
    assert (fp32["floor_ratio"] < 30).all()
    assert fp16["rel_rms"].iloc[1:].min() > fp32["rel_rms"].iloc[1:].max()  # fp16 rounding shows through


def test_plots_from_real_results(converted_pair):
    from matplotlib.figure import Figure

    from parity_kit import plots

    original, converted = converted_pair(torch.float32)
    low = converted_pair(torch.float16)[1]
    result = gen.lockstep_greedy(converted, low, [5, 6, 7], max_new_tokens=12, progress=False, stop_at_eos=False)
    assert isinstance(plots.lockstep_margins(result), Figure)
    stats = divergence.divergence_statistics({"fp16 vs fp32": (converted, low), "self": (original, original)},
                                      [[5, 6, 7], [9, 10]], None, max_new_tokens=8, progress=False, stop_at_eos=False)
    assert isinstance(plots.divergence_histogram(stats, 8), Figure)
    profile = layer_view.layer_profile(layer_view.layer_comparison(original, converted, [5, 6, 7, 8]))
    assert isinstance(plots.layer_error_profile({"fp32": profile}), Figure)
    with pytest.raises(ParityKitError):
        plots.divergence_histogram(stats.drop(columns="pair"), 8)


# --- the conclusion follows the numbers --------------------------------------------------------------------

def _fake_stats(fractions: dict[tuple[str, str, str, str], float], prompts: int = 4) -> pd.DataFrame:
    rows = []
    for (name, varies, attention, dtype_setting), fraction in fractions.items():
        for i in range(prompts):
            diverged = i < round(fraction * prompts)
            rows.append({"pair": name, "varies": varies, "model": "x", "attention": attention, "dtype": dtype_setting,
                         "prompt_index": i, "diverged": diverged, "first_divergent_step": 10 + i if diverged else None,
                         "ref_margin_at_divergence": 0.01 if diverged else float("nan"),
                         "margin_percentile": 0.0 if diverged else float("nan"), "median_ref_margin": 2.0,
                         "logit_rel_rms_median": 1e-3, "logit_max_abs_median": 0.02,
                         "after_newline": diverged, "newline_step_fraction": 0.1})
    stats = pd.DataFrame(rows)
    stats["first_divergent_step"] = stats["first_divergent_step"].astype("Int64")
    return stats


def _conclusion_inputs() -> dict:
    model = tiny_llama(seed=12)
    same = gen.lockstep_greedy(model, model, [3, 4], max_new_tokens=4, progress=False, stop_at_eos=False)
    # fp32 layers within 6 roundings (exact up to rounding), fp16 layers 1000x further
    profile = pd.DataFrame({"rel_rms": [1e-7, 2e-7], "floor_ratio": [3.0, 6.0]})
    return dict(prompt="who are you", case={"original": same, "converted": same}, teacher={},
                profiles={"fp32": profile, "fp16": profile * 1000}, dtype="fp16", reference_dtype="fp32",
                shipped={"original": "eager", "converted": "sdpa"}, max_new_tokens=4)


def _conclude_and_judge(stats: pd.DataFrame, **overrides) -> tuple[str, dict, story01.DivergenceVerdict]:
    """The conclusion, its figures and the judgements it is rendered from, for the same measurements."""
    inputs = {**_conclusion_inputs(), **overrides}
    text, figures = story01.conclude_divergence(stats=stats, **inputs)
    verdict = story01.judge_divergence(stats, inputs["profiles"], dtype=inputs["dtype"],
                                       reference_dtype=inputs["reference_dtype"], shipped=inputs["shipped"])
    return text, figures, verdict


def test_conclusion_names_the_factor_the_numbers_point_to():
    dtype_heavy = _fake_stats({("original fp16 vs fp32 (eager)", "dtype", "eager", "fp16 vs fp32"): 0.75,
                               ("converted fp16 vs fp32 (sdpa)", "dtype", "sdpa", "fp16 vs fp32"): 0.25,
                               ("original vs converted fp32 (eager)", "conversion", "eager", "fp32"): 0.0,
                               ("original fp16 eager vs sdpa", "attention", "eager vs sdpa", "fp16"): 0.25})
    text, figures, verdict = _conclude_and_judge(dtype_heavy)
    # the dtype pairs pool 3 + 1 of 8 generations; attention 1 of 4; conversion none
    assert (verdict.main_factor, verdict.main_fraction) == ("fp16 vs fp32 (dtype)", 0.5)
    assert figures["main_factor_diverged_fraction"] == 0.5 and verdict.main_factor in text and "50%" in text
    assert verdict.more_sensitive == "original"  # 75% of the original's shipped generations diverge, 25% of the converted's
    assert figures["diverged_fraction_original_shipped"] == 0.75
    assert figures["diverged_fraction_converted_shipped"] == 0.25
    assert figures["diverged_fraction_by_factor"]["conversion in fp32"] == 0.0
    assert verdict.conversion == "within rounding" and figures["layer_max_floor_ratio_fp32"] == 6.0
    # margins: 0.01 at the divergent step against a median of 2 over all steps
    assert verdict.margin_ratio == pytest.approx(200)
    assert (figures["median_margin_at_divergence"], figures["median_margin_overall"]) == (0.01, 2.0)
    assert f"{verdict.margin_ratio:.0f}×" in text

    attention_heavy = _fake_stats({("original fp16 vs fp32 (eager)", "dtype", "eager", "fp16 vs fp32"): 0.0,
                                   ("converted fp16 vs fp32 (sdpa)", "dtype", "sdpa", "fp16 vs fp32"): 0.25,
                                   ("original vs converted fp32 (eager)", "conversion", "eager", "fp32"): 0.0,
                                   ("original fp16 eager vs sdpa", "attention", "eager vs sdpa", "fp16"): 1.0})
    text, _, verdict = _conclude_and_judge(attention_heavy)
    assert (verdict.main_factor, verdict.main_fraction) == ("attention implementation in fp16", 1.0)
    assert verdict.main_factor in text and "100%" in text
    assert verdict.more_sensitive == "converted"

    nothing = _fake_stats({("original fp16 vs fp32 (eager)", "dtype", "eager", "fp16 vs fp32"): 0.0})
    _, figures, verdict = _conclude_and_judge(nothing)
    assert verdict.main_factor is None and figures["main_factor_diverged_fraction"] == 0.0
    assert verdict.more_sensitive == "not measured"  # the converted model's shipped pair was not run
    both_quiet = _fake_stats({("original fp16 vs fp32 (eager)", "dtype", "eager", "fp16 vs fp32"): 0.0,
                              ("converted fp16 vs fp32 (sdpa)", "dtype", "sdpa", "fp16 vs fp32"): 0.0})
    text, _, verdict = _conclude_and_judge(both_quiet)
    assert verdict.more_sensitive == "neither" and "equally sensitive" not in text  # 0% and 0%: nothing to rank
    assert math.isnan(verdict.margin_ratio)


def test_conclusion_judges_the_conversion_from_the_reference_dtype_layer_profile():
    stats = _fake_stats({("original fp16 vs fp32 (eager)", "dtype", "eager", "fp16 vs fp32"): 0.5})
    exact = pd.DataFrame({"rel_rms": [0.0, 0.0], "floor_ratio": [0.0, 0.0]})
    off = pd.DataFrame({"rel_rms": [1e-3, 2e-3], "floor_ratio": [1e3, 2e3]})  # far beyond SAME_DTYPE_TOLERANCE
    assert _conclude_and_judge(stats, profiles={"fp32": exact, "fp16": exact})[2].conversion == "bit-exact"
    text, figures, verdict = _conclude_and_judge(stats, profiles={"fp32": off, "fp16": off})
    assert verdict.conversion == "beyond rounding" and figures["layer_max_floor_ratio_fp32"] == 2e3
    assert "2e+03×" in text
    assert _conclude_and_judge(stats, profiles={"fp16": off})[2].conversion == "not measured"


def test_story_panel_runs_the_case_study_and_shows_errors():
    from matplotlib.figure import Figure

    import parity_kit as pk

    seen = []

    def explore(p):
        result = story01.case_study(p["model"], dtype=p["dtype"], reference_dtype=p["ref_dtype"], device=p["device"],
                                attn_implementation=p["attn_implementation"], prompt=p["prompt"],
                                max_new_tokens=p["max_new_tokens"])
        seen.append(result)
        return [result, pk.plots.lockstep_margins(result), result.steps]

    panel = pk.ui.story_panel(explore, model="tiny-internlm2", extra_models=["tiny-internlm2-llama"], dtype="fp16",
                              ref_dtype="fp32", device="cpu", attn_implementation="eager", prompt="who are you",
                              max_new_tokens=6)
    panel.click()
    assert panel.error is None
    result, fig, steps = panel.results
    assert result.labels == ("tiny-internlm2 fp32", "tiny-internlm2 fp16") and isinstance(fig, Figure)
    assert len(steps) == 6
    panel.set(model="tiny-internlm2-llama", dtype="bf16", attn_implementation="sdpa", max_new_tokens=3)
    panel.click()
    assert panel.error is None and seen[-1].labels == ("tiny-internlm2-llama fp32", "tiny-internlm2-llama bf16")
    panel.set(max_new_tokens=0)
    panel.click()
    assert panel.results == [] and "max_new_tokens" in panel.error
