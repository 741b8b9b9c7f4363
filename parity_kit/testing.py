"""Small models for tests, docs and benchmarks: tiny randomly initialised transformers models built from configs,
a leak check for hooks, and a random model dispatched across several GPUs.

>>> model = tiny_llama(layers=1)
>>> model.config.num_hidden_layers, sum(sum(c) for c in hook_counts(model).values())
(1, 0)

Models larger than one GPU (:func:`random_dispatched`): ``record`` and ``compare`` need nothing special for a
model dispatched by accelerate (``device_map="auto"`` / ``dispatch_model``): accelerate wraps each module's
``forward`` to move its inputs to the module's execution device, and PyTorch forward hooks run around that
wrapper, so each captured output lives on the GPU that produced it. ``record(..., device="cuda:0")`` gathers
tensors to one GPU, ``mode="stats"`` reduces them on their own GPUs, and ``compare(..., device=...)`` reduces
every pair on the chosen device. What this module adds is a way to get such a model without weights on disk:
build it on the meta device, plan the split with accelerate, and fill each parameter with random values
directly on the GPU that will hold it (nothing is initialised on the CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .dtypes import DtypeLike, parse_dtype
from .errors import ParityKitError


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2, *, vocab_size: int = 64,
               hidden_size: int = 32, intermediate_size: int = 64, heads: int = 4, kv_heads: int = 2,
               max_position_embeddings: int = 64, **config: Any) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (grouped-query attention), in eval mode, weights from ``seed``.

    Ids 0/1/2 are pad/BOS/EOS. ``config`` overrides any other ``LlamaConfig`` field.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_position_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config})).to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A randomly initialised two-layer ``GPT2LMHeadModel`` in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    """A randomly initialised two-layer ``BertModel`` in eval mode (an encoder: no causal mask, no lm head)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    return BertModel(config).eval()


def hook_counts(model: nn.Module) -> dict[str, tuple[int, int, int, int]]:
    """Per module: forward, forward-pre and kwargs hooks and whether ``forward`` is an instance attribute (a
    capture wrapper); under ``"<global>"`` torch's process-wide hooks. Equal before and after a block proves
    that the block removed exactly what it added."""
    from torch.nn.modules import module as torch_module

    counts = {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_with_kwargs),
                     int("forward" in m.__dict__))
              for name, m in model.named_modules()}
    counts["<global>"] = (len(torch_module._global_forward_hooks), len(torch_module._global_forward_pre_hooks),
                          len(torch_module._global_forward_hooks_with_kwargs), 0)
    return counts


