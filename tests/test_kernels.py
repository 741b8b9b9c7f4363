"""The fused Triton kernels against their torch paths: the comparison kernel against
``metrics.pair_reductions``'s, the row statistics kernel against per-row ``vector_norm``/``sum``/``aminmax``.

On a CPU the kernels run through Triton's interpreter (in a subprocess with ``TRITON_INTERPRET=1``, which
must be set before Triton is imported); on a CUDA GPU the compiled kernels run, and ``pair_reductions``
dispatches to the comparison kernel.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import parity_kit as pk
from parity_kit import metrics as M
from parity_kit.errors import ParityKitError
from parity_kit.recording import Call, Recording

triton = pytest.importorskip("triton", reason="the fused kernel needs Triton")
tl = pytest.importorskip("triton.language")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EXACT = {"max_abs", "kept", "bad", "nonfinite", "ulp", "ulp_bad", "ulp_ok", "floor_bad"}
NAN, INF = float("nan"), float("inf")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _subnormal(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny / 8


def _cases(seed: int, device: str = "cpu") -> list[tuple[str, torch.Tensor, torch.Tensor, torch.dtype]]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    cases = []
    for ref_dtype in DTYPES:
        for cand_dtype in DTYPES:
            ref = randn(37, 29)
            cand = ref + 1e-2 * randn(37, 29)
            cases.append((f"random {ref_dtype}->{cand_dtype}", ref.to(ref_dtype), cand.to(cand_dtype), cand_dtype))
    # the unit differs from both inputs' dtypes: ULPs and the floor round both sides
    ref = randn(1025) * 100
    cases.append(("fp32 pair, fp16 unit", ref, ref * (1 + 1e-3 * randn(1025)), torch.float16))
    cases.append(("fp32 pair, bf16 unit", ref, ref * (1 + 1e-3 * randn(1025)), torch.bfloat16))
    cases.append(("fp16 pair, bf16 unit", ref.half(), (ref * 1.01).half(), torch.bfloat16))
    # halfway cases: rounding to the unit must break ties to even, as torch does (a distance of 0 ULPs)
    ties = torch.tensor([1.0 + 3 * 2**-8, 1.0 + 2**-8, -(3.0 + 3 * 2**-7), 1.0 + 3 * 2**-11, 2**-14 * (1 + 3 * 2**-11)])
    cases.append(("ties fp16 -> bf16 unit", ties.half(), ties.half().bfloat16(), torch.bfloat16))
    cases.append(("ties fp32 -> bf16 unit", ties, ties.bfloat16(), torch.bfloat16))
    cases.append(("ties fp32 -> fp16 unit", ties, ties.half(), torch.float16))
    big = torch.tensor([7e4, -7e4, 1.0, 65504.0, 65520.0, -3.0])  # 7e4 and 65520 overflow fp16
    cases.append(("fp16 overflow of the unit", big, big + torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 1e-3]), torch.float16))
    # non-finite values: agreeing (left out), broken (inf distances), in either tensor
    r = torch.tensor([1.0, NAN, INF, -INF, 2.0, 3.0, NAN, INF, 0.0, -0.0, 5.0])
    c = torch.tensor([1.5, NAN, INF, -INF, INF, NAN, 1.0, -INF, -0.0, 0.0, 5.0])
    for dtype in DTYPES:
        cases.append((f"non-finite broken {dtype}", r.to(dtype), c.to(dtype), dtype))
    agreeing = torch.tensor([1.0, NAN, INF, -INF, 2.0, 0.0])
    for dtype in DTYPES:
        cases.append((f"non-finite agreeing {dtype}", agreeing.to(dtype), (agreeing * 1.25).to(dtype), dtype))
    # subnormals of each dtype, zeros of both signs, values straddling zero and powers of two
    for dtype in DTYPES:
        tiny = _subnormal(dtype)
        s = torch.tensor([tiny, -tiny, 3 * tiny, 0.0, -0.0, 1.0, -1.0, 2.0])
        t = torch.tensor([2 * tiny, tiny, -tiny, -0.0, tiny, 1.0 - torch.finfo(dtype).eps / 2, -1.0, 2.0])
        cases.append((f"subnormals and zeros {dtype}", s.to(dtype), t.to(dtype), dtype))
    for dtype in DTYPES:
        same = randn(3, 333).to(dtype)
        cases.append((f"exact equality {dtype}", same, same.clone(), dtype))
        cases.append((f"all zero {dtype}", torch.zeros(5, dtype=dtype), torch.zeros(5, dtype=dtype), dtype))
    cases.append(("one element", torch.tensor([2.0]), torch.tensor([2.5]), torch.float32))
    cases.append(("zero reference", torch.zeros(7), randn(7), torch.float32))
    # non-contiguous layouts: a transpose and a strided slice
    wide = randn(64, 48)
    cases.append(("transposed", wide.t(), (wide + 1e-3 * randn(64, 48)).bfloat16().t(), torch.bfloat16))
    cases.append(("strided", wide[:, ::3], (wide * 1.001)[:, ::3], torch.float32))
    cases.append(("empty", torch.empty(0), torch.empty(0), torch.float32))
    return [(name, r.to(device), c.to(device), unit) for name, r, c, unit in cases]


def _assert_matches(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert got.dtype == torch.float64 and got.shape == (len(M.REDUCTIONS),), name
    for key, a, b in zip(M.REDUCTIONS, got.tolist(), expected.tolist()):
        if key in EXACT:
            assert a == b, (name, key, a, b)
        else:  # fp64 sums in another order
            assert a == pytest.approx(b, rel=1e-12, abs=0.0), (name, key, a, b)
    got_m, exp_m = M.metrics_from_reductions(got.tolist()), M.metrics_from_reductions(expected.tolist())
    for key, b in exp_m.items():
        a = got_m[key]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=0.0), (name, key, a, b)


_INTERPRETER_CANNOT_LOOP = 3  # exit code of _interpreted_checks when the interpreter cannot run the kernel


@triton.jit
def _count_to(out_ptr, n):
    total = 0
    for _ in range(0, n):
        total += 1
    tl.store(out_ptr, total)


def _require_interpreted_loops() -> None:
    """Exit with _INTERPRETER_CANNOT_LOOP where the interpreter cannot run the kernels' loops."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    # Triton 3.6's interpreter passes scalar arguments as 1-element arrays, which NumPy 2 refuses to
    # use as a loop bound; the kernels' loops run to one, so there is nothing to check on such a version
    counted = torch.zeros(1, dtype=torch.int32)
    try:
        _count_to[(1,)](counted, 3)
    except Exception as e:
        print(f"Triton {triton.__version__}'s interpreter cannot run a loop with a runtime bound: {e}")
        sys.exit(_INTERPRETER_CANNOT_LOOP)
    assert int(counted) == 3


