"""Property tests: a save that reports success loads back bit-exact (odd tensors, every dtype, odd names), and
compare's floor and distances do not depend on argument order."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import parity_kit as pk
from parity_kit.recording import Call, Recording, TensorStats

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn,
          torch.float8_e5m2]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12)


@st.composite
def odd_tensors(draw: st.DrawFn) -> torch.Tensor:
    """Random bits in any dtype: 0-d, empty, or a slice of a wider tensor (non-contiguous or copied)."""
    shape, dtype = draw(shapes), draw(st.sampled_from(DTYPES))
    full = (*shape[:-1], 2 * shape[-1]) if shape else ()
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    raw = torch.randint(0, 256, (math.prod(full) * dtype.itemsize,), generator=g, dtype=torch.uint8)
    if dtype == torch.bool:
        raw = raw % 2
    t = raw.view(dtype).reshape(full)
    if not shape:
        return t
    return t[..., ::2] if draw(st.booleans()) else t[..., : shape[-1]].contiguous()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    def bits(t: torch.Tensor) -> torch.Tensor:  # a fresh dense copy: unit strides, so it can be viewed as bytes
        return torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1).view(torch.uint8)

    return torch.equal(bits(a), bits(b))


@SETTINGS
@given(st.lists(st.tuples(names, odd_tensors()), min_size=1, max_size=5))
def test_save_then_load_is_bit_exact(entries: list[tuple[str, torch.Tensor]]) -> None:
    calls = [Call(f"model.{name}.x", 0, i, {"output": t, f"output.{name}": t}) for i, (name, t) in enumerate(entries)]
    rec = Recording("tensors", calls, {"note": "ünïcödé"})
    with tempfile.TemporaryDirectory() as d:
        back = Recording.load(rec.save(Path(d) / "rec"))
    assert [c.module for c in back.calls] == [c.module for c in calls]
    for mine, theirs in zip(calls, back.calls):
        assert list(mine.tensors) == list(theirs.tensors)
        for leaf in mine.tensors:
            assert _same(mine.tensors[leaf], theirs.tensors[leaf]), (leaf, mine.tensors[leaf], theirs.tensors[leaf])


@SETTINGS
@given(st.lists(shapes, min_size=1, max_size=4), st.one_of(st.floats(-1e30, 1e30), st.sampled_from([math.nan, math.inf, -math.inf])))
def test_stats_save_then_load_is_exact(shape_list: list[tuple[int, ...]], value: float) -> None:
    calls = []
    for i, shape in enumerate(shape_list):
        t = torch.full(shape, value)
        calls.append(Call(f"m.{i}", 0, i, {"output": TensorStats.of(t, per_token=True)}))
    rec = Recording("stats", calls)
    with tempfile.TemporaryDirectory() as d:
        back = Recording.load(rec.save(Path(d) / "rec"))
    for mine, theirs in zip(calls, back.calls):
        a, b = mine.output, theirs.output
        for field in ("shape", "dtype", "nan", "inf", "min", "max", "mean", "rms", "absmax"):
            x, y = getattr(a, field), getattr(b, field)
            assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), field
        assert (a.per_token_rms is None) == (b.per_token_rms is None)
        if a.per_token_rms is not None:
            assert torch.equal(a.per_token_rms.nan_to_num(-1.0), b.per_token_rms.nan_to_num(-1.0))


floating = st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16])


@SETTINGS
@given(floating, floating, st.integers(1, 64), st.integers(0, 2**16), st.floats(0.0, 1.0))
def test_compare_is_symmetric_in_argument_order(ref_dtype, cand_dtype, n, seed, noise) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = x + noise * torch.randn(n, generator=g, dtype=torch.float64)
    a = Recording("tensors", [Call("m", 0, 0, {"output": x.to(ref_dtype)})])
    b = Recording("tensors", [Call("m", 0, 0, {"output": y.to(cand_dtype)})])
    ab, ba = pk.compare(a, b).iloc[0], pk.compare(b, a).iloc[0]
    assert ab["floor"] == ba["floor"]
    # rel_rms is relative to the reference's rms, so only the judgement can be compared: within or above the
    # floor, unless the two relative errors lie on either side of the tolerance
    within_ab, within_ba = ab["verdict"] == "within floor", ba["verdict"] == "within floor"
    limit = 2 * ab["floor"]
    assert within_ab == within_ba or (min(ab["rel_rms"], ba["rel_rms"]) <= limit <= max(ab["rel_rms"], ba["rel_rms"]))
    assert ab["max_abs"] == ba["max_abs"]
    assert math.isclose(ab["cosine"], ba["cosine"], rel_tol=1e-12, abs_tol=1e-15) or (
        math.isnan(ab["cosine"]) and math.isnan(ba["cosine"]))
    assert ab["status"] == ba["status"] == "ok"


def test_bf16_reference_and_fp32_candidate_get_one_floor() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(256, generator=g).to(torch.bfloat16)
    cand = ref.float() + 1e-3 * torch.randn(256, generator=g)
    a = Recording("tensors", [Call("m", 0, 0, {"output": ref})])
    b = Recording("tensors", [Call("m", 0, 0, {"output": cand})])
    ab, ba = pk.compare(a, b).iloc[0], pk.compare(b, a).iloc[0]
    assert ab["floor"] == ba["floor"] and ab["verdict"] == ba["verdict"]
    # the narrower dtype sets the floor: bf16's rounding error, far above fp32's
    assert ab["floor"] > 1e-4


def test_an_empty_tensor_before_another_loads_back(tmp_path) -> None:
    """An MoE expert that received no tokens: its empty output shares its start offset with the next tensor."""
    rec = Recording("tensors", [Call("expert.0", 0, 0, {"output": torch.empty(0, 4)}),
                                Call("expert.1", 0, 1, {"output": torch.ones(3, 4)})])
    back = Recording.load(rec.save(tmp_path / "rec"))
    assert back["expert.0"][0].output.shape == (0, 4)
    assert torch.equal(back["expert.1"][0].output, torch.ones(3, 4))


def test_a_streamed_recording_with_an_empty_output_loads_back(tmp_path) -> None:
    from torch import nn

    class Router(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[x.sum(-1) > 1e9]  # no token reaches this expert

    model = nn.Sequential(Router(), nn.Identity())
    with pk.record(model, "*", save_to=tmp_path / "rec") as rec:
        model(torch.ones(2, 3))
    back = Recording.load(tmp_path / "rec")
    assert back["0"][0].output.shape == (0, 3) == rec["0"][0].output.shape
