from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import parity_kit as pk
from parity_kit.comparison.mapping import ModuleMapping
from parity_kit.comparison.pairs import COLUMNS
from parity_kit.errors import ParityKitError
from parity_kit.recording import Call, Recording
from parity_kit.testing import tiny_llama as build_tiny_llama


def _rec(*calls: tuple[str, dict]) -> Recording:
    counts: dict[str, int] = {}
    out = []
    for order, (name, tensors) in enumerate(calls):
        out.append(Call(name, counts.get(name, 0), order, tensors))
        counts[name] = counts.get(name, 0) + 1
    return Recording("tensors", out)


def test_same_model_fp32_vs_bf16(input_ids):
    ref_model, cand_model = build_tiny_llama(), build_tiny_llama(dtype=torch.bfloat16)
    with pk.record(ref_model, "*") as ref:
        ref_model(input_ids)
    with pk.record(cand_model, "*", dtype="fp32") as cand:
        cand_model(input_ids)
    table = pk.compare(ref, cand)
    assert list(table.columns) == COLUMNS
    assert (table["status"] == "ok").all()
    assert table["module"].tolist()[0] == "model.embed_tokens"
    assert table["order"].is_monotonic_increasing
    assert set(table["cand_dtype"]) == {"bf16"}  # the model's dtype, not the fp32 cast of the capture
    # the embedding output is the bf16 weight row: exactly the reference rounded to bf16
    emb = table[table["module"] == "model.embed_tokens"].iloc[0]
    assert emb["max_ulp_raw"] == 0 and emb["rel_rms"] == pytest.approx(emb["floor"]) and emb["verdict"] == "within floor"
    # one rounding is at most half an ULP of the largest value: a few ULPs at the tensor's scale
    assert 0 < emb["max_ulp"] < 8 and emb["floor_kind"] == "one rounding" and emb["diagnosis"] is None
    logits = table[table["module"] == "lm_head"].iloc[0]
    assert logits["rel_rms"] > 0 and logits["floor"] > 0
    assert logits["floor_ratio"] == pytest.approx(logits["rel_rms"] / logits["floor"])
    same = pk.compare(ref, ref)
    assert (same["rel_rms"] == 0).all() and (same["verdict"] == "within floor").all()


def test_missing_names_and_shape_mismatch_rows():
    ref = _rec(("a", {"output": torch.ones(4)}), ("b", {"output": torch.ones(4)}),
               ("c", {"output.0": torch.ones(2, 3), "output.1": torch.ones(1)}))
    cand = _rec(("a", {"output": torch.ones(4)}), ("c", {"output.0": torch.ones(3, 2)}),
                ("d", {"output": torch.ones(1)}))
    table = pk.compare(ref, cand)
    status = {(r.module, r.tensor): r.status for r in table.itertuples()}
    assert status == {("a", "output"): "ok", ("b", "output"): "missing in candidate",
                      ("c", "output.0"): "shape mismatch", ("c", "output.1"): "missing in candidate",
                      ("d", "output"): "missing in reference"}
    assert table["module"].tolist() == ["a", "b", "c", "c", "d"]
    assert pd.isna(table["order"].iloc[-1])
    mismatch = table[table["status"] == "shape mismatch"].iloc[0]
    assert mismatch["shape"] == "(2, 3) vs (3, 2)" and math.isnan(mismatch["rel_rms"])
    with pytest.raises(ParityKitError, match=r"strict=True.*4 of 5 rows.*b call 0 output: missing in candidate"):
        pk.compare(ref, cand, strict=True)
    pk.compare(ref, ref, strict=True)


def test_calls_align_by_index_and_tensor_selection():
    ref = _rec(("m", {"output": torch.tensor([1.0]), "input.0": torch.tensor([5.0])}),
               ("m", {"output": torch.tensor([2.0]), "input.0": torch.tensor([6.0])}))
    cand = _rec(("m", {"output": torch.tensor([1.0]), "input.0": torch.tensor([5.0])}),
                ("m", {"output": torch.tensor([3.0]), "input.0": torch.tensor([7.0])}))
    t = pk.compare(ref, cand)
    assert t["call"].tolist() == [0, 1] and t["max_abs"].tolist() == [0.0, 1.0]
    assert len(pk.compare(ref, cand, tensors="all")) == 4
    ids = _rec(("e", {"input.0": torch.tensor([3, 4]), "output": torch.ones(2)}))
    ids_cand = _rec(("e", {"input.0": torch.tensor([3, 5]), "output": torch.ones(2)}))
    int_row = pk.compare(ids, ids_cand, tensors="all").set_index("tensor").loc["input.0"]
    assert int_row["max_abs"] == 1.0 and int_row["verdict"] == "above floor ×inf" and math.isnan(int_row["max_ulp"])
    assert pk.first_divergence(pk.compare(ids, ids, tensors="all")) is None
    only_inputs = pk.compare(ref, cand, tensors=["input.0"])
    assert only_inputs["tensor"].tolist() == ["input.0", "input.0"] and only_inputs["max_abs"].tolist() == [0.0, 1.0]


