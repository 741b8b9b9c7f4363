"""WKV recurrence: recurrent vs chunked vs an independent per-head loop, in fp64 and low precision."""

from __future__ import annotations

import math

import pytest
import torch

from parity_kit.errors import ParityKitError
from parity_kit.models.wkv import (
    random_wkv_inputs,
    wkv_chunk,
    wkv_recurrent,
    wkv_reference,
)


def rel_rms(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def loop_per_head(r, w, k, v, a, b, s0=None):
    """Written differently on purpose: plain Python over batch, head and time, explicit N×V matrices,
    the update as S_t = S_{t-1} (diag(e^w) + α βᵀ)ᵀ ... expanded term by term."""
    bsz, seq, heads, n = r.shape
    vd = v.shape[-1]
    out = torch.zeros(bsz, seq, heads, vd, dtype=torch.float64)
    finals = torch.zeros(bsz, heads, n, vd, dtype=torch.float64)
    for bi in range(bsz):
        for h in range(heads):
            S = torch.zeros(n, vd, dtype=torch.float64) if s0 is None else s0[bi, h].double().clone()
            for t in range(seq):
                wt, kt, vt, at, bt, rt = (x[bi, t, h].double() for x in (w, k, v, a, b, r))
                transition = torch.diag(torch.exp(wt)) + torch.outer(bt, at)   # S ← M S + k vᵀ
                S = transition @ S + torch.outer(kt, vt)
                out[bi, t, h] = S.t() @ rt
            finals[bi, h] = S
    return out, finals


@pytest.mark.parametrize("with_state", [False, True])
def test_recurrent_matches_independent_loop(with_state):
    x = random_wkv_inputs(2, 9, 2, 4, dtype=torch.float64, seed=11)
    gen = torch.Generator().manual_seed(1)
    s0 = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=gen) if with_state else None
    ref_o, ref_s = loop_per_head(*x, s0)
    o, s = wkv_recurrent(*x, s0)
    assert rel_rms(ref_o, o) < 1e-12 and rel_rms(ref_s, s) < 1e-12
    o64, s64 = wkv_reference(*x, s0)
    assert rel_rms(ref_o, o64) < 1e-12 and rel_rms(ref_s, s64) < 1e-12


