"""The RWKV-7 WKV recurrence in three forms: token-by-token, chunked-parallel, and an fp64 reference.

Layout follows flash-linear-attention (FLA): ``r, w, k, a, b`` are ``[B, T, H, N]``, ``v`` is
``[B, T, H, V]``; ``w`` is the *log* decay (the per-step decay is ``exp(w)``); ``a = -kk`` and
``b = kk * a_rate`` in the model. The state is ``[B, H, N, V]`` with the key index first:

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ ,      o_t = S_tᵀ r_t   (scale 1)

The low-rank term reads the state *before* the decay. BlinkDL's kernels keep the transpose.

The chunked form splits the sequence into chunks of ``L`` tokens. With Γ the inclusive cumulative
sum of ``w`` inside a chunk and S₀ the state entering it, the intra-chunk matrices
``A_qk, A_qb`` (j ≤ i) and ``A_ak, A_ab`` (j < i) give the pseudo-values X (``X_i = a_iᵀ S_{i-1}``)
from the unit lower-triangular system ``(I - A_ab) X = A_ak V + (a ⊙ e^{Γ_{i-1}}) S₀``; then
``o = A_qk V + A_qb X + (r ⊙ e^{Γ}) S₀`` and
``S' = e^{Γ_L} ⊙ S₀ + (k ⊙ e^{Γ_L-Γ})ᵀ V + (b ⊙ e^{Γ_L-Γ})ᵀ X``.

>>> import torch
>>> from parity_kit.models.wkv import wkv_chunk, wkv_recurrent, random_wkv_inputs
>>> x = random_wkv_inputs(1, 40, 2, 8, dtype=torch.float64, seed=0)
>>> o_rec, s_rec = wkv_recurrent(*x)
>>> o_chk, s_chk = wkv_chunk(*x, chunk_size=16)
>>> bool(torch.allclose(o_rec, o_chk, atol=1e-12)) and bool(torch.allclose(s_rec, s_chk, atol=1e-12))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ParityKitError

__all__ = ["wkv_recurrent", "wkv_chunk", "wkv_reference", "random_wkv_inputs"]

# Largest |exponent| the factorised intra-chunk matrices may meet, per compute dtype: e^{±x} must
# stay well inside the normal range (fp32: e^88, fp64: e^709) with headroom for the multiply.
_EXP_LIMIT = {torch.float32: 80.0, torch.float64: 700.0}


def _check_inputs(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> None:
    names = {"r": r, "w": w, "k": k, "a": a, "b": b}
    for name, t in {**names, "v": v}.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ParityKitError(f"WKV input {name!r} must be a 4-d tensor [B, T, H, N]; got {shape}")
        if not t.is_floating_point():
            raise ParityKitError(f"WKV input {name!r} must be floating point; got {t.dtype}")
    shape = r.shape
    for name, t in names.items():
        if t.shape != shape:
            raise ParityKitError(
                f"WKV inputs r, w, k, a, b must share one shape [B, T, H, N]; r is {tuple(shape)}, "
                f"{name} is {tuple(t.shape)}"
            )
    if v.shape[:3] != shape[:3]:
        raise ParityKitError(
            f"WKV input v must be [B, T, H, V] with B, T, H of r {tuple(shape[:3])}; got {tuple(v.shape)}"
        )
    if initial_state is not None:
        expected = (shape[0], shape[2], shape[3], v.shape[3])
        if tuple(initial_state.shape) != expected:
            raise ParityKitError(
                f"initial_state must be [B, H, N, V] = {expected} (key index first, FLA layout); "
                f"got {tuple(initial_state.shape)}. A BlinkDL state is the transpose: pass state.transpose(-1, -2)"
            )


def _recurrence(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    initial_state: torch.Tensor | None, compute: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token loop, every operation in ``compute``; returns (o [B,T,H,V] in compute, state)."""
    bsz, seq, heads, n = r.shape
    r, k, v, a, b = (t.to(compute).transpose(1, 2) for t in (r, k, v, a, b))  # [B, H, T, ·]
    decay = torch.exp(w.to(compute)).transpose(1, 2)
    if initial_state is None:
        state = r.new_zeros(bsz, heads, n, v.shape[-1])
    else:
        state = initial_state.to(compute)
    outputs = []
    for t in range(seq):
        # a_tᵀ S_{t-1}: [B, H, 1, N] @ [B, H, N, V] -> [B, H, 1, V]
        low_rank = a[:, :, t, None, :] @ state
        state = (
            state * decay[:, :, t, :, None]
            + b[:, :, t, :, None] * low_rank
            + k[:, :, t, :, None] * v[:, :, t, None, :]
        )
        outputs.append(r[:, :, t, None, :] @ state)  # [B, H, 1, V]
    o = torch.cat(outputs, dim=2) if outputs else v.new_zeros(bsz, heads, 0, v.shape[-1])
    return o.transpose(1, 2), state


