"""InternLM2 with the real checkpoint's parameter names and config fields, written for transformers 5.

The module names (``model.tok_embeddings``, ``model.layers.{i}.attention.wqkv`` ...) and the numerics that
matter for parity work follow the InternLM2 remote modeling code of January 2024:

- ``wqkv`` is one fused projection whose rows are grouped per KV head: ``[q_(h,0) .. q_(h,G-1), k_h, v_h]``;
- "eager" attention materialises ``QK^T`` in the activation dtype, runs the softmax in fp32 and rounds the
  probabilities back to the activation dtype before ``P·V`` (the original's default);
- rotary cos/sin tables are computed once in fp32 and *stored* in the default dtype, so a model loaded in fp16
  uses fp16 tables. ``config.rotary_fp32_every_forward=True`` switches to what current Llama does instead:
  cos/sin computed in fp32 on every forward and rounded to the activation dtype.

Importing this module registers the classes with ``AutoConfig`` / ``AutoModelForCausalLM``, so a saved folder
loads by path.

>>> import torch
>>> from parity_kit.models.internlm2 import InternLM2Config, InternLM2ForCausalLM
>>> config = InternLM2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
>>> model = InternLM2ForCausalLM(config)
>>> model.config._attn_implementation
'eager'
>>> model(torch.tensor([[1, 2, 3]])).logits.shape
torch.Size([1, 3, 32])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..errors import ParityKitError
from .cache_compat import CACHE_FIELD, refuse_unknown_kwargs, resolve_cache

_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
_MODEL_ARGUMENTS = ("input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds", "use_cache",
                    "output_hidden_states", "past_key_values")
_CAUSAL_LM_ARGUMENTS = (*_MODEL_ARGUMENTS, "labels", "logits_to_keep")
_ROPE_SCALING_TYPES = ("linear", "dynamic")


class InternLM2Config(PretrainedConfig):
    """Configuration of InternLM2; field names and defaults follow the original ``InternLM2Config``.

    ``attn_implementation`` ("eager" by default, like the original) is written to ``config.json``.
    ``rotary_fp32_every_forward`` is parity_kit's own switch (see the module docstring).

    >>> config = InternLM2Config(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, bias=False,
    ...                          rope_scaling={"type": "dynamic", "factor": 2.0})
    >>> config.model_type, config.head_dim, config.attn_implementation
    ('internlm2', 8, 'eager')
    """

    model_type = "internlm2"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 103168
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    bias: bool = True
    rope_theta: float = 10000.0
    # A plain class default: it also hides transformers' deprecated ``rope_scaling`` property.
    rope_scaling: dict[str, Any] | None = None
    rotary_fp32_every_forward: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ParityKitError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; choose sizes where head_dim = hidden_size / num_attention_heads is whole"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ParityKitError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by num_key_value_heads "
                f"{self.num_key_value_heads}; grouped-query attention needs a whole number of query heads per KV head"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in _ROPE_SCALING_TYPES or not float(self.rope_scaling.get("factor", 0)) >= 1.0:
                raise ParityKitError(
                    f"rope_scaling {self.rope_scaling!r} is not supported; use None or "
                    '{"type": "dynamic" | "linear", "factor": >= 1.0}'
                )
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def attn_implementation(self) -> str:
        """The attention implementation in use ("eager" unless set), as the original config names it."""
        return self._attn_implementation or "eager"

    @attn_implementation.setter
    def attn_implementation(self, value: str | None) -> None:
        self._attn_implementation = value

    def to_dict(self) -> dict[str, Any]:
        # transformers keeps the attention implementation out of config.json; the real InternLM2 config has it.
        output = super().to_dict()
        output["attn_implementation"] = self.attn_implementation
        return output


class InternLM2RMSNorm(nn.Module):
    """RMSNorm with fp32 statistics, cast back to the input dtype before the weight (as Llama's)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class InternLM2RotaryEmbedding(nn.Module):
    """cos/sin for rotary position embedding, cached at init or computed in fp32 on every forward.

    Dynamic NTK scaling changes the base only for sequences longer than ``max_position_embeddings``.
    """

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        self.config = config
        self.dim = config.head_dim
        self.max_position_embeddings = config.max_position_embeddings
        scaling = config.rope_scaling or {}
        self.scaling_type: str | None = scaling.get("type", scaling.get("rope_type"))
        self.scaling_factor = float(scaling.get("factor", 1.0))
        self.fp32_every_forward = config.rotary_fp32_every_forward
        cos, sin = self.tables(self.max_position_embeddings)
        # Non-persistent: the real checkpoint has no rotary tensors; stored in the default dtype like the original.
        self.register_buffer("cos_cached", cos.to(torch.get_default_dtype()), persistent=False)
        self.register_buffer("sin_cached", sin.to(torch.get_default_dtype()), persistent=False)

    def inv_freq(self, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
        """Inverse frequencies in fp32 for a sequence of ``seq_len`` positions (NTK-scaled when dynamic and long)."""
        base = self.config.rope_theta
        if self.scaling_type == "dynamic" and seq_len > self.max_position_embeddings:
            growth = self.scaling_factor * seq_len / self.max_position_embeddings - (self.scaling_factor - 1)
            base = base * growth ** (self.dim / (self.dim - 2))
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        return 1.0 / (base**exponents)

    def tables(self, seq_len: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and sin for positions ``0 .. seq_len-1``, each ``[seq_len, head_dim]``."""
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        if self.scaling_type == "linear":
            positions = positions / self.scaling_factor
        freqs = torch.outer(positions, self.inv_freq(seq_len, device))  # [seq_len, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [seq_len, head_dim]
        return emb.cos(), emb.sin()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape ``[batch, seq, head_dim]`` in ``x.dtype`` for ``position_ids`` ``[batch, seq]``."""
        seq_len = int(position_ids.max()) + 1
        if self.fp32_every_forward:
            inv_freq = self.inv_freq(max(seq_len, self.max_position_embeddings), x.device)
            positions = position_ids.float()
            if self.scaling_type == "linear":
                positions = positions / self.scaling_factor
            freqs = positions[..., None] * inv_freq  # [batch, seq, head_dim / 2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [batch, seq, head_dim]
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        if seq_len > self.cos_cached.shape[0]:
            # Grow like the original: recompute for the longer length, stored in the tables' current dtype.
            cos, sin = self.tables(seq_len, x.device)
            self.cos_cached = cos.to(self.cos_cached.dtype)
            self.sin_cached = sin.to(self.sin_cached.dtype)
        return self.cos_cached[position_ids].to(x.dtype), self.sin_cached[position_ids].to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """``[batch, kv_heads, seq, d]`` → ``[batch, kv_heads * groups, seq, d]``: query head i uses KV head i // G."""
    if groups == 1:
        return states
    batch, kv_heads, seq, head_dim = states.shape
    states = states[:, :, None].expand(batch, kv_heads, groups, seq, head_dim)
    return states.reshape(batch, kv_heads * groups, seq, head_dim)


class InternLM2Attention(nn.Module):
    """Grouped-query attention with the fused ``wqkv``; "eager" or "sdpa" as ``config._attn_implementation`` says."""

    def __init__(self, config: InternLM2Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.head_dim
        self.wqkv = nn.Linear(
            config.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim, bias=config.bias
        )
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        causal_only: bool,
    ) -> torch.Tensor:
        """``attention_mask``: boolean ``[batch, 1, q_len, kv_len]`` or None; ``causal_only``: no padding in it."""
        batch, q_len, _ = hidden_states.shape
        groups = self.num_key_value_groups
        qkv = self.wqkv(hidden_states)  # [batch, q_len, kv_heads * (groups + 2) * head_dim]
        qkv = qkv.view(batch, q_len, self.num_key_value_heads, groups + 2, self.head_dim)
        query = qkv[..., :groups, :].reshape(batch, q_len, self.num_heads, self.head_dim)  # heads ordered (kv, g)
        key = qkv[..., groups, :]  # [batch, q_len, kv_heads, head_dim]
        value = qkv[..., groups + 1, :]
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # [batch, heads, q_len, head_dim]

        cos, sin = (t.unsqueeze(1) for t in position_embeddings)  # [batch, 1, q_len, head_dim]
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)  # [batch, kv_heads, kv_len, head_dim]
        key = _repeat_kv(key, groups)
        value = _repeat_kv(value, groups)

        implementation = self.config._attn_implementation or "eager"
        if implementation == "eager":
            scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(self.head_dim)  # [b, h, q_len, kv_len]
            if attention_mask is not None:
                scores = scores + _additive_mask(attention_mask, scores.dtype)
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
            output = torch.matmul(probs, value)  # [batch, heads, q_len, head_dim]
        elif implementation == "sdpa":
            # Without padding and cache, let SDPA pick its fused causal kernels (as Llama's SDPA path does).
            plain_causal = causal_only and q_len == key.shape[2]
            output = F.scaled_dot_product_attention(
                query, key, value,
                attn_mask=None if plain_causal else attention_mask,
                is_causal=plain_causal and q_len > 1,
            )
        else:
            raise ParityKitError(
                f"attention implementation {implementation!r} is not available for InternLM2; "
                f"use one of {_ATTENTION_IMPLEMENTATIONS} (attn_implementation= in from_pretrained)"
            )
        output = output.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)
        return self.wo(output)


class InternLM2MLP(nn.Module):
    """SwiGLU feed-forward: ``w2(act(w1 x) * w3 x)`` (w1 gate, w3 up, w2 down)."""

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config: InternLM2Config, layer_idx: int) -> None:
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        causal_only: bool,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attention(
            self.attention_norm(hidden_states), position_embeddings, attention_mask, past_key_values, causal_only
        )
        return hidden_states + self.feed_forward(self.ffn_norm(hidden_states))


