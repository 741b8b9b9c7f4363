from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

import parity_kit as pk
from parity_kit.comparison import floor as F
from parity_kit.errors import ParityKitError
from parity_kit.recording import Call, Recording


def _rec(tensors: dict[str, torch.Tensor]) -> Recording:
    return Recording("tensors", [Call(name, 0, i, {"output": t}) for i, (name, t) in enumerate(tensors.items())])


def test_one_rounding_floor_does_not_depend_on_argument_order():
    # a bf16 run against an fp32 run of the same values: only rounding separates them, in either order
    g = torch.Generator().manual_seed(0)
    wide = {name: torch.randn(64, 32, generator=g) * scale for name, scale in (("a", 1.0), ("b", 1e-3), ("c", 50.0))}
    narrow = {name: t.bfloat16() for name, t in wide.items()}
    forward = pk.compare(_rec(wide), _rec(narrow))
    backward = pk.compare(_rec(narrow), _rec(wide))
    for column in ("floor", "rounding_floor", "max_ulp_raw"):
        assert forward[column].tolist() == pytest.approx(backward[column].tolist(), rel=1e-12), column
    assert (forward["verdict"] == "within floor").all() and (backward["verdict"] == "within floor").all()
    # the ratio is 1 both ways: the error is exactly the rounding (the old rule gave the fp32 floor backwards)
    assert backward["floor_ratio"].tolist() == pytest.approx([1.0] * 3, rel=1e-3)  # rel_rms divides by rms(ref)
    assert F.unit_dtype("bf16", "fp32") == F.unit_dtype("fp32", "bf16") == torch.bfloat16


def test_rounding_floor_of_a_wider_candidate_rounds_the_candidate():
    ref = torch.linspace(-3, 3, 999)
    assert F.rounding_floor(ref.half(), "fp32", cand=ref) == pytest.approx(pk.metrics.representability_floor(ref, "fp16"))
    assert F.rounding_floor(ref, "fp32") == pk.metrics.nominal_floor("fp32")  # one dtype: nominal rounding
    assert F.rounding_floor(torch.arange(3), "bf16") == 0.0


def test_diagnose_covers_every_judgement():
    assert F.diagnose(1.9, 1.9) == F.CONSISTENT
    assert F.diagnose(1.9, 2.1) == F.OWN and F.diagnose(50.0, 3.0) == F.OWN
    assert F.diagnose(9.0, 1.0) == F.INHERITED
    assert F.diagnose(9.0) == F.ABOVE and F.diagnose(1.0) == F.CONSISTENT
    assert F.diagnose(math.nan, 1.0) == F.NOT_FINITE
    assert F.diagnose(3.0, 2.5, tolerance=4.0) == F.CONSISTENT
    with pytest.raises(ParityKitError, match="floor_tolerance"):
        F.check_tolerance(0.0)


def test_floor_components_add_in_quadrature_and_keep_their_names():
    key = ("m", 0, "output")
    floor = F.Floor(("fp32", "bf16"), components={
        "rounding": F.FloorComponent("rounding", "r", free={key: 3.0}, own={key: 1.0})})
    both = floor.with_component(F.FloorComponent("run_to_run", "spread", free={key: 4.0}))
    assert both.free(key) == 5.0 and both.own(key) == 1.0  # the new source has no own floor
    assert floor.free(key) == 3.0  # with_component copies
    assert math.isnan(both.free(("other", 0, "output")))
    frame = both.to_frame()
    assert frame.columns.tolist() == ["module", "call", "tensor", "rounding_free", "rounding_own", "run_to_run_free",
                                      "run_to_run_own"]
    with pytest.raises(ParityKitError, match="keyed_by"):
        F.Floor(("fp32", "bf16"), keyed_by="both")


def _table(**columns) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    base = {"order": list(range(n)), "call": [0] * n, "tensor": ["output"] * n, "status": ["ok"] * n,
            "nonfinite": [0] * n, "verdict": ["x"] * n, "floor_ratio": [math.nan] * n}
    base.update(columns)
    base.setdefault("cand_module", base["module"])
    base.setdefault("floor", base["rounding_floor"])
    return pd.DataFrame(base)


def _own(modules, errors, cand=None, tensor="output") -> pd.DataFrame:
    return pd.DataFrame({"module": modules, "cand_module": cand or modules, "call": 0, "tensor": tensor,
                         "local_rel_rms": errors, "status": "ok"})


def test_apply_floor_judges_every_row_and_never_goes_below_one_rounding():
    names = ["up", "mid", "mid.inner", "down"]
    table = _table(module=names, rel_rms=[2e-3, 9e-3, 9e-2, 3e-2], rounding_floor=[1e-3] * 4)
    floor = F.Floor(("fp32", "bf16"), components={"rounding": F.FloorComponent("rounding", "", free={
        ("up", 0, "output"): 1.5e-3, ("mid", 0, "output"): 5e-3, ("mid.inner", 0, "output"): 5e-4,
        ("down", 0, "output"): 4e-3}, own={(n, 0, "output"): 3e-3 for n in names})})
    own = _own(names, [2e-3, 8e-3, 8e-2, 3e-3])
    judged = F.apply_floor(table, floor, own, causes={"mid.inner": F.COMPUTES_DIFFERENTLY})
    assert judged["floor"].tolist() == [1.5e-3, 5e-3, 1e-3, 4e-3]  # mid.inner: the one rounding is the lower bound
    assert (judged["floor_kind"] == "calibrated").all()
    assert judged["diagnosis"].tolist() == [F.CONSISTENT, F.OWN, F.OWN, F.INHERITED]
    assert judged["own_cause"].tolist() == [None, "contains mid.inner", F.COMPUTES_DIFFERENTLY, None]
    assert judged["own_floor_ratio"].tolist() == pytest.approx([2e-3 / 3e-3, 8e-3 / 3e-3, 8e-2 / 3e-3, 1.0])
    assert judged["verdict"].tolist()[3] == "above floor ×7.5"
    # the rounding floor stays what compare measured, so judging twice gives the same table
    again = F.apply_floor(judged, floor, own, causes={"mid.inner": F.COMPUTES_DIFFERENTLY})
    pd.testing.assert_frame_equal(again, judged)
    assert table["floor"].tolist() == [1e-3] * 4  # the input table is not changed


