"""Calibrated verdicts (issue #23): healthy pairs read healthy, planted one-module faults are named, and nothing
downstream of them is blamed; the rounding-only run and the floor it measures."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import parity_kit as pk
from parity_kit.analyses.calibration import (accumulation_dtype, calibrate_floor, compare_models, rounding_only,
                                             without_cache)
from parity_kit.analyses.runs import build_tiny_llama, random_input_ids
from parity_kit.comparison.floor import COMPUTES_DIFFERENTLY, CONSISTENT, OWN, PRECISION_SENSITIVE
from parity_kit.dtypes import parse_dtype
from parity_kit.errors import ParityKitError
from parity_kit.testing import (LLAMA_FAULTS, groupnorm_mlp, hook_counts, plant_fault, plant_low_precision_groupnorm,
                                tiny_llama)

TOKENS = 64
#: (reference, candidate): both narrower candidates, fp32 against fp64, and the reverse order of bf16 / fp32
PAIRS = [("fp32", "bf16"), ("fp32", "fp16"), ("fp64", "fp32"), ("bf16", "fp32")]
TRANSFORMERS_MODELS = ("gpt2", "llama", "qwen2", "mistral")


def _transformers_model(kind: str) -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    if kind == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=512, n_embd=64, n_layer=4, n_head=4, n_positions=128,
                                              bos_token_id=0, eos_token_id=1)).eval()
    config_class, model_class = {"llama": (T.LlamaConfig, T.LlamaForCausalLM),
                                 "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
                                 "mistral": (T.MistralConfig, T.MistralForCausalLM)}[kind]
    return model_class(config_class(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()


_MODELS: dict[str, nn.Module] = {}


def _model(name: str) -> nn.Module:
    if name not in _MODELS:
        _MODELS[name] = (pk.models.load(name, dtype="fp32")[0] if name in pk.models.BUILTINS
                         else _transformers_model(name)).eval()
    return _MODELS[name]


def _assert_healthy(name: str, ref_dtype: str, cand_dtype: str) -> None:
    model = _model(name)
    ids = random_input_ids(model.config.vocab_size, TOKENS, 0)
    ref = copy.deepcopy(model).to(parse_dtype(ref_dtype))
    cand = copy.deepcopy(model).to(parse_dtype(cand_dtype))
    result = compare_models(ref, cand, ids, show_progress=False)
    verdict = result.verdict
    assert verdict["n_modules"] > 20
    assert verdict["n_modules_consistent"] >= 0.95 * verdict["n_modules"], (verdict, result.culprits())
    assert verdict["verdict"] == "healthy", (verdict, result.culprits())
    assert (result.table["floor_kind"][result.table["status"] == "ok"] == "calibrated").all()


@pytest.mark.parametrize("ref_dtype, cand_dtype", PAIRS)
@pytest.mark.parametrize("name", list(pk.models.BUILTINS))
def test_healthy_builtin_pairs_read_healthy(name, ref_dtype, cand_dtype):
    _assert_healthy(name, ref_dtype, cand_dtype)


@pytest.mark.parametrize("ref_dtype, cand_dtype", PAIRS)
@pytest.mark.parametrize("name", TRANSFORMERS_MODELS)
def test_healthy_transformers_configs_read_healthy(name, ref_dtype, cand_dtype):
    _assert_healthy(name, ref_dtype, cand_dtype)


def _assert_named(result, planted: str, cause: str) -> None:
    found = result.culprits()
    assert planted in found["module"].tolist()[:2], found
    assert found.set_index("module").loc[planted, "own_cause"] == cause
    table = result.table
    assert (table.loc[table["module"] == planted, "diagnosis"] == OWN).any()
    # nothing after the planted module blames itself, except the modules that contain it
    start = table.loc[table["module"] == planted, "order"].min()
    later = table[(table["order"] > start) & ~table["module"].map(lambda m: m == "" or planted.startswith(m + "."))]
    assert not (later["diagnosis"] == OWN).any(), later[later["diagnosis"] == OWN][["module", "own_floor_ratio"]]
    assert (later["diagnosis"].isin([CONSISTENT, "inherited"])).all()


@pytest.mark.parametrize("cand_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("fault", LLAMA_FAULTS)
def test_planted_llama_fault_is_named_and_nothing_downstream(fault, cand_dtype):
    ref = build_tiny_llama(seed=0, layers=4)
    cand = copy.deepcopy(ref)
    planted = plant_fault(cand, fault)
    result = compare_models(ref, cand.to(parse_dtype(cand_dtype)), random_input_ids(512, TOKENS, 0),
                            show_progress=False)
    _assert_named(result, planted, COMPUTES_DIFFERENTLY)
    assert result.verdict["verdict"] == "computes differently"


@pytest.mark.parametrize("cand_dtype", ["fp32", "bf16"])
def test_groupnorm_computed_in_bf16_without_upcast_is_named(cand_dtype):
    ref = groupnorm_mlp()
    cand = copy.deepcopy(ref)
    # in an fp32 model the GroupNorm explicitly computes in bf16; in a bf16 model it simply does not upcast
    planted = plant_low_precision_groupnorm(cand, 5, torch.bfloat16 if cand_dtype == "fp32" else None)
    x = torch.randn(TOKENS, 16, generator=torch.Generator().manual_seed(0))
    result = compare_models(ref, cand.to(parse_dtype(cand_dtype)), x, show_progress=False)
    if cand_dtype == "fp32":  # an explicit bf16 cast inside an fp32 model stays in fp64: a different function
        _assert_named(result, planted, COMPUTES_DIFFERENTLY)
        assert result.verdict["verdict"] == "computes differently"
    else:  # recomputed in fp64 it is the reference's GroupNorm: its bf16 arithmetic is what loses precision
        _assert_named(result, planted, PRECISION_SENSITIVE)
        assert result.verdict["verdict"] == "precision-sensitive"
        assert result.verdict["precision_sensitive"] == [planted]


def test_the_same_groupnorm_in_bf16_with_torch_kernels_is_rounding():
    # torch's CPU GroupNorm accumulates bf16 statistics in fp32: nothing to name, whatever the offset
    ref = groupnorm_mlp()
    result = compare_models(ref, copy.deepcopy(ref).bfloat16(), torch.randn(TOKENS, 16), show_progress=False)
    assert result.verdict["verdict"] == "healthy" and result.culprits().empty


def test_verdict_and_floors_do_not_depend_on_which_run_is_the_reference():
    model = tiny_llama(layers=2)
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])
    forward = compare_models(model, copy.deepcopy(model).bfloat16(), ids, show_progress=False)
    backward = compare_models(copy.deepcopy(model).bfloat16(), model, ids, show_progress=False)
    assert forward.floor.keyed_by == "reference" and backward.floor.keyed_by == "candidate"
    assert forward.table["floor"].tolist() == pytest.approx(backward.table["floor"].tolist(), rel=1e-9)
    assert forward.verdict["verdict"] == backward.verdict["verdict"] == "healthy"


def test_rounding_only_rounds_weights_and_every_boundary_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)).to(torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = hook_counts(model)
    seen = []
    with rounding_only(model, "bf16") as sim:
        sim[1].register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
        y = sim(torch.randn(3, 8))  # the copy computes in fp32, the accumulation dtype of bf16
        assert all(p.dtype == torch.float32 and bool((p == p.bfloat16().float()).all()) for p in sim.parameters())
    (inp, out), = seen
    for t in (inp, out, y):
        assert t.dtype == torch.float32 and bool((t == t.bfloat16().float()).all())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert hook_counts(model) == hooks_before and next(model.parameters()).dtype == torch.float64
    assert sum(len(m._forward_pre_hooks) for m in sim.modules()) == 0  # the copy's rounding hooks are gone
    assert accumulation_dtype("fp16") == torch.float32 and accumulation_dtype("fp32") == torch.float32


def test_calibrated_floor_counts_each_run_that_rounds():
    model, ids = tiny_llama(layers=1), torch.tensor([[1, 5, 9, 3, 7]])
    key = ("model.layers.0.mlp", 0, "output")
    one = calibrate_floor(model, ids, ("fp64", "fp32"), modules="model.layers.0.mlp")
    two = calibrate_floor(model, ids, ("fp32", "fp32"), modules="model.layers.0.mlp")
    none = calibrate_floor(model, ids, ("fp64", "fp64"), modules="model.layers.0.mlp")
    assert one.free(key) > 0 and two.free(key) == pytest.approx(math.sqrt(2) * one.free(key), rel=1e-9)
    assert math.isnan(none.free(key))  # fp64 against fp64 rounds nothing: the one-rounding floor applies
    bf16 = calibrate_floor(model, ids, ("fp32", "bf16"), modules="model.layers.0.mlp")
    assert bf16.free(key) > 1e3 * one.free(key) and bf16.own(key) > 0
    assert bf16.dtypes == ("fp32", "bf16") and "rounding" in bf16.components


def test_compare_models_reuses_recordings_and_reports_bad_input():
    model = tiny_llama(layers=1)
    ids = torch.tensor([[1, 5, 9, 3]])
    cand = copy.deepcopy(model).half()
    with torch.no_grad(), pk.record(model, "*", inputs=True) as ref_rec:
        model(ids)
    result = compare_models(model, cand, ids, ref_rec=ref_rec, show_progress=False)
    assert result.ref_rec is ref_rec and result.verdict["verdict"] == "healthy"
    with pytest.raises(ParityKitError, match="nn.Module"):
        compare_models("tiny-internlm2", cand, ids)
    with pytest.raises(ParityKitError, match="floor_tolerance"):
        compare_models(model, cand, ids, tolerance=-1)
    with pytest.raises(ParityKitError, match="two runs' dtypes"):
        calibrate_floor(model, ids, ("fp32",))
    with pytest.raises(ParityKitError, match="matched no module|no module"):
        calibrate_floor(model, ids, ("fp32", "bf16"), modules="nothing.here")


def test_inputs_run_without_cache_on_the_model_device():
    model = tiny_llama(layers=1)
    assert without_cache(model, torch.tensor([[1, 2]]))["use_cache"] is False
    assert without_cache(model, {"input_ids": torch.tensor([[1]]), "use_cache": True})["use_cache"] is True
    assert without_cache(nn.Linear(2, 2), torch.ones(1, 2)).shape == (1, 2)


def test_story01_verdicts_judge_the_conversion_through_its_mapping_and_record_counts():
    from parity_kit.comparison.floor import run_verdict, verdict_summary
    from parity_kit.stories import fp16_divergence as story01

    pairs, tokenizer = story01.standard_pairs("tiny-internlm2", "tiny-internlm2-llama", attn_implementations=("eager",))
    ids = tokenizer(story01.chat_prompt_for("who are you", tokenizer), return_tensors="pt")["input_ids"]
    verdicts = story01.module_verdicts({p.name: p for p in pairs}, ids, dtype="fp16", reference_dtype="fp32",
                                       attention="eager")
    # InternLM2's attention takes a boolean mask, Llama's an additive one: the replay keeps each run's own
    for key in ("converted vs original in fp32", "converted vs original in fp16"):
        assert verdicts[key].verdict["verdict"] == "healthy" and verdicts[key].culprits().empty, key
    summary = verdict_summary({key: r.table for key, r in verdicts.items()})
    for key, result in verdicts.items():
        judged = run_verdict(result.table)
        figures = result.figures("x_")
        assert figures["x_n_modules"] == judged["n_modules"] == summary.loc[key, "modules"] > 20
        assert figures["x_n_modules_consistent"] == summary.loc[key, CONSISTENT]
        assert sum(figures[f"x_n_modules_{k}"] for k in ("consistent", "own_error_above_floor", "inherited",
                                                           "above_floor", "not_finite")) == judged["n_modules"]
    with pytest.raises(ParityKitError, match="none of the pairs"):
        story01.module_verdicts({}, ids, dtype="fp16", reference_dtype="fp32", attention="eager")


def test_healthy_verdict_with_precision_sensitive_modules_does_not_say_every_error_is_within_its_floor():
    from parity_kit.comparison.floor import describe_verdict

    base = {"verdict": "healthy", "n_modules": 57, "n_modules_consistent": 55, "culprits": [],
            "culprit_own_floor_ratios": []}
    clean = describe_verdict({**base, "precision_sensitive": []}, "bf16")
    assert "every error is within its calibrated floor" in clean
    two = describe_verdict({**base, "precision_sensitive": ["l.2.attn", "l.0.attn"]}, "bf16")
    assert "every free-run error" in two and "every error is" not in two
    assert "l.2.attn, l.0.attn have own error above their floor" in two and "55 of 57" in two
    assert "l.2.attn has own error above its floor" in describe_verdict({**base, "precision_sensitive": ["l.2.attn"]}, "x")
