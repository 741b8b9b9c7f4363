from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity_kit import metrics as M
from parity_kit.errors import ParityKitError

T = torch.tensor


def test_hand_computed_values():
    ref, x = T([3.0, -4.0, 0.0, 1.0]), T([3.0, -5.0, 2.0, 1.0])
    # differences: 0, -1, 2, 0
    assert M.max_abs(ref, x) == 2.0
    assert M.mean_abs(ref, x) == 0.75
    assert M.rel_rms(ref, x) == pytest.approx(math.sqrt(5 / 26))
    assert M.cosine(ref, x) == pytest.approx((9 + 20 + 1) / (math.sqrt(26) * math.sqrt(39)))
    assert M.sqnr_db(ref, x) == pytest.approx(10 * math.log10(26 / 5))


def test_zero_conventions():
    z = torch.zeros(3)
    assert M.rel_rms(z, z) == 0.0 and M.rel_rms(z, T([0.0, 1.0, 0.0])) == math.inf
    assert M.cosine(z, z) == 1.0 and M.cosine(z, T([1.0, 0.0, 0.0])) == 0.0
    assert M.sqnr_db(z, z) == math.inf and M.sqnr_db(z, T([1.0, 0.0, 0.0])) == -math.inf
    assert M.max_ulp(z, -z) == 0.0  # +0 and -0 coincide


def test_nonfinite_conventions():
    ref = T([1.0, float("nan"), float("inf")])
    assert M.max_abs(ref, ref.clone()) == 0.0  # agreeing NaN / inf positions are left out
    assert M.max_ulp(ref, ref.clone()) == 0.0
    broken = T([float("nan"), float("nan"), float("inf")])
    assert M.max_abs(ref, broken) == math.inf and M.mean_abs(ref, broken) == math.inf
    assert M.rel_rms(ref, broken) == math.inf and M.max_ulp(ref, broken) == math.inf
    assert math.isnan(M.cosine(ref, broken)) and M.sqnr_db(ref, broken) == -math.inf
    flipped = T([1.0, float("nan"), -float("inf")])
    assert M.max_abs(ref, flipped) == math.inf
    assert M.verdict(math.nan, 1e-3) == "not finite"


def test_max_ulp_powers_of_two_and_subnormals():
    one = T([1.0])
    assert M.max_ulp(one, T([1.0 + 2**-23])) == 1  # spacing above 1 is 2^-23 in fp32
    assert M.max_ulp(one, T([1.0 - 2**-24])) == 1  # spacing below 1 is 2^-24
    assert M.max_ulp(T([1.0 - 2**-24]), T([1.0 + 2**-23])) == 2  # across the power of two
    assert M.max_ulp(one, one, "fp16") == 0
    assert M.max_ulp(T([1.0]), T([1.0 + 2**-10]), "fp16") == 1
    assert M.max_ulp(T([2.0]), T([2.0 - 2**-10]), "fp16") == 1  # 2 - 2^-10 is the fp16 below 2
    assert M.max_ulp(T([1.0]), T([1.0 + 2**-7]), "bf16") == 1
    # fp16 subnormals: the smallest is 2^-24; 0 → 3 subnormal steps is 3 ULP; ±smallest are 2 apart
    sub = 2.0**-24
    assert M.max_ulp(T([0.0]), T([3 * sub]), "fp16") == 3
    assert M.max_ulp(T([-sub]), T([sub]), "fp16") == 2
    # largest subnormal → smallest normal is one step
    assert M.max_ulp(T([1023 * sub]), T([2.0**-14]), "fp16") == 1
    bsub = 2.0**-133  # the smallest bf16 subnormal
    assert M.max_ulp(T([-bsub]), T([2 * bsub]), "bf16") == 3
    x16 = T([1.0, 2.0], dtype=torch.float16)
    assert M.max_ulp(T([1.0, 2.0]), x16) == 0  # default dtype: x's
    # fp64 distances near the top of the int64 line do not overflow
    big = torch.tensor([1.7e308], dtype=torch.float64)
    assert M.max_ulp(big, torch.nextafter(big, torch.tensor([math.inf], dtype=torch.float64))) == 1
    assert M.max_ulp(-big, big) > 1e18


def test_floor_and_verdict():
    ref = T([1.0, 1.0 + 2**-12, 3.0])  # the middle value is not representable in fp16
    rounded = ref.to(torch.float16).double()
    expected = math.sqrt(float((rounded - ref.double()).square().sum()) / float(ref.double().square().sum()))
    assert M.representability_floor(ref, "fp16") == pytest.approx(expected) and expected > 0
    assert M.representability_floor(ref, "fp32") == 0.0
    assert M.verdict(2e-3, 1e-3) == "within floor"
    assert M.verdict(2.1e-3, 1e-3) == "above floor ×2.1"
    assert M.verdict(2.1e-3, 1e-3, tolerance=3.0) == "within floor"
    assert M.verdict(0.12345, 1e-5) == "above floor ×12000"
    assert M.verdict(0.0, 0.0) == "within floor" and M.verdict(1e-9, 0.0) == "above floor ×inf"


