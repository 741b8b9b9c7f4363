"""The three GroupNorm treatments of RWKV-7 (rwkv7_norm): original upcast, native kernel, element-wise port."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import parity_kit as pk
from parity_kit.errors import ParityKitError
from parity_kit.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
from parity_kit.models.rwkv7_convert import convert_rwkv7_to_fla, write_blinkdl_checkpoint
from parity_kit.models.rwkv7_norm import GROUPNORM_VARIANTS, RWKV7GroupNorm, elementwise_group_norm, groupnorm_variant


def rel_rms(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def inputs_like_ln_x(rows: int = 64, channels: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, channels, generator=g, dtype=torch.float64) * 30


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_elementwise_equals_group_norm_in_high_precision(dtype):
    x = inputs_like_ln_x().to(dtype)
    w, b = torch.rand(256, dtype=dtype) + 0.5, torch.randn(256, dtype=dtype) * 0.1
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel_rms(F.group_norm(x, 4, w, b, 64e-5), elementwise_group_norm(x, 4, w, b, 64e-5)) < tol


def test_elementwise_rounds_more_than_the_fused_kernel_in_bf16():
    """The element-wise port rounds every intermediate: its error is larger than the fused kernel's (which
    rounds once), and both are larger than rounding the exact result once."""
    x64 = inputs_like_ln_x()
    w, b = torch.rand(256, dtype=torch.float64) + 0.5, torch.randn(256, dtype=torch.float64) * 0.1
    exact = F.group_norm(x64, 4, w, b, 64e-5)
    x, wb, bb = x64.bfloat16(), w.bfloat16(), b.bfloat16()
    once = rel_rms(exact, exact.bfloat16())
    native = rel_rms(exact, F.group_norm(x, 4, wb, bb, 64e-5))
    elementwise = rel_rms(exact, elementwise_group_norm(x, 4, wb, bb, 64e-5))
    assert once < native < elementwise < 10 * once


def test_modes_and_errors():
    x = inputs_like_ln_x(8, 32).float()
    gn = RWKV7GroupNorm(2, 32, eps=1e-5, impl="elementwise")
    assert "impl='elementwise'" in repr(gn)
    assert torch.allclose(gn(x), F.group_norm(x, 2, gn.weight, gn.bias, 1e-5), atol=1e-5)
    with pytest.raises(ParityKitError, match="gn_impl"):
        RWKV7GroupNorm(2, 32, eps=1e-5, impl="fast")
    with pytest.raises(ParityKitError, match="gn_impl"):
        RWKV7Config(hidden_size=32, head_dim=16, gn_impl="fast")
    with pytest.raises(ParityKitError, match="multiple"):
        elementwise_group_norm(torch.zeros(2, 5), 2, torch.ones(5), torch.zeros(5), 1e-5)
    with pytest.raises(ParityKitError, match="unknown GroupNorm variant"):
        groupnorm_variant("as-converted")
    assert set(GROUPNORM_VARIANTS) == {"as converted", "fixed", "native"}


def test_load_options_give_each_variant_its_weights_and_arithmetic():
    ref, _ = pk.models.load("tiny-rwkv7", dtype="fp32")
    fixed, _ = pk.models.load("tiny-rwkv7", dtype="bf16", **groupnorm_variant("fixed"))
    converted, _ = pk.models.load("tiny-rwkv7", dtype="bf16", **groupnorm_variant("as converted"))
    name = "model.layers.2.attn.g_norm"
    exact = ref.get_submodule(name).weight
    assert fixed.get_submodule(name).weight.dtype == torch.float32
    assert torch.equal(fixed.get_submodule(name).weight, exact)
    assert converted.get_submodule(name).weight.dtype == torch.bfloat16
    assert converted.get_submodule(name).impl == "elementwise" and not converted.get_submodule(name).fp32
    assert fixed.get_submodule("model.layers.2.attn.r_proj").weight.dtype == torch.bfloat16
    ids = torch.tensor([[0, 5, 9, 11, 30, 2, 7, 8]])
    with torch.no_grad():
        outs = [m(ids, use_cache=False).logits for m in (fixed, converted)]
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o).all() for o in outs)
    assert not torch.equal(*outs)


def test_converter_writes_each_groupnorm_treatment(tmp_path):
    torch.manual_seed(0)
    cfg = RWKV7Config(hidden_size=32, num_hidden_layers=2, head_dim=16, vocab_size=20, decay_low_rank_dim=8,
                      gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8)
    source = RWKV7ForCausalLM(cfg).eval()
    pth = write_blinkdl_checkpoint(source, tmp_path / "m.pth")
    loaded = {}
    for variant in ("as converted", "fixed"):
        out = convert_rwkv7_to_fla(pth, tmp_path / variant.replace(" ", "_"), dtype="bf16", groupnorm=variant)
        loaded[variant] = RWKV7ForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    gn = "model.layers.1.attn.g_norm"
    assert loaded["as converted"].get_submodule(gn).weight.dtype == torch.bfloat16
    assert loaded["as converted"].config.gn_impl == "elementwise"
    assert loaded["fixed"].get_submodule(gn).weight.dtype == torch.float32
    assert torch.equal(loaded["fixed"].get_submodule(gn).weight, source.get_submodule(gn).weight)
    assert loaded["fixed"].config.gn_fp32 is True
