"""Acceptance scenarios of pk.triage: each plants a realistic conversion or deployment bug (or none) in the test,
on built-in models or small configs, and checks that the verdict's first cause names it; a correct pair is
never called a bug."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tokenizers import processors
from transformers import LlamaConfig, LlamaForCausalLM

from parity_kit._util.paths import data_dir
from parity_kit.analyses.runs import RunSpec
from parity_kit.analyses.triage import triage
from parity_kit.errors import ParityKitError
from parity_kit.models import load
from parity_kit.testing import groupnorm_mlp, plant_low_precision_groupnorm, tiny_llama

BUG_KINDS = {"config", "weights", "computes differently", "unexplained"}


def _llama_with_config(change: dict) -> tuple[LlamaForCausalLM, LlamaForCausalLM, object]:
    """The built-in Llama and a copy whose config.json was edited (``change``), weights loaded as they are."""
    ref, tok = load("tiny-internlm2-llama")
    config = ref.config.to_dict()
    config.update(change)
    cand = LlamaForCausalLM(LlamaConfig.from_dict(config)).eval()
    cand.load_state_dict(ref.state_dict())
    return ref, cand, tok


def test_wrong_rms_norm_eps_in_one_config_is_named_first():
    ref, cand, tok = _llama_with_config({"rms_norm_eps": 1e-5})   # the reference has 1e-6
    result = triage((ref, tok), (cand, tok), quick=True, show_progress=False)
    first = result.causes[0]
    assert first.kind == "config" and first.names == ["norm_eps"], result.verdict
    assert result.steps["precision or bug"]["branch"] == "bug"
    assert any("layernorm" in c["module"] or "norm" in c["module"] for c in result.steps["where"]["culprits"])


def test_wrong_rope_theta_is_named_first():
    ref, cand, tok = _llama_with_config({"rope_theta": 1e6,
                                         "rope_parameters": {**load("tiny-internlm2-llama")[0].config.rope_parameters,
                                                             "rope_theta": 1e6}})
    result = triage((ref, tok), (cand, tok), quick=True, show_progress=False)
    first = result.causes[0]
    assert first.kind == "config" and first.names == ["rope_theta"], result.verdict


def test_qk_rows_swapped_when_splitting_fused_wqkv_names_the_tensors():
    ref, tok = load("tiny-internlm2")
    cand, cand_tok = load("tiny-internlm2-llama")
    attn = cand.model.layers[1].self_attn
    hd = attn.head_dim
    with torch.no_grad():  # a split that takes head 0's query rows for the key and the other way round
        q_rows = attn.q_proj.weight[:hd].clone()
        attn.q_proj.weight[:hd] = attn.k_proj.weight[:hd]
        attn.k_proj.weight[:hd] = q_rows
    result = triage((ref, tok), (cand, cand_tok), quick=True, show_progress=False)
    first = result.causes[0]
    assert first.kind == "weights", result.verdict
    assert set(first.names) == {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"}
    assert result.steps["weights"]["mapping"] == "internlm2_to_llama"
    assert result.steps["where"]["culprits"][0]["module"] == "model.layers.1.attention.wqkv"


def test_missing_bos_in_the_candidate_pipeline_is_named_first():
    model, tok = load("tiny-internlm2-llama")
    served, served_tok = load("tiny-internlm2-llama")
    # a deployment whose tokenizer was rebuilt without the template that adds <s>
    served_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    items = data_dir() / "eval" / "lastword.jsonl"
    result = triage((model, tok), (served, served_tok), eval_items=items, eval_limit=24, max_new_tokens=8,
                    show_progress=False)
    first = result.causes[0]
    assert first.kind == "inputs" and first.names == ["BOS"], result.verdict
    assert not any(c.kind in BUG_KINDS for c in result.causes)
    assert result.steps["consequences"]["eval"]["n"] == 24


def test_groupnorm_computed_in_bf16_is_precision_with_the_module_named():
    ref = groupnorm_mlp(blocks=3)
    cand = copy.deepcopy(ref).to(torch.bfloat16)
    planted = plant_low_precision_groupnorm(cand, 5)     # one GroupNorm computes its statistics in bf16
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    result = triage(ref, cand, inputs=x, show_progress=False)
    first = result.causes[0]
    assert first.kind == "precision", result.verdict
    assert first.names[0] == planted
    assert result.steps["fix for precision"]["bisection"]["chosen"][0] == planted
    assert not any(c.kind in BUG_KINDS for c in result.causes)


def test_correct_conversion_in_bf16_is_rounding_only_never_a_bug(tmp_path):
    result = triage("tiny-internlm2", RunSpec("tiny-internlm2-llama", "bf16"), quick=True, show_progress=False)
    assert result.causes[0].kind == "rounding only", result.verdict
    assert not any(c.kind in BUG_KINDS for c in result.causes)
    assert "bug" not in result.verdict
    path = result.save(tmp_path / "triage.findings.json")
    saved = json.loads(path.read_text())
    assert saved["causes"][0]["kind"] == "rounding only" and "environment" in saved


def test_models_without_token_ids_need_inputs():
    with pytest.raises(ParityKitError, match="input_ids"):
        triage(tiny_llama(layers=1), tiny_llama(layers=1), show_progress=False)


def test_a_high_precision_twin_is_built_straight_in_its_dtype_and_where_it_fits(monkeypatch):
    from parity_kit._util import twins
    from parity_kit.testing import tiny_llama

    model = tiny_llama(layers=1).to(torch.bfloat16)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied weights stay tied in the copy
    copy64 = twins.twin(model, torch.float64, weights_in=torch.bfloat16, device="cpu")
    assert {p.dtype for p in copy64.parameters()} == {torch.float64}
    assert copy64.lm_head.weight is copy64.model.embed_tokens.weight
    assert all(torch.equal(a.double(), b) for a, b in zip(model.parameters(), copy64.parameters()))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the original is untouched
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        reference = copy.deepcopy(model).to(torch.float64)(ids).logits
        assert torch.equal(copy64(ids).logits, reference)
    assert twins.copy_bytes(model, torch.float64) == 4 * twins.copy_bytes(model, torch.bfloat16)
    assert twins.twin_device(model, torch.float64).type == "cpu"  # a CPU model's copy stays on the CPU


def test_a_twin_that_does_not_fit_the_gpus_free_memory_goes_to_the_host(monkeypatch):
    from parity_kit._util import twins
    from parity_kit.testing import tiny_llama

    model = tiny_llama(layers=1)
    need = twins.copy_bytes(model, torch.float64)
    monkeypatch.setattr(twins, "model_device", lambda _model: torch.device("cuda", 0))
    for free, expected in ((need // 2, "cpu"), (need * 2, "cuda")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _device, free=free: (free, 10 * need))
        assert twins.twin_device(model, torch.float64).type == expected