def test_all_metrics_and_errors():
    ref = torch.randn(100, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = ref.to(torch.bfloat16)
    out = M.all_metrics(ref, x)
    assert out["floor"] == pytest.approx(out["rel_rms"])  # x is exactly ref rounded to bf16
    assert out["max_ulp_raw"] == 0.0  # both sides round to the same bf16 values
    # at the tensor's scale one rounding is at most half an ULP of the largest value (|ref| < 4·rms here)
    assert 0 < out["max_ulp"] <= 2.0
    with pytest.raises(ParityKitError, match="shape mismatch"):
        M.rel_rms(torch.ones(2), torch.ones(3))
    with pytest.raises(ParityKitError, match="floating dtype"):
        M.max_ulp(torch.ones(2), torch.ones(2), torch.int32)


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
pairs = st.integers(1, 24).flatmap(lambda n: st.tuples(st.lists(finite, min_size=n, max_size=n),
                                                       st.lists(finite, min_size=n, max_size=n)))


@settings(max_examples=60, deadline=None)
@given(pairs)
def test_symmetric_metrics(pair):
    a, b = T(pair[0]), T(pair[1])
    assert M.max_abs(a, b) == M.max_abs(b, a)
    assert M.mean_abs(a, b) == pytest.approx(M.mean_abs(b, a), rel=1e-12)
    assert M.cosine(a, b) == pytest.approx(M.cosine(b, a), rel=1e-12, abs=1e-12)
    assert M.max_ulp(a, b) == M.max_ulp(b, a)
    assert M.max_ulp(a, b, "bf16") == M.max_ulp(b, a, "bf16")


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=24))
def test_equal_tensors_are_exactly_zero(values):
    a = T(values)
    assert M.max_abs(a, a.clone()) == 0.0 and M.mean_abs(a, a.clone()) == 0.0
    assert M.rel_rms(a, a.clone()) == 0.0 and M.max_ulp(a, a.clone()) == 0.0
    assert M.sqnr_db(a, a.clone()) == math.inf
    assert M.verdict(M.rel_rms(a, a.clone()), 0.0) == "within floor"


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=2, max_size=24), st.integers(0, 2**31 - 1))
def test_monotonic_under_growing_error(values, seed):
    ref = T(values, dtype=torch.float64)
    if float(ref.abs().sum()) == 0.0:
        ref = ref + 1.0
    noise = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 1e-3
    series = [ref + k * noise for k in (1e-3, 1e-2, 1e-1, 1.0)]
    for metric in (M.max_abs, M.mean_abs, M.rel_rms):
        vals = [metric(ref, x) for x in series]
        assert all(u < v for u, v in zip(vals, vals[1:])), (metric.__name__, vals)
    sq = [M.sqnr_db(ref, x) for x in series]
    assert all(u > v for u, v in zip(sq, sq[1:]))