def test_apply_floor_without_calibration_or_own_errors():
    table = _table(module=["a", "b"], rel_rms=[1e-3, 1e-2], rounding_floor=[1e-3, 1e-3])
    judged = F.apply_floor(table)
    assert judged["floor_kind"].tolist() == ["one rounding"] * 2
    assert judged["diagnosis"].tolist() == [F.CONSISTENT, F.ABOVE]
    assert judged["own_rel_rms"].isna().all()


def test_apply_floor_matches_candidate_names_labels_and_tuple_outputs():
    table = _table(module=["wqkv", "attn"], cand_module=["q_proj [q]", "self_attn"], rel_rms=[4e-3, 4e-3],
                   rounding_floor=[1e-3, 1e-3])
    floor = F.Floor(("bf16", "fp32"), keyed_by="candidate", components={"rounding": F.FloorComponent("rounding", "", free={
        ("q_proj", 0, "output"): 3e-3, ("self_attn", 0, "output.0"): 3e-3})})
    own = pd.concat([_own(["wqkv"], [1e-3], cand=["q_proj"]), _own(["attn"], [1e-3], cand=["self_attn"],
                                                                   tensor="output.0")])
    judged = F.apply_floor(table, floor, own)
    assert judged["floor"].tolist() == [3e-3, 3e-3]
    assert judged["own_rel_rms"].tolist() == [1e-3, 1e-3]
    assert (judged["diagnosis"] == F.CONSISTENT).all()


def test_apply_floor_marks_broken_rows_and_skips_incomparable_ones():
    table = _table(module=["a", "b", "c"], rel_rms=[math.inf, math.nan, math.nan], rounding_floor=[1e-3, 1e-3, math.nan],
                   nonfinite=[3, 0, 0], status=["ok", "ok", "missing in candidate"])
    judged = F.apply_floor(table)
    assert judged["diagnosis"].tolist() == [F.NOT_FINITE, F.NOT_FINITE, None]
    with pytest.raises(ParityKitError, match="local_rel_rms"):
        F.apply_floor(table, own=pd.DataFrame({"module": ["a"]}))


def test_culprits_are_innermost_and_ranked():
    table = pd.DataFrame({
        "module": ["l1.attn.q", "l1.attn", "l1", "l2.mlp", "l2.mlp", "l3"], "cand_module": None,
        "call": [0, 0, 0, 0, 1, 0], "tensor": "output",
        "own_rel_rms": [0.1, 0.05, 0.02, 0.4, 0.5, 1e-3], "own_floor": 1e-3,
        "own_floor_ratio": [100.0, 50.0, 20.0, 400.0, 500.0, 1.0], "own_cause": None,
        "diagnosis": [F.OWN, F.OWN, F.OWN, F.OWN, F.OWN, F.CONSISTENT]})
    found = F.culprits(table)
    assert found["module"].tolist() == ["l2.mlp", "l1.attn.q"]
    assert found["call"].tolist() == [1, 0]  # the worst call of a module
    assert F.culprits(table, top=1)["module"].tolist() == ["l2.mlp"]
    assert F.culprits(table.drop(columns="diagnosis")).empty
    assert F.innermost_culprits(["a", "a.b", "c", "a.b"]) == ["a.b", "c"]


@pytest.mark.parametrize("diagnoses, causes, verdicts, expected", [
    ([F.CONSISTENT, F.CONSISTENT], [None, None], ["within floor"] * 2, "healthy"),
    ([F.CONSISTENT, F.OWN], [None, F.PRECISION_SENSITIVE], ["within floor"] * 2, "healthy"),
    ([F.CONSISTENT, F.OWN], [None, F.PRECISION_SENSITIVE], ["within floor", "above floor ×9"], "precision-sensitive"),
    ([F.OWN, F.INHERITED], [F.COMPUTES_DIFFERENTLY, None], ["above floor ×9"] * 2, "computes differently"),
    ([F.OWN, F.INHERITED], [None, None], ["above floor ×9"] * 2, "own error above floor"),
    ([F.ABOVE, F.CONSISTENT], [None, None], ["above floor ×9", "within floor"], "above floor"),
    ([F.NOT_FINITE, F.OWN], [None, F.COMPUTES_DIFFERENTLY], ["not finite", "above floor ×9"], "not finite"),
    ([None, None], [None, None], ["within floor"] * 2, "not judged"),
])
def test_run_verdict_precedence(diagnoses, causes, verdicts, expected):
    table = pd.DataFrame({"module": ["a", "b"], "cand_module": ["a", "b"], "call": 0, "tensor": "output",
                          "status": "ok", "diagnosis": diagnoses, "own_cause": causes, "verdict": verdicts,
                          "own_rel_rms": 1.0, "own_floor": 0.1, "own_floor_ratio": [10.0, 10.0]})
    result = F.run_verdict(table)
    assert result["verdict"] == expected
    assert result["n_modules"] == (0 if expected == "not judged" else 2)
    assert F.run_verdict(table.assign(status="shape mismatch"))["verdict"] == "not comparable"