def wkv_recurrent(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    initial_state: torch.Tensor | None = None, *, state_dtype: torch.dtype | None = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token WKV: returns ``(o, final_state)``; ``o`` in the input dtype, the state in ``state_dtype``.

    ``state_dtype=torch.float32`` (default) keeps the state and all arithmetic in fp32 like FLA's fused
    recurrent kernel (inputs are upcast, the output is rounded once). ``state_dtype=None`` runs every
    operation in the input dtype, so a bf16 run rounds the state after every step. fp64 inputs with
    the default stay fp64 (the wider of the two is used).

    >>> import torch
    >>> x = random_wkv_inputs(1, 5, 2, 4, dtype=torch.bfloat16, seed=1)
    >>> o, s = wkv_recurrent(*x)
    >>> o.dtype, s.dtype, tuple(s.shape)
    (torch.bfloat16, torch.float32, (1, 2, 4, 4))
    """
    _check_inputs(r, w, k, v, a, b, initial_state)
    if state_dtype is None:
        compute = r.dtype
    else:
        compute = torch.promote_types(state_dtype, r.dtype)
    o, state = _recurrence(r, w, k, v, a, b, initial_state, compute)
    return o.to(r.dtype), state


def wkv_reference(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence with inputs, state, arithmetic and output all in fp64: the yardstick.

    >>> import torch
    >>> o, s = wkv_reference(*random_wkv_inputs(1, 3, 1, 4, dtype=torch.float32, seed=2))
    >>> o.dtype, s.dtype
    (torch.float64, torch.float64)
    """
    _check_inputs(r, w, k, v, a, b, initial_state)
    return _recurrence(r, w, k, v, a, b, initial_state, torch.float64)


def _chunks(x: torch.Tensor, chunk_size: int, padded: int) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, C, L, D], zero-padded to ``padded`` tokens."""
    bsz, seq, heads, dim = x.shape
    if padded != seq:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, padded - seq))
    return x.reshape(bsz, padded // chunk_size, chunk_size, heads, dim).permute(0, 3, 1, 2, 4)


def wkv_chunk(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    initial_state: torch.Tensor | None = None, *, chunk_size: int = 64,
    intermediate_dtype: torch.dtype | None = None, return_chunk_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked-parallel WKV: returns ``(o, final_state)`` or ``(o, final_state, chunk_states)``.

    The intra-chunk matrices of all chunks are built at once; only the state passing loops over
    chunks, so this is the fast, differentiable form used for training. ``T`` need not be a multiple
    of ``chunk_size``: the tail is zero-padded, which leaves the state unchanged (decay 1, no input).

    ``intermediate_dtype=None``: every intermediate in fp32 (fp64 for fp64 inputs); ``o`` in the input
    dtype, the final state in that compute dtype.

    ``intermediate_dtype=<low dtype>`` (e.g. the bf16 input dtype) emulates FLA 0.6.0's Triton chunk
    path (``chunk_dplr_delta_rule``): cumulative decays, exponentials and every accumulation stay in
    fp32, but these tensors are rounded to the low dtype where FLA stores them so: the decayed
    ``r e^{Γ}``, ``k e^{Γ_L-Γ}``, ``a e^{Γ_{i-1}}``, ``b e^{Γ_L-Γ}`` and the factors of the intra-chunk
    products (when the low dtype's range can hold them: fp16's cannot at chunk 64, so there they stay
    fp32 — FLA avoids the overflow with sub-chunk gating); ``A_qk`` and ``A_qb`` (``A_ab``, ``A_ak`` stay fp32 as in FLA); the inverse
    ``(I - A_ab)^{-1}`` and the WY factors ``w = T·(a e^{Γ_{i-1}})``, ``u = (T A_ak) V`` built from it;
    the state entering each chunk as it is read for the output and the pseudo-values (the carried
    state itself stays fp32); the pseudo-values X. A "dot product in the low dtype" is modelled as
    operands rounded to it and an fp32 matmul, which is what a tensor-core ``tl.dot`` with fp32
    accumulation computes (up to summation order).

    ``chunk_states`` (``[B, num_chunks, H, N, V]``, compute dtype) holds the state *entering* each
    chunk, i.e. after ``c · chunk_size`` tokens — ``chunk_states[:, 0]`` is the initial state.

    >>> import torch
    >>> x = random_wkv_inputs(2, 50, 2, 8, dtype=torch.float32, seed=3)
    >>> o, s, states = wkv_chunk(*x, chunk_size=16, return_chunk_states=True)
    >>> tuple(o.shape), tuple(states.shape)
    ((2, 50, 2, 8), (2, 4, 2, 8, 8))
    """
    _check_inputs(r, w, k, v, a, b, initial_state)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ParityKitError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    compute = torch.promote_types(torch.float32, r.dtype)
    rnd = _rounding(intermediate_dtype, compute)
    bsz, seq, heads, n = r.shape
    vdim = v.shape[-1]
    num_chunks = max(1, math.ceil(seq / chunk_size))
    padded = num_chunks * chunk_size
    rc, wc, kc, vc, ac, bc = (_chunks(t.to(compute), chunk_size, padded) for t in (r, w, k, v, a, b))
    m = _intra_chunk(rc, wc, kc, vc, ac, bc, intermediate_dtype, rnd)
    state = rc.new_zeros(bsz, heads, n, vdim) if initial_state is None else initial_state.to(compute)
    entering, pseudo = [], []
    for c in range(num_chunks):
        entering.append(state)
        read = rnd(state)
        x_c = rnd(m.wy_u[:, :, c] + m.wy_w[:, :, c] @ read)    # [B, H, L, V]
        pseudo.append(x_c)
        state = (
            state * m.chunk_decay[:, :, c]
            + m.k_decayed[:, :, c].transpose(-1, -2) @ vc[:, :, c]
            + m.b_decayed[:, :, c].transpose(-1, -2) @ x_c
        )
    states_in = torch.stack(entering, dim=2)                 # [B, H, C, N, V]
    x_all = torch.stack(pseudo, dim=2)                      # [B, H, C, L, V]
    o = m.q_decayed @ rnd(states_in) + m.a_qk @ rnd(vc) + m.a_qb @ x_all
    o = o.permute(0, 2, 3, 1, 4).reshape(bsz, padded, heads, vdim)[:, :seq].to(r.dtype)
    if return_chunk_states:
        return o, state, states_in.transpose(1, 2)
    return o, state