def test_mappings_dict_callable_and_transform():
    ref = _rec(("fused", {"output": torch.arange(6.0).reshape(1, 6), "input.0": torch.ones(2)}),
               ("old", {"output": torch.ones(2)}))
    cand = _rec(("lo", {"output": torch.tensor([[0.0, 1.0, 2.0]]), "input.0": torch.ones(2)}),
                ("hi", {"output": torch.tensor([[3.0, 4.0, 6.0]])}), ("new", {"output": torch.ones(2)}))
    mm = ModuleMapping([("fused", "lo", lambda t: t[..., :3], "lo"), ("fused", "hi", lambda t: t[..., 3:], "hi"),
                        ("old", "new")])
    t = pk.compare(ref, cand, mm, tensors="all")
    assert t["cand_module"].tolist() == ["lo [lo]", "hi [hi]", "lo [lo]", "hi [hi]", "new"]
    assert t["status"].tolist() == ["ok", "ok", "ok", "missing in candidate", "ok"]
    assert t["max_abs"].tolist()[:3] == [0.0, 1.0, 0.0]  # the transform cut only the outputs
    by_dict = pk.compare(ref, cand, {"old": "new"})
    assert by_dict["status"].tolist() == ["missing in candidate", "ok", "missing in reference", "missing in reference"]
    by_fn = pk.compare(ref, cand, lambda n: "new" if n == "old" else None)
    assert by_fn["status"].tolist() == by_dict["status"].tolist()
    with pytest.raises(ParityKitError, match="mapping="):
        pk.compare(ref, cand, 42)


def test_stats_recordings_are_refused():
    stats = Recording("stats")
    with pytest.raises(ParityKitError, match="mode='tensors'"):
        pk.compare(stats, _rec())


def test_first_divergence():
    ref = _rec(*[(f"l{i}", {"output": torch.ones(8)}) for i in range(4)])
    errs = [0.0, 1e-3, 0.1, 1.0]
    cand = _rec(*[(f"l{i}", {"output": torch.ones(8) * (1 + e)}) for i, e in enumerate(errs)])
    table = pk.compare(ref, cand)
    assert pk.first_divergence(table)["module"] == "l2"
    assert pk.first_divergence(table, threshold=1e-4)["module"] == "l1"
    assert pk.first_divergence(table, threshold=10.0) is None
    assert pk.first_divergence(table, "sqnr_db", threshold=30.0)["module"] == "l2"  # 20 dB < 30 dB
    assert pk.first_divergence(table, "cosine", threshold=0.5) is None  # scaled vectors: cosine 1
    with pytest.raises(ParityKitError, match="not a column"):
        pk.first_divergence(table, "nope")


def test_first_divergence_by_own_error():
    ref = _rec(*[(f"l{i}", {"output": torch.ones(8)}) for i in range(3)])
    cand = _rec(*[(f"l{i}", {"output": torch.ones(8) * (1 + e)}) for i, e in enumerate([0.0, 0.1, 0.1])])
    table = pk.compare(ref, cand)
    own = pd.DataFrame({"module": ["l0", "l1", "l2"], "cand_module": ["l0", "l1", "l2"], "call": 0,
                        "tensor": "output", "local_rel_rms": [0.0, 0.1, 0.0], "status": "ok"})
    judged = pk.apply_floor(table, own=own)
    assert judged["diagnosis"].tolist() == ["consistent with rounding", "own error above floor", "inherited"]
    assert pk.first_divergence(judged, diagnosis="own error above floor")["module"] == "l1"
    assert pk.first_divergence(judged, diagnosis="inherited")["module"] == "l2"
    assert pk.first_divergence(judged, "own_floor_ratio", threshold=2.0)["module"] == "l1"
    # an own error that was not measured (NaN) is not a divergence
    assert pk.first_divergence(pk.apply_floor(table), "own_rel_rms", threshold=1e-3) is None
    with pytest.raises(ParityKitError, match="no diagnosis"):
        pk.first_divergence(table, diagnosis="inherited")
    with pytest.raises(ParityKitError, match="not one of"):
        pk.first_divergence(judged, diagnosis="bug")


def test_first_nonfinite_recording_and_table():
    ref = _rec(("a", {"output": torch.ones(3)}), ("b", {"output": torch.ones(3)}), ("c", {"output": torch.ones(3)}))
    cand = _rec(("a", {"output": torch.ones(3)}), ("b", {"output": torch.tensor([1.0, float("nan"), float("inf")])}),
                ("c", {"output": torch.full((3,), float("nan"))}))
    assert pk.first_nonfinite(ref) is None
    hit = pk.first_nonfinite(cand)
    assert hit == {"module": "b", "call": 0, "order": 1, "tensor": "output", "nan": 1, "inf": 1}
    row = pk.first_nonfinite(pk.compare(ref, cand))
    assert row["module"] == "b" and row["nonfinite"] == 2 and row["rel_rms"] == math.inf
    assert pk.first_nonfinite(pk.compare(ref, ref)) is None
    stats = Recording("stats", [Call("s", 0, 0, {"output": pk.TensorStats.of(torch.tensor([float("inf")]))})])
    assert pk.first_nonfinite(stats)["inf"] == 1


