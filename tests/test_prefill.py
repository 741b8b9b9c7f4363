"""The chunked-vs-recurrent prefill harness (parity_kit.analyses.prefill)."""

from __future__ import annotations

import importlib.util
import json
import math

import pandas as pd
import pytest
import torch

import parity_kit as pk
from parity_kit import prefill
from parity_kit._util.paths import data_dir
from parity_kit.analyses.prefill import (
    FLA_MODES,
    OUR_MODES,
    boundary_positions,
    compare_prefill,
    fla_unavailable_reason,
    prefill_then_decode,
    run_mode,
    sweep,
)
from parity_kit.analyses.prefill_model import (
    capture_wkv_inputs,
    lastword_by_mode,
    model_mode_comparison,
)
from parity_kit.errors import ParityKitError
from parity_kit.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
from parity_kit.models.wkv import random_wkv_inputs, wkv_recurrent
from parity_kit.stories.prefill_modes import (
    REPORTED_FIGURES,
    chunk_size_table,
    choose_prefill_modes,
    conclude_prefill,
    decode_comparison,
    error_pivot,
    explore,
    length_table,
    reported_vs_measured,
    state_growth,
    stored_kernel_figures,
    stored_kernel_table,
    story_plan,
)

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
    whole_o, whole_s = wkv_recurrent(*x)
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


# ----------------------------------------------------------------------------------------------- story 03 helpers

T_STORY = 512


def harness_rows(dtype: str, rel: dict[str, tuple[float, float]], direct: tuple[float, float] = (0.5, 0.02),
                 T: int = T_STORY, nonfinite: tuple[str, ...] = ()) -> list[dict]:
    """Summary rows as compare_prefill writes them: ``rel[mode] = (output rel_rms, state rel_rms)`` against fp64,
    ``direct`` the chunk_low vs recurrent max_abs; modes in ``nonfinite`` carry NaN and a failure status."""
    rows = []
    for mode, (out, state) in rel.items():
        for tensor, value in (("output", out), ("state", state)):
            bad = mode in nonfinite
            rows.append({"mode": mode, "dtype": dtype, "reference": "fp64", "T": T, "chunk_size": 64, "tensor": tensor,
                         "max_abs": 10 * value, "mean_abs": value, "rel_rms": math.nan if bad else value,
                         "status": f"non-finite values in the {tensor}" if bad else "ok"})
    for tensor, value in zip(("output", "state"), direct):
        rows.append({"mode": "chunk_low", "dtype": dtype, "reference": "recurrent", "T": T, "chunk_size": 64,
                     "tensor": tensor, "max_abs": value, "mean_abs": value / 10, "rel_rms": value / 100, "status": "ok"})
    return rows


def story_rel(chunk_low: float, chunk_fp32: float, recurrent: float = 1e-3) -> dict[str, tuple[float, float]]:
    return {"reference_rounded": (5e-4, 4e-4), "recurrent_fp32_state": (recurrent, 2e-3),
            "recurrent_low_state": (4 * recurrent, 8e-3), "chunk_fp32": (chunk_fp32, 3e-3),
            "chunk_low": (chunk_low, 6e-3)}


def lastword_table(dtypes=("bf16",), z: float = 0.5, failed: tuple[str, ...] = ()) -> pd.DataFrame:
    rows = [{"dtype": "fp64", "mode": "reference", "ppl": 20.0, "z": math.nan, "n": 24, "status": "ok"}]
    for i, d in enumerate(dtypes):
        for j, mode in enumerate(("recurrent_fp32_state", "chunk_low")):
            bad = f"{d} {mode}" in failed
            rows.append({"dtype": d, "mode": mode, "ppl": math.nan if bad else 20.0 + i + j,
                         "z": math.nan if bad else z * (1 + j), "n": 24, "status": "non-finite logits" if bad else "ok"})
    return pd.DataFrame(rows)


def model_summary(dtypes=("bf16",)) -> pd.DataFrame:
    return pd.DataFrame([{"dtype": d, "mode": m, "tensor": t, "layer": None, "rel_rms": 1e-3 * (i + 1)}
                         for i, d in enumerate(dtypes) for m in ("recurrent_fp32_state", "chunk_low")
                         for t in ("logits", "wkv output")])