class NaiveNorm(nn.Module):
    """Normalisation with the textbook variance E[x²] − E[x]²: over a near-constant input the two terms
    nearly cancel, so in bf16 the variance is mostly rounding error (a planted precision culprit)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = (x * x).mean(-1, keepdim=True) - mean * mean
        return (x - mean) * torch.rsqrt(var.clamp_min(1e-5)) * self.weight


def precision_sensitive_mlp(culprits: tuple[int, ...] = (3,), blocks: int = 6, d: int = 32) -> nn.Sequential:
    """Linear → [Linear → norm → GELU] × blocks → Linear; block i in ``culprits`` feeds a :class:`NaiveNorm` a
    near-constant input (bias 40, small spread), the others use LayerNorm on well-scaled inputs.

    >>> sorted(n for n, m in precision_sensitive_mlp().named_modules() if isinstance(m, NaiveNorm))
    ['11']
    """
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(16, d)]
    for i in range(blocks):
        lin = nn.Linear(d, d)
        if i in culprits:
            with torch.no_grad():
                lin.bias.fill_(40.0)
                lin.weight.mul_(4.0)
        layers += [lin, NaiveNorm(d) if i in culprits else nn.LayerNorm(d), nn.GELU()]
    layers.append(nn.Linear(d, 8))
    return nn.Sequential(*layers).eval()


def stats_close(a: Any, b: Any, rel: float = 1e-5, abs_: float = 1e-6) -> list[str]:
    """The fields in which two :class:`~parity_kit.TensorStats` differ beyond ``rel``/``abs_`` (NaN equals NaN);
    empty when they agree."""
    import math

    bad = [name for name in ("shape", "dtype", "nan", "inf") if getattr(a, name) != getattr(b, name)]
    for name in ("min", "max", "mean", "rms", "absmax"):
        x, y = getattr(a, name), getattr(b, name)
        if not ((math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=rel, abs_tol=abs_)):
            bad.append(name)
    if (a.per_token_rms is None) != (b.per_token_rms is None):
        bad.append("per_token_rms")
    elif a.per_token_rms is not None and not (
            a.per_token_rms.dtype == torch.float32 and a.per_token_rms.shape == b.per_token_rms.shape
            and torch.allclose(a.per_token_rms, b.per_token_rms, rtol=rel, atol=abs_, equal_nan=True)):
        bad.append("per_token_rms")
    return bad


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


# ------------------------------------------------------------------------------------------------------------
# planted one-module faults: what a calibrated verdict must name (tests/test_calibration.py)
# ------------------------------------------------------------------------------------------------------------

#: Faults :func:`plant_fault` puts into one layer of a Llama-style ``*ForCausalLM`` (model.model.layers[i]).
LLAMA_FAULTS = ("rms_norm_eps", "weight_perturbed", "heads_swapped", "activation_swapped")


def plant_fault(model: nn.Module, fault: str, layer: int = 1, *, seed: int = 0) -> str:
    """Change one module of layer ``layer`` in place and return its name:

    - ``rms_norm_eps``: the input norm's epsilon ×10 (1e-6 → 1e-5, a config copied from another checkpoint);
      randomly initialised models carry small activations (mean square ~4e-4), so this moves the norm by ~1%;
    - ``weight_perturbed``: the MLP's down projection multiplied by ``1 + 1e-2·N(0, 1)`` (1e-2 relative);
    - ``heads_swapped``: the query projection's rows of heads 0 and 1 exchanged (a head permutation gone wrong
      in a conversion);
    - ``activation_swapped``: the MLP's SiLU replaced by GELU.

    >>> model = tiny_llama(layers=2)
    >>> plant_fault(model, "activation_swapped")
    'model.layers.1.mlp.act_fn'
    """
    block = model.model.layers[layer]
    prefix = f"model.layers.{layer}"
    with torch.no_grad():
        if fault == "rms_norm_eps":
            block.input_layernorm.variance_epsilon *= 10
            return f"{prefix}.input_layernorm"
        if fault == "weight_perturbed":
            weight = block.mlp.down_proj.weight
            noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
            weight.mul_(1 + 1e-2 * noise.to(weight.device, weight.dtype))
            return f"{prefix}.mlp.down_proj"
        if fault == "heads_swapped":
            weight = block.self_attn.q_proj.weight
            dim = block.self_attn.head_dim
            first = weight[:dim].clone()
            weight[:dim] = weight[dim:2 * dim]
            weight[dim:2 * dim] = first
            return f"{prefix}.self_attn.q_proj"
        if fault == "activation_swapped":
            block.mlp.act_fn = nn.GELU()
            return f"{prefix}.mlp.act_fn"
    raise ParityKitError(f"fault {fault!r} is not one of {list(LLAMA_FAULTS)}")


class LowPrecisionGroupNorm(nn.GroupNorm):
    """GroupNorm computed without upcast: in ``compute_dtype`` (default: the input's dtype), with the one-pass
    variance E[x²] − E[x]² that fused kernels use. Over inputs with a common offset the two terms nearly cancel,
    so in bf16 the variance is mostly rounding error (a planted precision fault)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__(num_groups, num_channels, eps=eps)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.compute_dtype or x.dtype
        grouped = x.to(low).reshape(x.shape[0], self.num_groups, -1)  # [N, G, C/G]
        mean = grouped.mean(-1, keepdim=True)
        var = ((grouped * grouped).mean(-1, keepdim=True) - mean * mean).clamp_min(0)
        y = ((grouped - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * self.weight.to(low) + self.bias.to(low)).to(x.dtype)


def groupnorm_mlp(blocks: int = 4, d: int = 64, groups: int = 8, offset: float = 8.0, seed: int = 0) -> nn.Sequential:
    """Linear → [Linear → GroupNorm → SiLU] × blocks → Linear, each Linear with bias ``offset`` so every GroupNorm
    sees groups whose mean is several times their spread (as after a biased projection or a ReLU).

    >>> [n for n, m in groupnorm_mlp(blocks=2).named_modules() if isinstance(m, nn.GroupNorm)]
    ['2', '5']
    """
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(16, d)]
    for _ in range(blocks):
        lin = nn.Linear(d, d)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(d, d, generator=gen) / d**0.5)
            lin.bias.fill_(offset)
        layers += [lin, nn.GroupNorm(groups, d), nn.SiLU()]
    layers.append(nn.Linear(d, 8))
    return nn.Sequential(*layers).eval()


def plant_low_precision_groupnorm(model: nn.Sequential, index: int, compute_dtype: torch.dtype | None = None) -> str:
    """Replace the GroupNorm at ``index`` of a :func:`groupnorm_mlp` by a :class:`LowPrecisionGroupNorm` with the
    same weights; returns its name.

    >>> plant_low_precision_groupnorm(groupnorm_mlp(blocks=2), 2, torch.bfloat16)
    '2'
    """
    norm = model[index]
    if not isinstance(norm, nn.GroupNorm):
        raise ParityKitError(f"module {index} is a {type(norm).__name__}, not a GroupNorm")
    fault = LowPrecisionGroupNorm(norm.num_groups, norm.num_channels, norm.eps, compute_dtype)
    fault.load_state_dict(norm.state_dict())
    model[index] = fault.to(norm.weight.device, norm.weight.dtype)
    return str(index)