def test_value_dim_may_differ_from_key_dim():
    r, w, k, v, a, b = random_wkv_inputs(1, 7, 2, 4, dtype=torch.float64, seed=5)
    v = torch.randn(1, 7, 2, 6, dtype=torch.float64)
    ref_o, ref_s = loop_per_head(r, w, k, v, a, b)
    o, s = wkv_chunk(r, w, k, v, a, b, chunk_size=4)
    assert o.shape == (1, 7, 2, 6) and rel_rms(ref_o, o) < 1e-12 and rel_rms(ref_s, s) < 1e-12


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("seq_len", [50, 97, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_equals_recurrent_fp64(chunk_size, seq_len, with_state):
    x = random_wkv_inputs(2, seq_len, 3, 16, dtype=torch.float64, seed=seq_len + chunk_size)
    s0 = torch.randn(2, 3, 16, 16, dtype=torch.float64) if with_state else None
    o_rec, s_rec = wkv_recurrent(*x, s0)
    o_chk, s_chk, states = wkv_chunk(*x, s0, chunk_size=chunk_size, return_chunk_states=True)
    assert seq_len % chunk_size != 0 or seq_len < chunk_size
    assert rel_rms(o_rec, o_chk) <= 1e-10
    assert rel_rms(s_rec, s_chk) <= 1e-10
    assert states.shape == (2, math.ceil(seq_len / chunk_size), 3, 16, 16)
    if s0 is None:
        assert states[:, 0].abs().max() == 0
    else:
        assert torch.equal(states[:, 0], s0)
    for c in range(1, states.shape[1]):
        prefix = [t[:, : c * chunk_size] for t in x]
        assert rel_rms(wkv_recurrent(*prefix, s0)[1], states[:, c]) <= 1e-10


def test_chunked_continuation_equals_one_pass():
    x = random_wkv_inputs(1, 70, 2, 8, dtype=torch.float64, seed=3)
    o_all, s_all = wkv_chunk(*x, chunk_size=16)
    o1, s1 = wkv_chunk(*(t[:, :33] for t in x), chunk_size=16)
    o2, s2 = wkv_chunk(*(t[:, 33:] for t in x), s1, chunk_size=16)
    assert rel_rms(o_all, torch.cat([o1, o2], 1)) < 1e-12 and rel_rms(s_all, s2) < 1e-12


def test_low_precision_modes_differ_and_stay_close():
    x64 = random_wkv_inputs(1, 200, 2, 32, dtype=torch.float64, seed=9)
    xb = [t.to(torch.bfloat16) for t in x64]
    ref_o, ref_s = wkv_reference(*xb)
    o_fp32_state, s_fp32_state = wkv_recurrent(*xb)
    o_bf16_state, s_bf16_state = wkv_recurrent(*xb, state_dtype=None)
    o_chunk, s_chunk = wkv_chunk(*xb)
    o_emul, s_emul = wkv_chunk(*xb, intermediate_dtype=torch.bfloat16)
    assert o_fp32_state.dtype == torch.bfloat16 and s_fp32_state.dtype == torch.float32
    assert s_bf16_state.dtype == torch.bfloat16
    # fp32 state: only the output rounding is left; the emulated bf16 chunk path and a bf16 state are worse.
    assert rel_rms(ref_s, s_fp32_state) < 1e-5 and rel_rms(ref_s, s_chunk) < 1e-5
    assert rel_rms(ref_s, s_emul) > 10 * rel_rms(ref_s, s_chunk)
    assert rel_rms(ref_s, s_bf16_state) > 10 * rel_rms(ref_s, s_fp32_state)
    for o in (o_fp32_state, o_bf16_state, o_chunk, o_emul):
        assert torch.isfinite(o).all() and rel_rms(ref_o, o) < 0.05


def test_chunk_is_differentiable():
    x = [t.requires_grad_() for t in random_wkv_inputs(1, 40, 2, 8, dtype=torch.float64, seed=4)]
    o, s = wkv_chunk(*x, chunk_size=16)
    (o.square().sum() + s.sum()).backward()
    x2 = [t.detach().clone().requires_grad_() for t in x]
    o2, s2 = wkv_recurrent(*x2)
    (o2.square().sum() + s2.sum()).backward()
    for g1, g2 in zip((t.grad for t in x), (t.grad for t in x2)):
        assert rel_rms(g2, g1) < 1e-10


def test_bad_inputs_raise():
    r, w, k, v, a, b = random_wkv_inputs(1, 8, 2, 4)
    with pytest.raises(ParityKitError, match="share one shape"):
        wkv_recurrent(r, w[:, :, :1], k, v, a, b)
    with pytest.raises(ParityKitError, match="initial_state"):
        wkv_chunk(r, w, k, v, a, b, torch.zeros(1, 2, 4, 5))
    with pytest.raises(ParityKitError, match="chunk_size"):
        wkv_chunk(r, w, k, v, a, b, chunk_size=0)
    with pytest.raises(ParityKitError, match="too large"):
        wkv_chunk(r, w * 100, k, v, a, b, chunk_size=8)


def test_fp16_low_intermediates_stay_finite_at_chunk_64():
    # the centred decay factors exceed fp16's range at chunk 64; only the bounded products are rounded
    x = random_wkv_inputs(1, 256, 2, 64, dtype=torch.float16, seed=1)
    o, state = wkv_chunk(*x, chunk_size=64, intermediate_dtype=torch.float16)
    ref, _ = wkv_reference(*x)
    assert torch.isfinite(o).all() and torch.isfinite(state).all()
    rel = float((o.double() - ref).square().mean().sqrt() / ref.square().mean().sqrt())
    assert 0 < rel < 5e-3