def _interpreted_checks() -> None:
    """Every CPU check of the comparison kernel; run by :func:`test_interpreted_kernel_matches_the_torch_path`
    in a fresh process, since TRITON_INTERPRET must be set before Triton is first imported."""
    _require_interpreted_loops()
    from parity_kit.comparison import kernels

    for seed in (0, 1):
        for name, ref, cand, unit in _cases(seed):
            _assert_matches(kernels.pair_reductions_triton(ref, cand, unit),
                            M._pair_reductions_torch(ref, cand, unit), name)
            # the floor taken from the candidate (a candidate wider than the reference), in the reference's unit
            _assert_matches(kernels.pair_reductions_triton(ref, cand, unit, floor_from_candidate=True),
                            M._pair_reductions_torch(ref, cand, unit, True), f"{name}, floor from the candidate")
    # few programs, so each walks several tiles and the last ones run past the end
    kernels._MAX_PROGRAMS = 4
    g = torch.Generator().manual_seed(2)
    for n in (4 * 1024, 5 * 1024 + 3, 9 * 1024 - 1):
        ref = torch.randn(n, generator=g)
        ref[::97] = NAN
        cand = (ref + 1e-2 * torch.randn(n, generator=g)).bfloat16()
        cand[::89] = INF
        _assert_matches(kernels.pair_reductions_triton(ref, cand, torch.bfloat16),
                        M._pair_reductions_torch(ref, cand, torch.bfloat16), f"n={n}")
    # a single changed element, in the last tile's last lane, must show in every distance
    ref = torch.randn(3 * 1024 + 5, generator=g).bfloat16()
    cand = ref.clone()
    cand[-1] = cand[-1] * 2 + 1
    got = M.metrics_from_reductions(kernels.pair_reductions_triton(ref, cand, torch.bfloat16).tolist())
    assert got["max_abs"] == abs(float(cand[-1]) - float(ref[-1])) and got["max_ulp"] > 0, got
    assert got["rel_rms"] > 0 and got["cosine"] < 1, got


