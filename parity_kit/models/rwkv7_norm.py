"""The GroupNorm over heads of RWKV-7's attention output (``attn.g_norm``; ``ln_x`` in BlinkDL's code), in the
three ways an implementation can compute it in a low-precision model.

- ``fp32=True`` (config ``gn_fp32``): the original's way. The affine weights stay fp32 when the model is cast
  to bf16/fp16 (BlinkDL's runtimes before v7 load ``ln_x`` with ``.float()``: "need fp32 for group_norm"),
  the input is upcast, and the result is rounded to the model dtype once.
- ``fp32=False, impl="native"`` (the default): ``nn.GroupNorm`` in the model dtype. Its weights follow the
  model dtype; PyTorch's CPU and CUDA kernels accumulate the statistics of bf16/fp16 input in fp32 and
  round once at the end.
- ``fp32=False, impl="elementwise"`` (config ``gn_impl``): the normalisation written out as tensor
  operations in the model dtype - mean, centred variance, ``rsqrt(var + eps)``, scale, weight, bias - as a
  port or converter that targets a runtime without a fused GroupNorm writes it. Every intermediate is
  rounded to the model dtype and the weights are the model dtype's: no upcast anywhere ("as converted").

>>> import torch
>>> x = torch.randn(3, 8)
>>> gn = RWKV7GroupNorm(2, 8, eps=1e-5, impl="elementwise")
>>> bool(torch.allclose(gn(x), torch.nn.functional.group_norm(x, 2, gn.weight, gn.bias, 1e-5), atol=1e-5))
True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ParityKitError

__all__ = ["GN_IMPLS", "GROUPNORM_VARIANTS", "RWKV7GroupNorm", "elementwise_group_norm", "groupnorm_variant"]

#: How a GroupNorm that is not upcast computes: the fused kernel, or tensor operations in the model dtype.
GN_IMPLS = ("native", "elementwise")

#: Named GroupNorm treatments as config fields: "as converted" (the report's bug: weights and arithmetic in the
#: model dtype, no upcast), "fixed" (the original's upcast with fp32 weights), "native" (the fused kernel in the
#: model dtype, the built-in models' default). Pass one to ``load(..., **groupnorm_variant(name))`` or to
#: :func:`parity_kit.models.rwkv7_convert.convert_rwkv7_to_fla`.
GROUPNORM_VARIANTS: dict[str, dict[str, Any]] = {
    "as converted": {"gn_fp32": False, "gn_impl": "elementwise"},
    "fixed": {"gn_fp32": True, "gn_impl": "native"},
    "native": {"gn_fp32": False, "gn_impl": "native"},
}


def groupnorm_variant(name: str) -> dict[str, Any]:
    """The config fields of a named GroupNorm treatment (:data:`GROUPNORM_VARIANTS`).

    >>> groupnorm_variant("as converted")
    {'gn_fp32': False, 'gn_impl': 'elementwise'}
    """
    if name not in GROUPNORM_VARIANTS:
        raise ParityKitError(f"unknown GroupNorm variant {name!r}; use one of {list(GROUPNORM_VARIANTS)}")
    return dict(GROUPNORM_VARIANTS[name])


def elementwise_group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float) -> torch.Tensor:
    """GroupNorm of ``x`` [rows, C] as separate tensor operations in ``x``'s dtype (each result rounded to it).

    The centred two-pass variance (not E[x²] − E[x]²), as careful hand-written norms use; reductions are
    PyTorch's (which accumulate internally in fp32 and round the result), every other step rounds.

    >>> x = torch.tensor([[1.0, 3.0, -2.0, 2.0]])
    >>> elementwise_group_norm(x, 2, torch.ones(4), torch.zeros(4), 0.0)
    tensor([[-1.,  1., -1.,  1.]])
    """
    if x.dim() != 2 or x.shape[1] % num_groups:
        raise ParityKitError(f"elementwise_group_norm needs [rows, C] with C a multiple of {num_groups}; "
                             f"got shape {tuple(x.shape)}")
    grouped = x.view(x.shape[0], num_groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    centred = grouped - mean
    var = (centred * centred).mean(-1, keepdim=True)
    normed = (centred * torch.rsqrt(var + eps)).view_as(x)
    return normed * weight.to(x.dtype) + bias.to(x.dtype)


class RWKV7GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` over heads computed one of three ways (module docstring): ``fp32=True`` keeps the
    weights fp32 through ``model.to(bf16)`` and upcasts (the original); otherwise the model dtype, through the
    fused kernel (``impl="native"``) or written out element-wise (``impl="elementwise"``, the converted port)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float, fp32: bool = False,
                 impl: str = "native") -> None:
        super().__init__(num_groups, num_channels, eps=eps, affine=True)
        if impl not in GN_IMPLS:
            raise ParityKitError(f"RWKV7Config.gn_impl must be one of {list(GN_IMPLS)}; got {impl!r}")
        self.fp32 = fp32
        self.impl = impl

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp32={self.fp32}, impl={self.impl!r}"

    def _apply(self, fn: Any, recurse: bool = True) -> RWKV7GroupNorm:
        kept = {name: p.data for name, p in self.named_parameters(recurse=False)} if self.fp32 else {}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            p = getattr(self, name)
            if old.dtype in (torch.float32, torch.float64) and p.dtype not in (torch.float32, torch.float64):
                p.data = old.to(device=p.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float64:
            return super().forward(x)
        if self.fp32:
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                                self.eps).to(x.dtype)
        if self.impl == "elementwise":
            return elementwise_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)
