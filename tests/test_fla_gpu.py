"""Our RWKV-7 against the real flash-linear-attention kernels: runs only where fla and CUDA exist."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("fla") is None,
    reason="needs a CUDA GPU and flash-linear-attention (pip install flash-linear-attention==0.6.0)",
)


def rel_rms(ref, x):
    ref, x = ref.double(), x.double()
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def test_fla_model_loads_our_state_dict_and_agrees():
    from fla.models import RWKV7Config as FlaConfig
    from fla.models import RWKV7ForCausalLM as FlaModel

    from parity_kit.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    kw = dict(hidden_size=128, num_hidden_layers=2, head_dim=64, vocab_size=300, decay_low_rank_dim=32,
              gate_low_rank_dim=32, a_low_rank_dim=32, v_low_rank_dim=32, intermediate_size=256)
    ours = RWKV7ForCausalLM(RWKV7Config(**kw, wkv_mode="recurrent"))
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = ours.cuda().eval()
    fla = FlaModel(FlaConfig(**kw, fuse_norm=False, tie_word_embeddings=False)).cuda().float().eval()
    fla.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, 300, (2, 40), device="cuda")
    with torch.no_grad():
        assert rel_rms(ours(ids, use_cache=False).logits, fla(ids, use_cache=False).logits) <= 1e-3


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 2e-3), (torch.bfloat16, 5e-2)])
def test_fla_kernels_against_fp64_reference(dtype, bound):
    from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7

    from parity_kit.models.wkv import random_wkv_inputs, wkv_reference

    x = random_wkv_inputs(1, 256, 4, 64, dtype=dtype, seed=0, device="cuda")
    ref_o, ref_s = wkv_reference(*x)
    o, s = fused_recurrent_rwkv7(*x, scale=1.0, output_final_state=True)
    assert rel_rms(ref_o, o) <= bound and rel_rms(ref_s, s) <= bound
    o, s = chunk_rwkv7(*x, scale=1.0, output_final_state=True, safe_gate=True,
                       lower_bound=-0.6065306597126334, chunk_size=64)
    assert rel_rms(ref_o, o) <= 4 * bound and rel_rms(ref_s, s) <= 4 * bound