def _run_interpreted(checks: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    code = f"import test_kernels; test_kernels.{checks}()"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode == _INTERPRETER_CANNOT_LOOP:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stderr[-4000:]


def test_interpreted_kernel_matches_the_torch_path():
    _run_interpreted("_interpreted_checks")


def test_kernel_rejects_what_it_cannot_reduce():
    from parity_kit.comparison.kernels import pair_reductions_triton

    with pytest.raises(ParityKitError, match="fp16/bf16/fp32"):
        pair_reductions_triton(torch.ones(3, dtype=torch.float64), torch.ones(3), torch.float32)
    with pytest.raises(ParityKitError, match="ULPs"):
        pair_reductions_triton(torch.ones(3), torch.ones(3), torch.float64)
    with pytest.raises(ParityKitError, match="one numel"):
        pair_reductions_triton(torch.ones(3), torch.ones(4), torch.float32)


def test_cpu_pairs_never_reach_the_kernel(monkeypatch):
    def fail(*args):
        raise AssertionError("the kernel was called for a CPU pair")

    monkeypatch.setattr(M, "_kernel_state", fail)
    v = M.pair_reductions(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5]), torch.float32)
    assert M.metrics_from_reductions(v.tolist())["rel_rms"] == pytest.approx(0.1)


@cuda
@pytest.mark.parametrize("seed", [0, 1])
def test_cuda_kernel_matches_the_torch_path(seed):
    from parity_kit.comparison.kernels import pair_reductions_triton

    for name, ref, cand, unit in _cases(seed, "cuda"):
        _assert_matches(pair_reductions_triton(ref, cand, unit), M._pair_reductions_torch(ref, cand, unit), name)
        _assert_matches(pair_reductions_triton(ref, cand, unit, floor_from_candidate=True),
                        M._pair_reductions_torch(ref, cand, unit, True), f"{name}, floor from the candidate")


@cuda
def test_cuda_kernel_on_large_pairs_matches_the_torch_path():
    from parity_kit.comparison.kernels import pair_reductions_triton

    g = torch.Generator("cuda").manual_seed(4)
    # more tiles than programs, so each program walks several; one size a multiple of 16, one odd
    for n in (1024 * 1024 * 3 + 16, 5_000_001):
        ref = torch.randn(n, device="cuda", generator=g)
        cand = (ref + 1e-2 * torch.randn(n, device="cuda", generator=g)).bfloat16()
        ref[1::1013] = NAN
        cand[1::1013] = NAN
        cand[::4099] = -INF
        for r, c, unit in ((ref.bfloat16(), cand, torch.bfloat16), (ref, cand, torch.bfloat16),
                           (ref, cand.float(), torch.float32), (ref.half(), cand.half(), torch.float16)):
            _assert_matches(pair_reductions_triton(r, c, unit), M._pair_reductions_torch(r, c, unit), f"n={n}")


@cuda
def test_cuda_compare_uses_the_kernel_and_agrees_with_torch(monkeypatch):
    g = torch.Generator("cuda").manual_seed(5)
    calls_r, calls_c = [], []
    for order, width in enumerate((64, 4096, 11008, 333)):
        r = torch.randn(2, 17, width, device="cuda", generator=g)
        c = r + 1e-2 * torch.randn(r.shape, device="cuda", generator=g)
        calls_r.append(Call(f"m{order}", 0, order, {"output": r.bfloat16()}))
        calls_c.append(Call(f"m{order}", 0, order, {"output": c.bfloat16()}))
    ref, cand = Recording("tensors", calls_r), Recording("tensors", calls_c)
    monkeypatch.setattr(M, "_kernel_state", "unloaded")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a kernel failure would warn and fall back
        fused = pk.compare(ref, cand)
    assert callable(M._kernel_state), M._kernel_state
    monkeypatch.setenv("PARITY_KIT_KERNEL", "0")
    plain = pk.compare(ref, cand)
    for col in ("max_abs", "max_ulp", "nonfinite"):
        assert fused[col].tolist() == plain[col].tolist(), col
    for col in ("mean_abs", "rel_rms", "cosine", "sqnr_db", "floor_ratio"):
        assert fused[col].to_numpy() == pytest.approx(plain[col].to_numpy(), rel=1e-9), col
    assert (fused["verdict"] == plain["verdict"]).all()


