"""The chunked-vs-recurrent prefill harness (parity_kit.prefill)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from parity_kit.errors import ParityKitError
from parity_kit.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
from parity_kit.paths import data_dir
from parity_kit import prefill
from parity_kit.prefill import (
    FLA_MODES, OUR_MODES, boundary_positions, capture_wkv_inputs, compare_prefill, fla_unavailable_reason,
    lastword_by_mode, model_mode_comparison, prefill_then_decode, run_mode, sweep,
)
from parity_kit.recurrence import random_wkv_inputs

HAS_FLA_GPU = torch.cuda.is_available() and importlib.util.find_spec("fla") is not None


def tiny_model(**overrides) -> RWKV7ForCausalLM:
    torch.manual_seed(0)
    kw = dict(hidden_size=64, num_hidden_layers=2, head_dim=32, vocab_size=64, decay_low_rank_dim=8,
              gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8)
    cfg = RWKV7Config(**{**kw, **overrides})
    model = RWKV7ForCausalLM(cfg).eval()
    # from-scratch init zeroes several projections; perturb so every path carries signal
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_fp64_every_mode_matches_reference_to_1e12_outputs_states_and_boundaries():
    x = random_wkv_inputs(1, 100, 2, 16, dtype=torch.float64, seed=1)  # 100 = 3 chunks of 32 + a tail
    res = compare_prefill(x, dtypes=("fp64",), modes=OUR_MODES, chunk_size=32)
    assert set(res.summary["mode"]) == {*OUR_MODES, "reference_rounded"}
    assert (res.summary["status"] == "ok").all()
    assert res.summary["max_abs"].max() <= 1e-12
    assert res.boundaries["max_abs"].max() <= 1e-12
    assert sorted(res.boundaries["position"].unique()) == [0, 32, 64, 96, 100]
    # the comparison must see something: the reference itself is far from zero
    ref = run_mode(x, "reference", chunk_size=32)
    assert float(ref.output.abs().max()) > 1.0 and float(ref.final_state.abs().max()) > 0.1


def test_fp64_prefill_then_decode_matches_full_prefill():
    x = random_wkv_inputs(1, 70, 2, 16, dtype=torch.float64, seed=2)
    table = prefill_then_decode(x, 48, dtype="fp64", chunk_size=16)
    assert (table["status"] == "ok").all()
    assert table["max_abs"].max() <= 1e-12


def test_bf16_errors_nonzero_and_ordered():
    x = random_wkv_inputs(1, 256, 2, 32, dtype=torch.float64, seed=3)
    s = compare_prefill(x, dtypes=("bf16",), modes=OUR_MODES, chunk_size=64).summary
    alg = s[(s["reference"] == "fp64_rounded")].set_index(["mode", "tensor"])["rel_rms"]
    for mode in OUR_MODES:
        assert alg[(mode, "output")] > 0 and alg[(mode, "state")] > 0
    # keeping the state in fp32 beats rounding it every step, for the output and the state
    assert alg[("recurrent_fp32_state", "state")] < alg[("recurrent_low_state", "state")]
    assert alg[("recurrent_fp32_state", "output")] < alg[("recurrent_low_state", "output")]
    # fp32 intermediates beat bf16 ones
    assert alg[("chunk_fp32", "output")] < alg[("chunk_low", "output")]
    # the rounding of the inputs alone is a non-zero floor for the total error
    floor = s[(s["mode"] == "reference_rounded")].set_index("tensor")["rel_rms"]
    assert floor["output"] > 0 and floor["state"] > 0


def test_rounded_reference_is_the_reference_when_inputs_are_representable():
    x = tuple(t.to(torch.bfloat16).to(torch.float64) for t in random_wkv_inputs(1, 64, 2, 16, seed=4))
    s = compare_prefill(x, dtypes=("bf16",), modes=("chunk_low",), chunk_size=16).summary
    floor = s[s["mode"] == "reference_rounded"]
    assert (floor["max_abs"] == 0).all()
    by_ref = s[s["mode"] == "chunk_low"].set_index(["reference", "tensor"])
    for tensor in ("output", "state"):
        for metric in ("max_abs", "mean_abs", "rel_rms"):
            assert by_ref.loc[("fp64", tensor), metric] == by_ref.loc[("fp64_rounded", tensor), metric]
    # and unrounded inputs do make the two references differ
    raw = compare_prefill(random_wkv_inputs(1, 64, 2, 16, dtype=torch.float64, seed=4), dtypes=("bf16",),
                          modes=(), chunk_size=16).summary
    assert (raw["max_abs"] > 0).all()


def test_boundary_states_of_chunk_and_recurrent_modes_agree_in_fp32():
    x = random_wkv_inputs(1, 96, 2, 16, dtype=torch.float32, seed=5)
    chunk = run_mode(x, "chunk_fp32", chunk_size=32)
    rec = run_mode(x, "recurrent_fp32_state", chunk_size=32)
    assert chunk.positions == rec.positions == [0, 32, 64, 96]
    assert chunk.boundary_states.shape == rec.boundary_states.shape == (1, 4, 2, 16, 16)
    assert torch.allclose(chunk.boundary_states, rec.boundary_states, atol=1e-4)
    assert torch.equal(rec.boundary_states[:, -1], rec.final_state)
    # segmenting the recurrence at the boundaries is the same arithmetic as one run
    whole_o, whole_s = prefill.wkv_recurrent(*x)
    assert torch.equal(whole_o, rec.output) and torch.equal(whole_s, rec.final_state)


def test_sweep_is_tidy_over_lengths_chunk_sizes_and_dtypes():
    table = sweep([32, 64], dtypes=("bf16", "fp16"), chunk_sizes=(16, 32), modes=("chunk_low",), heads=1,
                  head_dim=8, progress=False)
    assert {"mode", "dtype", "T", "chunk_size", "reference", "tensor", "max_abs", "mean_abs", "rel_rms"} <= set(table)
    assert set(table["T"]) == {32, 64} and set(table["chunk_size"]) == {16, 32} and set(table["dtype"]) == {"bf16", "fp16"}
    assert not table.duplicated(["mode", "dtype", "T", "chunk_size", "reference", "tensor"]).any()
    with pytest.raises(ParityKitError, match="lengths go up to"):
        sweep([128], inputs=random_wkv_inputs(1, 64, 1, 8, dtype=torch.float64), progress=False)


def test_fla_missing_is_a_skipped_result_not_a_failure(monkeypatch):
    monkeypatch.setattr(prefill.importlib.util, "find_spec", lambda name, *a: None)
    reason = fla_unavailable_reason()
    assert "flash-linear-attention" in reason
    x = random_wkv_inputs(1, 32, 1, 8, dtype=torch.bfloat16)
    run = run_mode(x, "fla_chunk", chunk_size=16)
    assert run.skipped == f"skipped: {reason}" and run.output is None
    s = compare_prefill(x, dtypes=("bf16",), modes=("fla_chunk", "fla_fused_recurrent", "chunk_low"), chunk_size=16).summary
    fla_rows = s[s["mode"].isin(FLA_MODES)]
    assert len(fla_rows) and fla_rows["status"].str.startswith("skipped:").all() and fla_rows["max_abs"].isna().all()
    assert (s[s["mode"] == "chunk_low"]["status"] == "ok").all()
    t = prefill_then_decode(x, 16, prefill_mode="fla_chunk", decode_mode="fla_fused_recurrent", chunk_size=16)
    assert t["status"].str.startswith("skipped:").all()


def test_fla_without_cuda_names_the_gpu(monkeypatch):
    monkeypatch.setattr(prefill.importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(prefill.torch.cuda, "is_available", lambda: False)
    assert "CUDA" in fla_unavailable_reason()


@pytest.mark.skipif(not HAS_FLA_GPU, reason="needs a CUDA GPU and flash-linear-attention==0.6.0")
def test_fla_kernels_run_side_by_side_with_ours():
    x = random_wkv_inputs(1, 256, 16, 64, dtype=torch.float64, seed=0, device="cuda")  # the benchmark's shape
    s = compare_prefill(x, dtypes=("bf16", "fp32"), modes=(*FLA_MODES, "chunk_low", "recurrent_fp32_state"),
                        chunk_size=64).summary
    assert (s["status"] == "ok").all()
    fp64 = s[s["reference"] == "fp64"].set_index(["dtype", "mode", "tensor"])["rel_rms"]
    assert fp64[("fp32", "fla_fused_recurrent", "output")] <= 2e-3
    assert fp64[("fp32", "fla_chunk", "output")] <= 1e-2
    for mode in FLA_MODES:
        assert 0 < fp64[("bf16", mode, "output")] <= 5e-2
    assert (s[s["mode"].isin(FLA_MODES)]["segmentation_gap"] <= 1e-2).all()


def test_bad_inputs_raise_parity_kit_errors():
    x = random_wkv_inputs(1, 16, 1, 8, dtype=torch.float64)
    with pytest.raises(ParityKitError, match="unknown prefill mode"):
        run_mode(x, "parallel")
    with pytest.raises(ParityKitError, match="6 tensors"):
        compare_prefill(x[:5])
    with pytest.raises(ParityKitError, match="prefill_tokens"):
        prefill_then_decode(x, 16)
    with pytest.raises(ParityKitError, match="positive integer"):
        boundary_positions(16, 0)


def test_capture_wkv_inputs_from_a_real_forward():
    model = tiny_model()
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    x = capture_wkv_inputs(model, ids, layer=1)
    assert [tuple(t.shape) for t in x] == [(1, 40, 2, 32)] * 6
    assert bool((x[1] < 0).all() and (x[1] > -0.61).all())  # log decays in RWKV-7's range
    res = compare_prefill(x, dtypes=("fp64",), modes=("chunk_fp32", "recurrent_fp32_state"), chunk_size=16)
    assert res.summary["max_abs"].max() <= 1e-12
    with pytest.raises(ParityKitError, match="out of range"):
        capture_wkv_inputs(model, ids, layer=5)


def test_model_mode_comparison_logits_and_layers():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(1))
    res = model_mode_comparison(model, ids, dtypes=("fp32", "bf16"), modes=("recurrent_fp32_state", "chunk_low"),
                                chunk_size=16)
    s = res.summary
    assert set(s["tensor"]) == {"logits", "wkv output", "wkv state", "block output"}
    assert set(s[s["tensor"] == "wkv state"]["layer"]) == {0, 1}
    logits = s[s["tensor"] == "logits"].set_index(["dtype", "mode"])["rel_rms"]
    for mode in ("recurrent_fp32_state", "chunk_low"):
        assert 0 < logits[("fp32", mode)] < logits[("bf16", mode)]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ParityKitError, match="FLA modes"):
        model_mode_comparison(model, ids, modes=("fla_chunk",))


def test_lastword_by_mode_on_a_few_documents():
    path = data_dir() / "eval" / "lastword.jsonl"
    tok_file = data_dir() / "tokenizer" / "tokenizer.json"
    if not path.exists() or not tok_file.exists():
        pytest.skip("data/eval/lastword.jsonl or data/tokenizer is not generated yet")
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), bos_token="<s>", eos_token="</s>")
    model = tiny_model(vocab_size=len(tok)) if len(tok) > 64 else tiny_model()
    table = lastword_by_mode(model, tok, path, dtypes=("bf16",), modes=("chunk_low",), limit=4, n_bootstrap=50,
                             chunk_size=16)
    assert list(table["mode"]) == ["reference", "chunk_low"]
    assert table["ppl"].map(math.isfinite).all() and (table["n"] == 4).all()


def test_prefill_plots_from_harness_tables():
    from matplotlib.figure import Figure

    from parity_kit import plots

    x = random_wkv_inputs(1, 64, 2, 8, dtype=torch.float64, seed=6)
    res = compare_prefill(x, dtypes=("bf16", "fp16"), modes=("chunk_low", "recurrent_fp32_state"), chunk_size=16)
    table = sweep([32, 64], dtypes=("bf16",), chunk_sizes=(16, 32), modes=("chunk_low",), inputs=x, progress=False)
    figs = [plots.prefill_error_vs_position(res.per_token), plots.prefill_state_at_boundaries(res.boundaries),
            plots.prefill_error_vs_length(table[table["chunk_size"] == 16]),
            plots.prefill_error_vs_chunk_size(table[table["T"] == 64], reference="fp64_rounded")]
    assert all(isinstance(f, Figure) for f in figs)
    # one line per (mode, dtype) on the position plot, the input-rounding floor included: 3 modes x 2 dtypes
    ax = figs[0].axes[0]
    assert ax.get_yscale() == "log" and len(ax.get_legend().get_texts()) == 6
    with pytest.raises(ParityKitError, match="lacks columns"):
        plots.prefill_error_vs_length(res.summary.drop(columns=["reference"]))
    with pytest.raises(ParityKitError, match="no measured rows"):
        plots.prefill_state_at_boundaries(res.boundaries, reference="nonexistent")
