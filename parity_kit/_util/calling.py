"""Calling a model the one way the kit does: inputs as a tensor, a tuple of arguments or a dict of keywords.

>>> import torch
>>> from torch import nn
>>> net = nn.Linear(2, 1)
>>> call_model(net, prepare_inputs(net, torch.ones(1, 2, dtype=torch.float64))).dtype
torch.float32
>>> model_device(net), model_dtype(net)
(device(type='cpu'), torch.float32)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ParityKitError
from .trees import cast_floating

#: What the kit passes to a model: ids / a tensor, positional arguments, keyword arguments, or a function
#: that runs the model itself (``lambda m: m.generate(...)``).
Inputs = torch.Tensor | Mapping[str, Any] | tuple | list | Callable[[nn.Module], Any]


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    raise ParityKitError(f"{type(model).__name__} has no floating parameter; pass a model with weights")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def prepare_inputs(model: nn.Module, inputs: Any) -> Any:
    """Floating inputs cast to the model's dtype, so one input set feeds the fp32 and the bf16 model."""
    if callable(inputs) and not isinstance(inputs, torch.Tensor):
        return inputs
    return cast_floating(inputs, model_dtype(model))


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model`` run on ``inputs`` (see :data:`Inputs`)."""
    if callable(inputs) and not isinstance(inputs, torch.Tensor):
        return inputs(model)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def primary_tensor(output: Any, what: str) -> torch.Tensor:
    """The tensor a model's output stands for: itself, its ``logits``, or its first element."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ParityKitError(
        f"cannot find a tensor in the output of {what} ({type(output).__name__}); return a tensor, "
        "a tuple starting with one, or an object with .logits"
    )


#: ``config.model_type`` of recurrent models: a padding token would enter their state, so they take no padding mask.
RECURRENT_MODEL_TYPES = frozenset({"rwkv", "rwkv5", "rwkv6", "rwkv7", "mamba", "mamba2", "retnet", "gla"})


def model_type(model: nn.Module) -> str:
    """``model.config.model_type``, or "" for a model without one."""
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def takes_padding_mask(model: nn.Module) -> bool:
    """Whether ``model`` can run a padded batch: it takes an ``attention_mask`` and is not recurrent.

    >>> from parity_kit.testing import tiny_llama
    >>> takes_padding_mask(tiny_llama(layers=1)), takes_padding_mask(nn.Linear(1, 1))
    (True, False)
    """
    if model_type(model) in RECURRENT_MODEL_TYPES:
        return False
    try:
        return "attention_mask" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