def test_per_token_error(input_ids):
    ref_model, cand_model = build_tiny_llama(), build_tiny_llama(dtype=torch.bfloat16)
    with pk.record(ref_model, "model.layers.*.mlp") as ref:
        ref_model(input_ids)
    with pk.record(cand_model, "model.layers.*.mlp") as cand:
        cand_model(input_ids)
    frame = pk.per_token_error(ref, cand)
    assert frame.index.tolist() == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert frame.shape == (2, input_ids.shape[1])
    r = ref["model.layers.1.mlp"][0].output[0, 3].double()
    c = cand["model.layers.1.mlp"][0].output[0, 3].double()
    assert frame.loc["model.layers.1.mlp", 3] == pytest.approx(float((c - r).norm() / r.norm()))
    cos = pk.per_token_error(ref, cand, metric="cosine")
    assert ((cos.values > 0.9) & (cos.values <= 1.0)).all()
    with pytest.raises(ParityKitError, match="no module with leaf"):
        pk.per_token_error(ref, cand, tensor="output.7")


def _straightforward(ref: Recording, cand: Recording) -> dict[tuple[str, int, str], dict[str, float]]:
    """Each metric computed separately by parity_kit.comparison.metrics, pair by pair (the reference computation)."""
    from parity_kit import metrics as M

    out = {}
    cand_calls = {(c.module, c.index): c for c in cand.calls}
    for call in ref.calls:
        for leaf, r in call.outputs.items():
            c = cand_calls[(call.module, call.index)].tensors[leaf]
            dtype = cand_calls[(call.module, call.index)].orig_dtype(leaf)
            out[(call.module, call.index, leaf)] = M.all_metrics(r, c, dtype=dtype)
    return out


def test_device_and_chunked_comparison_equal_the_straightforward_metrics(input_ids):
    ref_model, cand_model = build_tiny_llama(), build_tiny_llama(dtype=torch.bfloat16)
    with pk.record(ref_model, "*") as ref:
        ref_model(input_ids)
    with pk.record(cand_model, "*") as cand:
        cand_model(input_ids)
    expected = _straightforward(ref, cand)
    default = pk.compare(ref, cand)
    for table in (default, pk.compare(ref, cand, device="cpu", chunk_bytes=1), pk.compare(ref, cand, chunk_bytes=None)):
        assert list(table["module"]) == list(default["module"]) and (table["status"] == "ok").all()
        for row in table.itertuples():
            want = expected[(row.module, row.call, row.tensor)]
            for metric in ("max_abs", "mean_abs", "rel_rms", "cosine", "sqnr_db", "max_ulp", "floor"):
                got = getattr(row, metric)
                assert got == pytest.approx(want[metric], rel=1e-12, abs=1e-300), (row.module, metric)
    with pytest.raises(ParityKitError, match="chunk"):
        pk.compare(ref, cand, chunk_bytes="lots")


def test_same_dtype_runs_are_judged_against_one_rounding():
    torch.manual_seed(0)
    ref_t = torch.randn(4, 64).to(torch.float16)
    close = (ref_t.double() * (1 + 1e-4 * torch.randn(4, 64, dtype=torch.float64))).to(torch.float16)
    far = (ref_t.double() * (1 + 3e-2 * torch.randn(4, 64, dtype=torch.float64))).to(torch.float16)
    ref = Recording("tensors", [Call("m", 0, 0, {"output": ref_t})])
    for cand_t, expected in ((close, "within floor"), (far, "above floor")):
        cand = Recording("tensors", [Call("m", 0, 0, {"output": cand_t})])
        row = pk.compare(ref, cand).iloc[0]
        assert row["floor"] == pytest.approx(torch.finfo(torch.float16).eps / (2 * math.sqrt(3)))
        assert row["verdict"].startswith(expected)


def test_primary_output_pairs_a_tensor_with_a_tuple():
    t = torch.randn(2, 3)
    ref = Recording("tensors", [Call("attn", 0, 0, {"output": t})])
    cand = Recording("tensors", [Call("attn", 0, 0, {"output.0": t.clone(), "output.1": torch.ones(2)})])
    table = pk.compare(ref, cand)
    ok = table[table["status"] == "ok"]
    assert len(ok) == 1 and ok.iloc[0]["rel_rms"] == 0.0
    assert table[table["status"] == "missing in reference"]["tensor"].tolist() == ["output.1"]
