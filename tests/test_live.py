from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

import parity_kit as pk
from parity_kit.comparison.live import compare_live
from parity_kit.errors import ParityKitError
from parity_kit.testing import hook_counts
from parity_kit.testing import tiny_llama as build_tiny_llama


def _assert_tables_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    text = ["module", "cand_module", "call", "tensor", "shape", "ref_dtype", "cand_dtype", "verdict", "status",
            "nonfinite"]
    assert a[text].astype(str).values.tolist() == b[text].astype(str).values.tolist()
    assert a["order"].astype(str).tolist() == b["order"].astype(str).tolist()
    for col in ("max_abs", "mean_abs", "rel_rms", "cosine", "sqnr_db", "max_ulp", "floor", "floor_ratio"):
        for x, y in zip(a[col], b[col]):
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-12, abs=1e-300), col


def _recorded(ref: nn.Module, cand: nn.Module, ids: torch.Tensor, **kw) -> pd.DataFrame:
    with torch.no_grad(), pk.record(ref, "*", memory_budget=None) as r:
        ref(ids)
    with torch.no_grad(), pk.record(cand, "*", memory_budget=None) as c:
        cand(ids)
    return pk.compare(r, c, **kw)


def test_live_equals_compare_of_full_recordings(input_ids):
    ref, cand = build_tiny_llama(), build_tiny_llama(dtype=torch.bfloat16)
    expected = _recorded(ref, cand, input_ids)
    live = compare_live(ref, cand, input_ids)
    _assert_tables_equal(live, expected)
    assert (live["status"] == "ok").all() and (live["rel_rms"] > 0).any()
    assert all(n == (0, 0, 0, 0) for n in hook_counts(ref).values())
    assert all(n == (0, 0, 0, 0) for n in hook_counts(cand).values())


def test_live_memory_stays_within_the_window(input_ids):
    ref, cand = build_tiny_llama(layers=4), build_tiny_llama(seed=1, layers=4)
    n_leaves = len(_recorded(ref, cand, input_ids))
    for window in (1, 3):
        live = compare_live(ref, cand, input_ids, window=window)
        assert 1 <= live.attrs["peak_stored"] <= window < n_leaves
        _assert_tables_equal(live, _recorded(ref, cand, input_ids))


def test_live_mapping_missing_rows_match_compare():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    cand = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Linear(4, 2))
    mapping = {"0": "0", "1": "1", "2": "3"}  # cand "2" has no reference
    x = torch.randn(3, 4)
    _assert_tables_equal(compare_live(ref, cand, x, mapping=mapping), _recorded(ref, cand, x, mapping=mapping))
    unmapped = compare_live(ref, cand, x, mapping={"0": "0", "1": "9"})
    assert set(unmapped["status"]) == {"ok", "missing in candidate", "missing in reference"}


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_reordered_candidate_needs_a_large_enough_window():
    torch.manual_seed(0)
    ref, cand = _Pair(), _Pair()
    swap = {"a": "b", "b": "a"}  # the candidate asks for the reference's second output first
    x = torch.randn(2, 4)
    with pytest.raises(ParityKitError, match="window"):
        compare_live(ref, cand, x, modules=["a", "b"], mapping=swap, window=1)
    assert all(n == (0, 0, 0, 0) for n in hook_counts(ref).values())
    table = compare_live(ref, cand, x, modules=["a", "b"], mapping=swap, window=2)
    _assert_tables_equal(table, _recorded(ref, cand, x, mapping=swap).pipe(
        lambda t: t[t["module"].isin(["a", "b"])].reset_index(drop=True)))


def test_errors_are_reported_and_hooks_removed(input_ids):
    ref = build_tiny_llama()
    with pytest.raises(ParityKitError, match="two model objects"):
        compare_live(ref, ref, input_ids)
    with pytest.raises(ParityKitError, match="window"):
        compare_live(ref, build_tiny_llama(), input_ids, window=0)
    with pytest.raises(ParityKitError, match="outside the vocabulary"):
        compare_live(ref, build_tiny_llama(), torch.tensor([[999]]))  # token id out of range
    with pytest.raises(ParityKitError, match="a model raised"):
        compare_live(ref, build_tiny_llama(), torch.tensor([[0.5]]))  # float ids: the embedding raises
    assert all(n == (0, 0, 0, 0) for n in hook_counts(ref).values())