# ------------------------------------------------------------------------------ row statistics
def _row_cases(dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Tensors for one call: mixed row lengths and counts, one allocated far from the others, a
    non-contiguous one, a contiguous view at an unaligned offset, 1-D, 0-d, many small ones."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    far = torch.empty(1 << 23, device=device, dtype=dtype)  # the last rows of a large, separate allocation
    far[-6 * 40:] = randn(6 * 40)
    flat = randn(200)
    tensors = [randn(3, 5, 40), randn(7, 1100) * 50, far[-6 * 40:].view(6, 40), randn(2, 3), randn(24, 6).t(),
               flat[5:5 + 7 * 16].view(7, 16), randn(37), randn(()) + 2]
    tensors += [randn(1 + i % 9, 1 + (7 * i) % 20) for i in range(30)]
    ptrs = [t.data_ptr() for t in tensors]
    assert max(ptrs) - min(ptrs) > 1 << 23
    return tensors


def _aligned_row_cases(dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """Every row starting on 16 bytes: the kernel's vectorised variant."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g).to(device=device, dtype=dtype) for shape in ((5, 64), (2, 3, 8), (9, 48))]


def _torch_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The reference: [4, R] of per-row vector_norm, sum (fp32 accumulation), min, max."""
    parts = []
    for t in tensors:
        rows = t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)
        lo, hi = torch.aminmax(rows, dim=-1)
        parts.append(torch.stack([torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32),
                                  rows.sum(-1, dtype=torch.float32), lo.float(), hi.float()]))
    return torch.cat(parts, dim=1)