def conclude(lengths: list[dict], *, dtypes=("bf16",), lastword=None, stored=None, output_rms: float = 2.0):
    """Story 03's conclusion and figures from harness-shaped rows, with the per-dtype choices it states."""
    text, figures = conclude_prefill(pd.DataFrame(lengths), lastword if lastword is not None else lastword_table(dtypes),
                                     model_summary(dtypes), stored if stored is not None else pd.DataFrame(),
                                     dtypes=list(dtypes), seq_len=T_STORY, output_rms=output_rms)
    return text, figures, choose_prefill_modes(pd.DataFrame(lengths), dtypes=list(dtypes), seq_len=T_STORY)


def test_conclusion_recommends_low_precision_chunk_when_it_is_close_to_recurrent():
    text, figures, choice = conclude(harness_rows("bf16", story_rel(chunk_low=1.2e-3, chunk_fp32=1.05e-3)))
    bf16 = choice["bf16"]
    assert bf16.mode == "chunk_low" and bf16.chunk_low_ratio == pytest.approx(1.2)  # within 1.5x the recurrent error
    assert bf16.low_state_ratio == pytest.approx(4.0)  # a bf16 state: 8e-3 against 2e-3
    assert f"{bf16.chunk_low_ratio:.2f}x" in text and f"{bf16.low_state_ratio:.1f}x" in text
    k = f"bf16_T{T_STORY}_"
    assert figures[k + "chunk_low_output_rel_rms"] == 1.2e-3 and figures[k + "floor_output_rel_rms"] == 5e-4
    assert figures[k + "chunk_low_vs_recurrent_output_max_abs"] == 0.5
    assert figures[k + "direct_output_max_over_output_rms"] == 0.25  # 0.5 / output rms 2.0
    assert figures["reported_198_output_max"] == REPORTED_FIGURES[0][3]
    assert f"{figures['reported_198_output_max']}" in text and f"{figures['reported_198_state_max']}" in text
    assert figures["lastword_n"] == 24 and figures["lastword_modes_nonfinite"] == 0
    assert figures["logits_bf16_chunk_low_rel_rms"] == 1e-3
    # the largest last-word |z| of any finite mode: chunk_low's 1.0 (recurrent's is 0.5)
    assert figures["lastword_bf16_chunk_low_z"] == 1.0 and "1.00" in text
    assert not any(key.startswith("stored_h200") for key in figures)


def test_conclusion_flips_to_fp32_intermediates_then_to_recurrent():
    text, _, choice = conclude(harness_rows("bf16", story_rel(chunk_low=3e-3, chunk_fp32=1.1e-3)))
    assert choice["bf16"].mode == "chunk_fp32"  # bf16 intermediates 3x the recurrent error, fp32 ones 1.1x
    assert f"{choice['bf16'].chunk_fp32_ratio:.2f}x" in text and f"{choice['bf16'].chunk_low_ratio:.2f}x" in text
    text, figures, choice = conclude(harness_rows("bf16", story_rel(chunk_low=3e-3, chunk_fp32=2e-3)))
    assert choice["bf16"].mode == "recurrent_fp32_state" and choice["bf16"].chunk_fp32_ratio == pytest.approx(2.0)
    assert figures[f"bf16_T{T_STORY}_chunk_fp32_output_rel_rms"] == 2e-3


def test_conclusion_names_an_overflowing_chunk_mode_per_dtype():
    rows = (harness_rows("fp16", story_rel(chunk_low=1e-3, chunk_fp32=1.1e-3), nonfinite=("chunk_low",))
            + harness_rows("bf16", story_rel(chunk_low=1.1e-3, chunk_fp32=1e-3)))
    lastword = lastword_table(("fp16", "bf16"), failed=("fp16 chunk_low",))
    text, figures, choice = conclude(rows, dtypes=("fp16", "bf16"), lastword=lastword)
    # fp16 chunk_low overflows, so fp16 falls back to fp32 intermediates though its finite figure would have passed
    assert choice["fp16"].mode == "chunk_fp32" and math.isnan(choice["fp16"].chunk_low_ratio)
    assert choice["bf16"].mode == "chunk_low"
    assert math.isnan(figures[f"fp16_T{T_STORY}_chunk_low_output_rel_rms"])
    assert figures["lastword_modes_nonfinite"] == 1 and "fp16 chunk_low" in text  # the failed run is named
    assert list(choice) == ["fp16", "bf16"] and text.index("For fp16") < text.index("For bf16")  # the chosen dtype leads