def _rounding(intermediate_dtype: torch.dtype | None, compute: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """The rounding of a stored intermediate: none, or to ``intermediate_dtype`` and back to ``compute``."""
    if intermediate_dtype is None:
        return lambda x: x
    if not (isinstance(intermediate_dtype, torch.dtype) and intermediate_dtype.is_floating_point):
        raise ParityKitError(f"intermediate_dtype must be a floating torch.dtype or None; got {intermediate_dtype!r}")
    return lambda x: x.to(intermediate_dtype).to(compute)


@dataclass
class _ChunkMatrices:
    """What every chunk needs, built for all chunks at once (see :func:`wkv_chunk`)."""

    a_qk: torch.Tensor         # [B, H, C, L, L]
    a_qb: torch.Tensor
    wy_w: torch.Tensor         # X = wy_u + wy_w S₀     [B, H, C, L, N]
    wy_u: torch.Tensor         #                        [B, H, C, L, V]
    q_decayed: torch.Tensor    # r ⊙ e^{Γ}
    k_decayed: torch.Tensor    # k ⊙ e^{Γ_L-Γ}
    b_decayed: torch.Tensor    # b ⊙ e^{Γ_L-Γ}
    chunk_decay: torch.Tensor  # [B, H, C, N, 1]


def _intra_chunk(rc: torch.Tensor, wc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, ac: torch.Tensor,
                 bc: torch.Tensor, intermediate_dtype: torch.dtype | None,
                 rnd: Callable[[torch.Tensor], torch.Tensor]) -> _ChunkMatrices:
    compute, length = rc.dtype, rc.shape[-2]
    gamma = wc.cumsum(dim=-2)           # Γ_i, inclusive   [B, H, C, L, N]
    gamma_prev = gamma - wc             # Γ_{i-1}
    gamma_last = gamma[..., -1:, :]     # Γ_L              [B, H, C, 1, N]
    # Factorising e^{Γ_i-Γ_j} = e^{Γ_i-c} e^{c-Γ_j} around the mid-chunk value c keeps both factors
    # representable as long as half a chunk of decay fits in the exponent range.
    centre = gamma[..., length // 2: length // 2 + 1, :]
    with torch.no_grad():
        span = torch.maximum((gamma_prev - centre).abs().amax(), (gamma - centre).abs().amax())
    if float(span) > _EXP_LIMIT[compute]:
        raise ParityKitError(
            f"the log decays w are too large in magnitude for chunk_size={length} in {compute}: half a chunk "
            f"accumulates |Σw| = {float(span):.1f} > {_EXP_LIMIT[compute]:.0f}, which overflows e^x; use a smaller "
            "chunk_size, fp64 inputs, or wkv_recurrent"
        )
    tril = torch.ones(length, length, dtype=torch.bool, device=rc.device).tril()
    strict = tril.clone().fill_diagonal_(False)

    # The centred factors reach e^{±|Σw|/2} (about e^19 at chunk 64), beyond fp16's range (6.5e4);
    # FLA keeps its factors small with sub-chunk gating. Where the low dtype cannot hold them, keep
    # the factors in fp32 and round only the bounded products (A_qk, A_qb), so fp16 stays finite.
    wide_enough = intermediate_dtype is None or torch.finfo(intermediate_dtype).max >= float(torch.exp(span)) * 1e3
    rnd_factor = rnd if wide_enough else (lambda x: x)
    q_centred = rnd_factor(rc * torch.exp(gamma - centre))
    a_centred = rnd_factor(ac * torch.exp(gamma_prev - centre))
    k_centred = rnd_factor(kc * torch.exp(centre - gamma))
    b_centred = rnd_factor(bc * torch.exp(centre - gamma))
    # [B, H, C, L, N] @ [B, H, C, N, L] -> [B, H, C, L, L]
    a_qk = rnd((q_centred @ k_centred.transpose(-1, -2)).masked_fill(~tril, 0))
    a_qb = rnd((q_centred @ b_centred.transpose(-1, -2)).masked_fill(~tril, 0))
    a_ak = (a_centred @ k_centred.transpose(-1, -2)).masked_fill(~strict, 0)
    a_ab = (a_centred @ b_centred.transpose(-1, -2)).masked_fill(~strict, 0)
    a_decayed = rnd(ac * torch.exp(gamma_prev))             # a ⊙ e^{Γ_{i-1}}

    eye = torch.eye(length, dtype=compute, device=rc.device)
    # T = (I - A_ab)^{-1}, unit lower triangular: a triangular solve is forward substitution.
    inverse = torch.linalg.solve_triangular(eye - a_ab, eye.expand_as(a_ab), upper=False, unitriangular=True)
    if intermediate_dtype is None:
        wy_w = inverse @ a_decayed
        wy_u = inverse @ (a_ak @ vc)
    else:
        wy_w = rnd(rnd(inverse) @ a_decayed)
        wy_u = rnd(rnd(inverse @ a_ak) @ rnd(vc))
    return _ChunkMatrices(
        a_qk=a_qk, a_qb=a_qb, wy_w=wy_w, wy_u=wy_u,
        q_decayed=rnd(rc * torch.exp(gamma)),
        k_decayed=rnd(kc * torch.exp(gamma_last - gamma)),
        b_decayed=rnd(bc * torch.exp(gamma_last - gamma)),
        chunk_decay=torch.exp(gamma_last).transpose(-1, -2),
    )


def random_wkv_inputs(
    batch: int, seq_len: int, heads: int, head_dim: int, *, dtype: torch.dtype = torch.float32,
    seed: int = 0, device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model-like random ``(r, w, k, v, a, b)``: decays in RWKV-7's range, ``a = -kk``, ``b = kk·rate``.

    ``w = -e^{-0.5} σ(z)`` as in the model, ``kk`` unit-norm per head, in-context rate in (0, 1).
    Drawn in fp64 from ``seed`` and rounded once to ``dtype``.

    >>> r, w, k, v, a, b = random_wkv_inputs(1, 4, 2, 8)
    >>> bool((w < 0).all() and (w > -0.61).all())
    True
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, seq_len, heads, head_dim)

    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    r, k, v = randn(), randn(), randn()
    w = -math.exp(-0.5) * torch.sigmoid(randn() * 2.0)
    kk = torch.nn.functional.normalize(randn(), dim=-1)
    rate = torch.sigmoid(randn())
    return tuple(t.to(dtype=dtype, device=device) for t in (r, w, k, v, -kk, kk * rate))  # type: ignore[return-value]
