"""Models larger than one GPU: build a random model across devices, for trying capture and comparison at scale.

``record`` and ``compare`` need nothing special for a model dispatched by accelerate
(``device_map="auto"`` / ``dispatch_model``): accelerate wraps each module's ``forward`` to move its
inputs to the module's execution device, and PyTorch forward hooks run around that wrapper, so each
captured output lives on the GPU that produced it. ``record(..., device="cuda:0")`` gathers tensors
to one GPU, ``mode="stats"`` reduces them on their own GPUs, and ``compare(..., device=...)`` reduces
every pair on the chosen device.

What this module adds is a way to get such a model without weights on disk: build it on the meta
device, plan the split with accelerate, and fill each parameter with random values directly on the
GPU that will hold it (nothing is initialised on the CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .dtypes import DtypeLike, parse_dtype
from .errors import ParityKitError


def _device_for(name: str, device_map: dict[str, Any]) -> torch.device:
    parts = name.split(".")
    for cut in range(len(parts), -1, -1):
        key = ".".join(parts[:cut])
        if key in device_map:
            value = device_map[key]
            return torch.device(f"cuda:{value}" if isinstance(value, int) else value)
    raise ParityKitError(f"device_map has no entry covering {name!r}; pass a map from infer_auto_device_map")


def materialize_random(model: nn.Module, device_map: dict[str, Any], *, dtype: DtypeLike = "bf16",
                       std: float = 0.02, seed: int = 0) -> nn.Module:
    """Replace the meta tensors of ``model`` by random ones on the devices ``device_map`` assigns.

    Matrices and embeddings get N(0, ``std``), one-dimensional weights (norms) 1, biases 0. Rotary
    embedding modules (transformers' ``*RotaryEmbedding``, whose buffers are computed, not loaded) are
    rebuilt on their device. Any other meta buffer raises ParityKitError.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                   num_attention_heads=2, num_key_value_heads=2)
    >>> with torch.device("meta"):
    ...     m = LlamaForCausalLM(cfg)
    >>> m = materialize_random(m, {"": "cpu"}, dtype="fp32")
    >>> m.lm_head.weight.device.type, bool(m(torch.tensor([[1, 2]])).logits.isfinite().all())
    ('cpu', True)
    """
    target = parse_dtype(dtype)
    generators: dict[torch.device, torch.Generator] = {}
    for module_name, module in model.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{pname}" if module_name else pname
            device = _device_for(full, device_map)
            if device not in generators:
                generators[device] = torch.Generator(device).manual_seed(seed + len(generators))
            data = torch.empty(param.shape, dtype=target, device=device)
            if param.dim() >= 2:
                data.normal_(0.0, std, generator=generators[device])
            elif pname == "bias":
                data.zero_()
            else:
                data.fill_(1.0)
            module._parameters[pname] = nn.Parameter(data, requires_grad=False)
        meta_buffers = [b for b, t in module.named_buffers(recurse=False) if t is not None and t.is_meta]
        if not meta_buffers:
            continue
        device = _device_for(f"{module_name}.{meta_buffers[0]}" if module_name else meta_buffers[0], device_map)
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config"):
            with device:  # its buffers are computed in __init__; compute them where they will live
                fresh = type(module)(module.config)
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)
        else:
            raise ParityKitError(
                f"module {module_name!r} has buffers {meta_buffers} on the meta device that cannot be "
                "recomputed; materialise it yourself (e.g. load its weights) before dispatching"
            )
    return model


def random_dispatched(model: nn.Module, max_memory: dict[Any, int | str], *, dtype: DtypeLike = "bf16",
                      no_split_module_classes: list[str] | None = None, std: float = 0.02,
                      seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Split a meta-device ``model`` over devices with accelerate, fill it with random weights in place,
    and attach accelerate's device hooks. Returns ``(model, device_map)``.

    ``max_memory`` is accelerate's per-device cap, e.g. ``{0: "120GiB", 1: "120GiB"}``.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                   num_attention_heads=2, num_key_value_heads=2)
    >>> with torch.device("meta"):
    ...     m = LlamaForCausalLM(cfg)
    >>> m, plan = random_dispatched(m, {"cpu": "1GiB"}, dtype="fp32")
    >>> dict(plan)
    {'': 'cpu'}
    """
    from accelerate import dispatch_model, infer_auto_device_map

    target = parse_dtype(dtype)
    device_map = infer_auto_device_map(model, max_memory=max_memory, dtype=target,
                                       no_split_module_classes=no_split_module_classes or [])
    if any(v in ("disk", "meta") for v in device_map.values()):
        raise ParityKitError(f"the model does not fit in max_memory={max_memory} (device map {device_map}); "
                             "raise the caps or use more devices")
    materialize_random(model, device_map, dtype=target, std=std, seed=seed)
    model.eval()
    return dispatch_model(model, device_map=device_map), device_map