def test_conclusion_adds_stored_gpu_figures_when_present():
    stored = []
    for d, scale in (("bf16", 1.0), ("fp16", 0.1), ("fp32", 0.001)):
        for mode, factor in (("fla_chunk", 2.0), ("fla_fused_recurrent", 1.0)):
            for tensor in ("output", "state"):
                stored.append({"mode": mode, "dtype": d, "reference": "fp64", "T": 4096, "tensor": tensor,
                               "max_abs": 0.4 * scale * factor, "mean_abs": 0.02, "rel_rms": 3e-3 * scale * factor,
                               "status": "ok"})
    stored += [{"mode": "fla_chunk", "dtype": "bf16", "reference": "recurrent", "T": 4096, "tensor": t,
                "max_abs": v, "mean_abs": v / 10, "rel_rms": v / 100, "status": "ok"}
               for t, v in (("output", 0.5), ("state", 0.02))]
    text, figures, _ = conclude(harness_rows("bf16", story_rel(1.2e-3, 1e-3)), stored=pd.DataFrame(stored))
    chunk, fused = (figures[f"stored_h200_bf16_T4096_{m}_output_rel_rms"] for m in ("fla_chunk", "fla_fused_recurrent"))
    assert (chunk, fused) == (6e-3, 3e-3)
    assert f"{chunk:.2e}" in text and f"{fused:.2e}" in text and f"{chunk / fused:.2f}x" in text
    assert figures["stored_h200_fp32_T4096_fla_fused_recurrent_state_max_abs"] == 0.4 * 0.001
    assert figures["stored_h200_bf16_T4096_fla_chunk_vs_fused_output_max"] == 0.5
    assert figures["stored_h200_bf16_T4096_fla_chunk_vs_fused_state_max"] == 0.02


def test_story_plan_smoke_shrinks_and_orders_dtypes():
    plan = story_plan("bfloat16", [256, 4096], smoke=True, device="cpu")
    assert plan.dtypes == ["bf16", "fp16"] and plan.lengths == [128, 256] and plan.longest == 256
    assert plan.modes == list(OUR_MODES) and plan.lastword_limit == 24
    full = story_plan("fp16", [512, 2048], smoke=False, device="cpu")
    assert full.dtypes == ["fp16", "bf16"] and full.longest == 2048 and full.lastword_limit is None
    assert "not run here" in full.describe(64, 16, 64)
    with pytest.raises(ParityKitError, match="lengths"):
        story_plan("bf16", [], smoke=True, device="cpu")


def test_state_growth_reads_first_middle_and_last_boundary():
    rows = [{"mode": m, "dtype": "bf16", "reference": "fp64_rounded", "tensor": "state", "position": p,
             "max_abs": p * f} for m, f in (("chunk_low", 2.0), ("recurrent_fp32_state", 1.0)) for p in (256, 0, 64, 192, 128)]
    rows.append({"mode": "chunk_low", "dtype": "fp16", "reference": "fp64_rounded", "tensor": "state", "position": 64,
                 "max_abs": 99.0})
    growth = state_growth(pd.DataFrame(rows), "bf16")
    assert growth.loc["chunk_low"].tolist() == [128.0, 256.0, 512.0]
    assert growth.loc["recurrent_fp32_state", "last boundary"] == 256.0
    with pytest.raises(ParityKitError, match="no state rows"):
        state_growth(pd.DataFrame(rows), "fp32")


def test_reported_vs_measured_lines_up_bf16_rows_of_each_source():
    lengths = pd.DataFrame(harness_rows("bf16", story_rel(1.2e-3, 1e-3), T=1024))
    side = reported_vs_measured(lengths, pd.DataFrame(), ["bf16", "fp16"])
    ours = side[side["source"] == "this run (CPU, ours)"]
    assert len(side) == len(REPORTED_FIGURES) + len(ours)
    assert ours["comparison"].tolist() == ["chunk_low vs recurrent", "chunk_low vs fp64", "recurrent_fp32_state vs fp64"]
    direct = ours.iloc[0]
    assert (direct["output max"], direct["state max"]) == (0.5, 0.02)
    assert reported_vs_measured(lengths, pd.DataFrame(), ["fp16"])["source"].eq("this run (CPU, ours)").sum() == 0


