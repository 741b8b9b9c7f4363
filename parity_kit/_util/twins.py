"""A copy of a model in another dtype, built where it fits.

``copy.deepcopy(model).to(torch.float64)`` needs the model twice on its device before the cast, then the fp64
copy (four times an fp32 model's bytes): next to an fp32 reference and a bf16 candidate of 7B parameters that
is 27 + 13.5 + 27 + 54 GB on one GPU. :func:`twin` copies every parameter and buffer straight into the target
dtype and device (no intermediate copy), and :func:`twin_device` picks the model's own device when the copy fits
in what is free there, the host otherwise.

>>> from torch import nn
>>> net = nn.Linear(3, 2)
>>> copy64 = twin(net, torch.float64)
>>> copy64.weight.dtype, net.weight.dtype, bool(torch.equal(copy64.weight.float(), net.weight))
(torch.float64, torch.float32, True)
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from .calling import model_device

__all__ = ["twin", "twin_device"]

#: Room left on the device beside the copy's weights (activations of one forward, allocator slack).
HEADROOM = 1.25


def copy_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``model``'s floating parameters and buffers in ``dtype`` (others as they are)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size())
               for t in itertools.chain(model.parameters(), model.buffers()))


def twin_device(model: nn.Module, dtype: torch.dtype, copies: int = 1) -> torch.device:
    """The model's device if ``copies`` copies in ``dtype`` fit in its free memory (with :data:`HEADROOM`; more
    than one when the copy will be copied again there, as a rounding-only run does), else the CPU."""
    device = model_device(model)
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if copies * copy_bytes(model, dtype) * HEADROOM <= free else torch.device("cpu")


def twin(model: nn.Module, dtype: torch.dtype, *, weights_in: torch.dtype | None = None,
         device: torch.device | str | None = None) -> nn.Module:
    """A copy of ``model`` computing in ``dtype`` on ``device`` (default :func:`twin_device`), in eval mode.

    Floating parameters are first rounded to ``weights_in`` when it is narrower than theirs (so two twins carry
    one weight rounding); floating buffers (rotary tables) are only cast to ``dtype``, as ``Module.to`` does.
    ``model`` is not touched and no second copy of it is made on its device.
    """
    target = torch.device(device) if device is not None else twin_device(model, dtype)
    memo: dict[int, object] = {}
    with torch.no_grad():
        for p in model.parameters():
            data = p.detach()
            if p.is_floating_point():
                if weights_in is not None and torch.finfo(weights_in).eps > torch.finfo(p.dtype).eps:
                    data = data.to(weights_in)
                data = data.to(device=target, dtype=dtype)
            else:
                data = data.to(target, copy=True)
            memo[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
        for b in model.buffers():
            memo[id(b)] = b.detach().to(device=target, dtype=dtype if b.is_floating_point() else b.dtype, copy=True)
    copied = copy.deepcopy(model, memo)  # the module tree; parameters and buffers come from memo
    return copied.eval()
