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


def vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the model's input embedding (``get_input_embeddings``), else ``config.vocab_size``, else None."""
    if isinstance(model, nn.Embedding):
        return model.num_embeddings
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        rows = getattr(emb, "num_embeddings", None)
        if isinstance(rows, int):
            return rows
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def check_token_ids(models: list[nn.Module], inputs: Any, what: str = "inputs") -> None:
    """ParityKitError when token ids in ``inputs`` (an integer tensor, a list of ints, or ``input_ids`` of a dict or
    the first positional argument) fall outside a model's vocabulary; the embedding would raise IndexError.

    >>> from torch import nn
    >>> check_token_ids([nn.Embedding(8, 2)], torch.tensor([[1, 9]]))  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    parity_kit.errors.ParityKitError: inputs: token id 9 is outside the vocabulary of Embedding ...
    """
    ids = inputs
    if isinstance(ids, Mapping):
        ids = ids.get("input_ids")
    elif isinstance(ids, tuple) and ids:
        ids = ids[0]
    if isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        ids = torch.tensor(ids)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        return
    if not ids.numel():
        raise ParityKitError(f"{what} hold no token (token ids of shape {tuple(ids.shape)}); pass at least one token")
    low, high = int(ids.min()), int(ids.max())
    for model in models:
        size = vocabulary_size(model)
        if size is not None and (low < 0 or high >= size):
            bad = low if low < 0 else high
            raise ParityKitError(
                f"{what}: token id {bad} is outside the vocabulary of {type(model).__name__} (ids 0..{size - 1}); "
                "encode the prompt with this model's tokenizer"
            )