def test_stored_kernel_figures_read_missing_and_corrupt(tmp_path):
    assert not stored_kernel_figures(tmp_path / "none.json").found
    rows = [{"mode": "fla_chunk", "dtype": "bf16", "reference": r, "T": 1024, "tensor": t, "max_abs": 0.1,
             "mean_abs": 0.01, "rel_rms": 1e-3, "status": s}
            for r in ("fp64", "fp64_rounded") for t in ("output", "state") for s in ("ok", "skipped: no GPU")]
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"command": "python wkv_kernels.py", "environment": {"gpu": "x"},
                                "errors": {"summary": rows}}))
    stored = stored_kernel_figures(good)
    assert stored.found and stored.command == "python wkv_kernels.py" and len(stored.summary) == 4
    table = stored_kernel_table(stored.summary, "bf16")
    assert table.index.tolist() == [(1024, "fla_chunk")] and table.shape == (1, 8)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"command": "x"}))
    with pytest.raises(ParityKitError, match="not a wkv_kernels benchmark result"):
        stored_kernel_figures(bad)


def test_table_builders_on_a_small_run():
    x = random_wkv_inputs(1, 64, 1, 8, dtype=torch.float64, seed=7)
    long = compare_prefill(x, dtypes=("bf16",), modes=("chunk_low", "recurrent_fp32_state"), chunk_size=16)
    lengths = length_table(long.summary, x, [32, 64], dtypes=["bf16"], modes=["chunk_low", "recurrent_fp32_state"],
                           chunk_size=16)
    # the long run is reused, not recomputed, and the shorter prefix is added
    pd.testing.assert_frame_equal(lengths[lengths["T"] == 64].reset_index(drop=True), long.summary)
    assert set(lengths["T"]) == {32, 64}
    pivot = error_pivot(long.summary)
    assert pivot.loc[("bf16", "chunk_low"), ("max_abs", "recurrent", "output")] > 0
    chunks = chunk_size_table(x, 64, [16, 32], dtypes=["bf16"], modes=[*OUR_MODES])
    assert "recurrent_low_state" not in set(chunks["mode"]) and set(chunks["chunk_size"]) == {16, 32}
    decode = decode_comparison(x, 48, dtype="bf16", chunk_size=16)
    assert set(decode["prefill_mode"]) == {"chunk_low", "chunk_fp32"} and (decode["prefill_tokens"] == 36).all()


def test_story_panel_runs_explore_with_the_chosen_dtype_and_chunk_size():
    from matplotlib.figure import Figure

    panel = pk.ui.story_panel(lambda p: explore(**p), dtype="bf16", device="cpu", chunk_size=64, seq_len=64, heads=2,
                              head_dim=8, title="prefill modes")
    panel.set(dtype="fp16", chunk_size=16)
    panel.click()
    assert panel.error is None
    table, fig_position, fig_boundaries = panel.results
    assert isinstance(table, pd.DataFrame) and isinstance(fig_position, Figure) and isinstance(fig_boundaries, Figure)
    assert set(table.index.get_level_values("dtype")) == {"fp16"}
    assert set(table.index.get_level_values("mode")) == {*OUR_MODES, "reference_rounded"}
    # the chunk size reached the harness: one state point per boundary 0, 16, 32, 48, 64
    xs = fig_boundaries.axes[0].get_lines()[0].get_xdata()
    assert list(xs) == [0, 16, 32, 48, 64]
    panel.set(seq_len=0)
    panel.click()
    assert panel.results == [] and "seq_len" in panel.error


def test_reported_maxima_are_put_in_units_of_one_rounding_step():
    from parity_kit.stories.wording import ulp_note

    assert ulp_note((0.5, 1.0), "bf16").endswith("at |x| in [64, 128) and [128, 256)")
    assert ulp_note((0.5,), "fp16") == "; 0.5 is one fp16 step (ULP) at |x| in [512, 1024)"
    assert ulp_note((0.0226, float("nan"), 0.0), "bf16") == ""  # not a power of two, not finite, zero