def _assert_rows_match(got: torch.Tensor, tensors: list[torch.Tensor], name: str) -> None:
    expected = _torch_rows(tensors)
    assert got.dtype == torch.float32 and got.shape == expected.shape, (name, got.shape, expected.shape)
    assert got.device == tensors[0].device, name
    got, expected = got.cpu(), expected.cpu()
    widths = [t.shape[-1] if t.dim() else 1 for t in tensors]
    row_widths = torch.repeat_interleave(torch.tensor(widths, dtype=torch.float32),
                                         torch.tensor([t.numel() // w for t, w in zip(tensors, widths)]))
    # sums in another order: the tolerance scales with the row's magnitude (its norm times sqrt(length))
    scale = expected[0].nan_to_num(0.0, 0.0, 0.0) * row_widths.sqrt()
    for k, what in ((0, "norm"), (1, "sum")):
        close = (got[k] - expected[k]).abs() <= 1e-5 * scale + 1e-6
        same = (got[k] == expected[k]) | (got[k].isnan() & expected[k].isnan())
        assert bool((close | same).all()), (name, what, got[k][~(close | same)], expected[k][~(close | same)])
    # min and max are exact, NaN where torch has NaN
    torch.testing.assert_close(got[2:], expected[2:], rtol=0, atol=0, equal_nan=True, msg=name)


def _non_finite_rows(dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """Rows with NaN, +inf, -inf, both infinities, NaN next to an infinity, NaN in a later column block."""
    wide = torch.ones(4, 1100)
    wide[1, 1050] = NAN  # in the second column block
    wide[2, 3] = -INF
    wide[3, 1099] = INF
    rows = torch.tensor([[1.0, NAN, 2.0], [INF, 1.0, 2.0], [1.0, -INF, 2.0], [INF, -INF, 0.0],
                         [NAN, INF, -1.0], [NAN, NAN, NAN], [1.0, 2.0, 3.0]])
    return [t.to(device=device, dtype=dtype) for t in (rows, wide, torch.tensor(NAN), torch.tensor([INF]))]


def _assert_totals_match(got: tuple, tensors: list[torch.Tensor], name: str) -> None:
    """tensor_statistics_triton against the torch path's segment reductions over the torch rows."""
    from parity_kit.capture.stats_batch import StatsBatch

    totals, row_rms, rows, widths = got
    assert widths == [t.shape[-1] if t.dim() else 1 for t in tensors], name
    assert rows == [t.numel() // w for t, w in zip(tensors, widths)], name
    expected_totals, expected_rms = StatsBatch._segment_totals(_torch_rows(tensors).cpu(), rows, widths, True)
    assert totals.dtype == torch.float64 and totals.shape == (4, len(tensors)), name
    assert row_rms.dtype == torch.float32 and row_rms.device == tensors[0].device, name
    totals, row_rms = totals.cpu(), row_rms.cpu()
    # sums in another order (fp64 over fp32 rows that themselves differ in their last bits)
    torch.testing.assert_close(totals[:2], expected_totals[:2], rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)
    torch.testing.assert_close(totals[2:], expected_totals[2:], rtol=0, atol=0, equal_nan=True, msg=name)
    torch.testing.assert_close(row_rms, expected_rms, rtol=1e-5, atol=1e-7, equal_nan=True, msg=name)


def _interpreted_row_checks() -> None:
    """Every CPU check of the row statistics kernel, through the interpreter (see _interpreted_checks)."""
    _require_interpreted_loops()
    from parity_kit.capture import row_kernels as kernels

    for dtype in DTYPES:
        for name, tensors in (("mixed", _row_cases(dtype, "cpu")), ("aligned", _aligned_row_cases(dtype, "cpu")),
                              ("non-finite", _non_finite_rows(dtype, "cpu"))):
            _assert_rows_match(kernels.row_statistics_triton(tensors), tensors, f"{name} {dtype}")
            _assert_totals_match(kernels.tensor_statistics_triton(tensors), tensors, f"totals {name} {dtype}")
    # a tensor with more rows than one step of the totals kernel; without per-token rms
    long = [torch.randn(kernels._TOTALS_BLOCK * 2 + 3, 8), torch.randn(5, 8)]
    _assert_totals_match(kernels.tensor_statistics_triton(long), long, "long")
    assert kernels.tensor_statistics_triton(long, per_token=False)[1].numel() == 0
    # one tensor; and inputs left as they were
    one = torch.arange(12.0).reshape(3, 4)
    got = kernels.row_statistics_triton([one])
    assert got.tolist() == [[float(r.norm()) for r in one], [6.0, 22.0, 38.0], [0.0, 4.0, 8.0], [3.0, 7.0, 11.0]]
    assert torch.equal(one, torch.arange(12.0).reshape(3, 4))


def test_interpreted_row_statistics_match_torch():
    _run_interpreted("_interpreted_row_checks")


def test_row_statistics_reject_what_they_cannot_reduce():
    from parity_kit.capture.row_kernels import row_statistics_triton

    with pytest.raises(ParityKitError, match="no tensors"):
        row_statistics_triton([])
    with pytest.raises(ParityKitError, match="fp16/bf16/fp32"):
        row_statistics_triton([torch.ones(3, dtype=torch.float64)])
    with pytest.raises(ParityKitError, match="per \\(device, dtype\\) group"):
        row_statistics_triton([torch.ones(3), torch.ones(3, dtype=torch.float16)])
    with pytest.raises(ParityKitError, match="empty"):
        row_statistics_triton([torch.ones(3), torch.ones(0, 4)])


@cuda
def test_cuda_row_statistics_match_torch():
    from parity_kit.capture.row_kernels import (
        row_statistics_triton,
        tensor_statistics_triton,
    )

    for dtype in DTYPES:
        for name, tensors in (("mixed", _row_cases(dtype, "cuda")), ("aligned", _aligned_row_cases(dtype, "cuda")),
                              ("non-finite", _non_finite_rows(dtype, "cuda"))):
            _assert_rows_match(row_statistics_triton(tensors), tensors, f"{name} {dtype}")
        # a Llama-7B-like batch: row lengths 128 to 32000, many programs per tensor
        g = torch.Generator("cuda").manual_seed(3)
        big = [torch.randn(1, 512, width, device="cuda", generator=g).to(dtype) for width in (4096, 11008, 128, 32000)]
        big.append(torch.randn(4096, device="cuda", generator=g).to(dtype))
        _assert_rows_match(row_statistics_triton(big), big, f"large {dtype}")
        _assert_totals_match(tensor_statistics_triton(big), big, f"totals large {dtype}")
        for name, tensors in (("mixed", _row_cases(dtype, "cuda")), ("non-finite", _non_finite_rows(dtype, "cuda"))):
            _assert_totals_match(tensor_statistics_triton(tensors), tensors, f"totals {name} {dtype}")