def _allowed_positions(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, past_len: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """Boolean ``[batch, 1, q_len, kv_len]`` (True = may attend) and whether it is plain causal (no padding).

    ``attention_mask`` is the 2D padding mask ``[batch, past_len + q_len]`` (1 = token, 0 = padding). The mask is
    None for a single unpadded query (it may see everything). A padded query position may always see itself, so
    no softmax row is empty (no NaN); its output is never used by real tokens.
    """
    kv_len = past_len + q_len
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if not has_padding and q_len == 1:
        return None, True
    query_pos = torch.arange(past_len, kv_len, device=device)[:, None]  # [q_len, 1]
    key_pos = torch.arange(kv_len, device=device)[None, :]  # [1, kv_len]
    allowed = (key_pos <= query_pos)[None, None].expand(batch, 1, q_len, kv_len)  # [batch, 1, q_len, kv_len]
    if has_padding:
        if attention_mask.shape != (batch, kv_len):
            raise ParityKitError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, kv_len)} "
                "(batch, past + new tokens); pass the 2D padding mask of the whole sequence so far"
            )
        allowed = allowed & attention_mask.bool()[:, None, None, :]
        allowed = allowed | (key_pos == query_pos)[None, None]
    return allowed, not has_padding


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    config: InternLM2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["InternLM2DecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # The attention reads config._attn_implementation on every call, so switching takes effect at once.
        return True

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        # The original defaults to eager; transformers would pick sdpa for an unset implementation.
        return super().get_correct_attn_implementation(requested_attention or "eager", is_init_check)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, InternLM2RotaryEmbedding):
            # transformers 5 builds models on the meta device: the non-persistent tables must be recomputed here.
            cos, sin = module.tables(module.cos_cached.shape[0])
            init.copy_(module.cos_cached, cos)
            init.copy_(module.sin_cached, sin)
        else:
            super()._init_weights(module)