def _same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or a == pytest.approx(b, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("seed", range(4))
def test_fused_reductions_equal_the_separate_metrics(seed):
    g = torch.Generator().manual_seed(seed)
    nan, inf = float("nan"), float("inf")
    cases = [
        (torch.randn(64, generator=g), torch.randn(64, generator=g), torch.float32),
        (torch.randn(8, 16, generator=g).bfloat16(), torch.randn(8, 16, generator=g).bfloat16(), torch.bfloat16),
        (torch.randn(50, generator=g).double(), torch.randn(50, generator=g).half(), torch.float16),
        (T([1.0, -2.0, 3.0]), T([1.0, -2.0, 3.0]), torch.float32),
        (T([0.0, 0.0]), T([0.0, 1.0]), torch.float32),
        (T([0.0, 0.0]), T([0.0, 0.0]), torch.float32),
        (T([1.0, nan, inf, 2.0]), T([1.5, nan, inf, 2.0]), torch.float32),    # agreeing non-finite values
        (T([1.0, 2.0]), T([1.0, inf]), torch.float32),                        # broken candidate
        (T([1.0, -inf]), T([1.0, inf]), torch.float32),
        (T([1e5, -3.0]), T([1e5, -3.0001]), torch.float16),                   # overflows the ULP dtype
        (torch.empty(0), torch.empty(0), torch.float32),
    ]
    for ref, x, dtype in cases:
        expected = M.all_metrics(ref, x, dtype=dtype)
        got = M.metrics_from_reductions(M.pair_reductions(ref, x, dtype).tolist(), dtype)
        for key, value in expected.items():
            assert _same(got[key], value), (key, got[key], value, ref, x)
        assert got["nonfinite"] == int((~torch.isfinite(x.double())).sum())
        # a wider candidate: the floor is its own representability in the unit, the other metrics do not move
        swapped = M.metrics_from_reductions(M.pair_reductions(ref, x, dtype, floor_from_candidate=True).tolist(), dtype)
        floor_of_x = M.representability_floor(x, dtype) if x.numel() else 0.0
        assert _same(swapped["floor"], floor_of_x) or (math.isinf(swapped["floor"]) and not torch.isfinite(x).all())
        assert all(_same(swapped[k], got[k]) for k in got if k != "floor")


def test_ulp_at_is_the_spacing_of_the_dtype():
    assert M.ulp_at(1.0, "fp32") == 2.0**-23 and M.ulp_at(1.5, "fp32") == 2.0**-23
    assert M.ulp_at(0.999, "bf16") == 2.0**-8 and M.ulp_at(1024.0, "fp16") == 1.0
    assert M.ulp_at(-2.0, "bf16") == 2.0**-6
    assert M.ulp_at(0.0, "bf16") == M.ulp_at(1e-45, "bf16") == torch.finfo(torch.bfloat16).tiny * 2.0**-7
    bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
    for dtype, view in bits.items():  # the spacing is the distance to the next representable value
        for v in (0.3, 1.0, 7.5, 1000.0):
            t = torch.tensor([v], dtype=dtype)
            following = (t.view(view) + 1).view(dtype)
            assert float(following) - float(t) == M.ulp_at(float(t), dtype), (dtype, v)


def test_scaled_ulps_ignore_sign_flips_near_zero_and_read_rounding_as_a_few_units():
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(4096, generator=g, dtype=torch.float64)
    ref[:8] = 1e-6 * torch.randn(8, generator=g, dtype=torch.float64)
    x = ref.to(torch.bfloat16).double()
    x[:8] = -x[:8]  # tiny values change sign: thousands of raw ULPs apart, nothing at the tensor's scale
    assert M.max_ulp(ref, x, "bf16") > 1e4
    assert M.scaled_max_ulp(ref, x, "bf16") < 4
    # a real error of 1% on one large value is many ULPs at the tensor's scale
    bad = x.clone()
    bad[100] = ref[100] * 1.01 + 0.05
    assert M.scaled_max_ulp(ref, bad, "bf16") > 4 * M.scaled_max_ulp(ref, x, "bf16")
    assert M.scaled_max_ulp(torch.zeros(3), torch.zeros(3)) == 0.0
    assert M.scaled_max_ulp(torch.zeros(3), torch.ones(3)) == math.inf


@pytest.mark.parametrize("piece", [2**18, 100])
def test_finite_fast_path_gives_the_general_paths_reductions(piece, monkeypatch):
    """On the CPU a finite fp32/fp16/bf16 pair takes the few-pass path: the same maxima and counts as the general
    fp64 path, the same sums up to summation order, in one piece or many; pairs it does not take (NaN/Inf, a unit
    that overflows, fp64) fall through to the general path."""
    monkeypatch.setattr(M, "_FINITE_PIECE", piece)
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4099, generator=g)
    near_zero = base.clone()
    near_zero[:64] = 1e-6 * torch.randn(64, generator=g)
    flipped = near_zero + 1e-5 * torch.randn(4099, generator=g)  # signs flip near zero
    cases = [
        (base, base + 1e-3 * torch.randn(4099, generator=g), torch.float32),
        (near_zero, flipped, torch.float32),
        (near_zero, flipped.bfloat16(), torch.bfloat16),             # fp32 reference, bf16 candidate
        (near_zero.half(), flipped.half(), torch.float16),
        (base.bfloat16(), base.bfloat16(), torch.bfloat16),          # identical
        (T([-0.0, 0.0, 2.0]), T([0.0, -0.0, -2.0]), torch.float32),  # signed zeros and a sign flip
        (T([3e38, -3e38]), T([3e38, -3e38]), torch.float32),         # fp64 squares, no overflow
    ]
    for ref, x, unit in cases:
        for from_candidate in (False, True):
            fast = M._pair_reductions_finite(ref, x, unit, from_candidate)
            assert fast is not None, (ref, x, unit)
            general = M._pair_reductions_torch(ref, x, unit, from_candidate).tolist()
            for name, a, b in zip(M.REDUCTIONS, fast.tolist(), general):
                exact = name in ("max_abs", "kept", "bad", "nonfinite", "ulp", "ulp_bad", "ulp_ok", "floor_bad")
                assert a == b if exact else _same(a, b), (name, a, b, unit, from_candidate)
            assert M.pair_reductions(ref, x, unit, floor_from_candidate=from_candidate).tolist() == fast.tolist()
    nan, inf = float("nan"), float("inf")
    late_nan = base.clone()
    late_nan[-1] = nan  # in the last piece
    for ref, x, unit in [(T([1.0, nan]), T([1.0, nan]), torch.float32), (T([1.0, 2.0]), T([1.0, inf]), torch.float32),
                         (T([1e5, -3.0]), T([1e5, -3.0001]), torch.float16), (base, late_nan, torch.float32),
                         (base * 1e5, base * 1e5, torch.float16),
                         (T([1.0, 2.0]).double(), T([1.0, 2.5]).double(), torch.float32), (T([]), T([]), torch.float32)]:
        assert M._pair_reductions_finite(ref, x, unit, False) is None, (ref, x, unit)