class InternLM2Model(InternLM2PreTrainedModel):
    def __init__(self, config: InternLM2Config) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = InternLM2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # One shared rotary module (the original had one per layer, with identical tables).
        self.rotary_emb = InternLM2RotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """``cache`` and ``past_key_values`` are one argument under its new and old name (transformers 5.24)."""
        refuse_unknown_kwargs(kwargs, type(self).__name__, _MODEL_ARGUMENTS)
        past_key_values = resolve_cache(cache, past_key_values, type(self).__name__)
        if (input_ids is None) == (inputs_embeds is None):
            raise ParityKitError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        batch, q_len, _ = inputs_embeds.shape
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + q_len, device=inputs_embeds.device)[None]
        position_ids = position_ids.expand(batch, q_len)
        allowed, causal_only = _allowed_positions(attention_mask, batch, q_len, past_len, inputs_embeds.device)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            hidden_states = layer(hidden_states, position_embeddings, allowed, past_key_values, causal_only)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            **{CACHE_FIELD: past_key_values if use_cache else None},
        )


class InternLM2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    """InternLM2 language model: ``model`` (the decoder) and ``output`` (the lm head).

    >>> import torch
    >>> config = InternLM2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    >>> model = InternLM2ForCausalLM(config).eval()
    >>> model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False).shape
    torch.Size([1, 5])
    """

    _tied_weights_keys = {"output.weight": "model.tok_embeddings.weight"}

    def __init__(self, config: InternLM2Config) -> None:
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.output

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.output = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """``cache`` and ``past_key_values`` are one argument under its new and old name (transformers 5.24)."""
        refuse_unknown_kwargs(kwargs, type(self).__name__, _CAUSAL_LM_ARGUMENTS)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache(cache, past_key_values, type(self).__name__),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.output(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


AutoConfig.register("internlm2", InternLM2Config, exist_ok=True)
AutoModelForCausalLM.register(InternLM2Config, InternLM2ForCausalLM, exist_ok=True)
