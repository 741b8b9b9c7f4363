"""RWKV-7 ("Goose") with flash-linear-attention's parameter names and config, in plain PyTorch.

A state dict moves unchanged between :class:`RWKV7ForCausalLM` and ``fla.models.RWKV7ForCausalLM``
(FLA 0.6.0), so real FLA checkpoints run here on a CPU and our checkpoints run in FLA on a GPU.
The WKV recurrence is its own parameter-free module (``model.layers.{i}.attn.wkv``) so hooks see its
inputs ``(r, w, k, v, a, b, initial_state)`` and outputs ``(o, state)``, and precision tools can
switch its mode: ``config.wkv_mode`` ∈ {"recurrent", "chunk", "fp64"}.

>>> import torch
>>> from parity_kit.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
>>> cfg = RWKV7Config(hidden_size=64, num_hidden_layers=2, head_dim=16, vocab_size=50,
...                   decay_low_rank_dim=8, gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8)
>>> model = RWKV7ForCausalLM(cfg).eval()
>>> model(torch.tensor([[0, 5, 7]])).logits.shape
torch.Size([1, 3, 50])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import ParityKitError
from .cache_compat import CACHE_FIELD, refuse_unknown_kwargs, resolve_cache
from .rwkv7_norm import GN_IMPLS, RWKV7GroupNorm
from .rwkv7_state import RWKV7State
from .wkv import wkv_chunk, wkv_recurrent, wkv_reference

__all__ = ["RWKV7Config", "RWKV7ForCausalLM", "RWKV7GroupNorm", "RWKV7Model", "RWKV7State", "WKV7", "set_wkv_mode"]

# e^{-0.5}: the log decay is -e^{-0.5}·σ(·), i.e. BlinkDL's exp(-exp(-softplus(-z) - 0.5)).
_DECAY_SCALE = 0.6065306597126334
WKV_MODES = ("recurrent", "chunk", "fp64")
_STATE_DTYPES = ("fp32", "model")
_FORWARD_ARGUMENTS = ("input_ids", "attention_mask", "inputs_embeds", "cache", "labels", "use_cache",
                      "output_hidden_states", "return_dict", "logits_to_keep", "past_key_values")
_INTERMEDIATE_DTYPES = ("fp32", "input")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ParityKitError(f"RWKV7Config.{name} must be one of {list(choices)}; got {value!r}")


class RWKV7Config(PretrainedConfig):
    """Config with FLA's ``RWKV7Config`` field names, plus our WKV execution switches.

    Ours: ``wkv_mode`` ("recurrent" | "chunk" | "fp64"), ``chunk_size`` (64), ``wkv_state_dtype``
    ("fp32": recurrent state kept in fp32 like FLA's fused kernel | "model": in the model dtype),
    ``chunk_intermediate_dtype`` ("fp32" | "input": emulate FLA's Triton chunk rounding),
    ``gn_fp32`` (False: GroupNorm in the model dtype; True: input and weights upcast to fp32, the original),
    ``gn_impl`` ("native": the fused kernel | "elementwise": written out in the model dtype, the converted
    port; see :mod:`parity_kit.models.rwkv7_norm`).
    FLA-only switches (``fuse_norm``, ``fuse_cross_entropy``, ``use_l2warp``, ``attn_mode``, ...)
    are kept so the config round-trips into FLA, and are ignored here.

    >>> RWKV7Config(hidden_size=128, head_dim=64).num_heads
    2
    """

    model_type = "rwkv7"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    # Long on purpose: one keyword per field of FLA's RWKV7Config (a checkpoint's config.json must load
    # unchanged), each stored and checked in one place.
    def __init__(
        self,
        attn_mode: str = "chunk",
        hidden_size: int = 2048,
        hidden_ratio: int | float | None = 4,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 24,
        head_dim: int | None = 64,
        num_heads: int | None = None,
        decay_low_rank_dim: int = 64,
        gate_low_rank_dim: int = 128,
        a_low_rank_dim: int = 64,
        v_low_rank_dim: int = 16,
        hidden_act: str = "sqrelu",
        max_position_embeddings: int = 2048,
        norm_first: bool = True,
        norm_bias: bool = True,
        norm_eps: float = 1e-5,
        attn: dict | None = None,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int = 0,
        eos_token_id: int = 1,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        fuse_norm: bool = True,
        fuse_cross_entropy: bool = True,
        fuse_linear_cross_entropy: bool = False,
        use_l2warp: bool = True,
        vocab_size: int = 32000,
        value_dim: int | list[int] | None = None,
        wkv_mode: str = "chunk",
        chunk_size: int = 64,
        wkv_state_dtype: str = "fp32",
        chunk_intermediate_dtype: str = "fp32",
        gn_fp32: bool = False,
        gn_impl: str = "native",
        **kwargs: Any,
    ) -> None:
        if head_dim is None and num_heads is None:
            raise ParityKitError("RWKV7Config needs head_dim or num_heads; set head_dim=64 as released models do")
        if head_dim is None:
            head_dim = hidden_size // num_heads
        num_heads = hidden_size // head_dim
        if num_heads * head_dim != hidden_size:
            raise ParityKitError(f"hidden_size {hidden_size} is not a multiple of head_dim {head_dim}")
        if value_dim is None:
            value_dim = [hidden_size] * num_hidden_layers
        elif isinstance(value_dim, int):
            value_dim = [value_dim] * num_hidden_layers
        if any(v != hidden_size for v in value_dim):
            raise ParityKitError(
                f"value_dim {value_dim} differs from hidden_size {hidden_size}; parity_kit's RWKV-7 supports "
                "value_dim == hidden_size only (as in every released RWKV-7 checkpoint)"
            )
        if hidden_act != "sqrelu":
            raise ParityKitError(f"hidden_act must be 'sqrelu' (RWKV-7 channel mixing); got {hidden_act!r}")
        _check_choice("wkv_mode", wkv_mode, WKV_MODES)
        _check_choice("wkv_state_dtype", wkv_state_dtype, _STATE_DTYPES)
        _check_choice("chunk_intermediate_dtype", chunk_intermediate_dtype, _INTERMEDIATE_DTYPES)
        _check_choice("gn_impl", gn_impl, GN_IMPLS)
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ParityKitError(f"RWKV7Config.chunk_size must be a positive integer; got {chunk_size!r}")
        if intermediate_size is None:
            # FLA's rule: hidden_ratio × hidden, rounded up to a multiple of 32.
            intermediate_size = 32 * math.ceil(int(hidden_size * (hidden_ratio or 4)) / 32)
        self.attn_mode = attn_mode
        self.hidden_size = hidden_size
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.value_dim = value_dim
        self.decay_low_rank_dim = decay_low_rank_dim
        self.gate_low_rank_dim = gate_low_rank_dim
        self.a_low_rank_dim = a_low_rank_dim
        self.v_low_rank_dim = v_low_rank_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.norm_first = norm_first
        self.norm_bias = norm_bias
        self.norm_eps = norm_eps
        self.attn = attn
        self.use_cache = use_cache
        self.initializer_range = initializer_range
        self.fuse_norm = fuse_norm
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        self.vocab_size = vocab_size
        self.wkv_mode = wkv_mode
        self.chunk_size = chunk_size
        self.wkv_state_dtype = wkv_state_dtype
        self.chunk_intermediate_dtype = chunk_intermediate_dtype
        self.gn_fp32 = gn_fp32
        self.gn_impl = gn_impl
        super().__init__(
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings, **kwargs,
        )


class LoRA(nn.Module):
    """FLA's low-rank MLP ``lora = Sequential(Linear(in, rank, no bias), activation, Linear(rank, out))``."""

    def __init__(self, dim_in: int, dim_out: int, rank: int, activation: str | None, bias: bool = True) -> None:
        super().__init__()
        act: nn.Module = {"tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), None: nn.Identity()}[activation]
        self.lora = nn.Sequential(nn.Linear(dim_in, rank, bias=False), act, nn.Linear(rank, dim_out, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(x)


class WKV7(nn.Module):
    """The WKV recurrence as a module without parameters: ``(r, w, k, v, a, b, initial_state) -> (o, state)``.

    ``mode``, ``chunk_size``, ``state_dtype`` ("fp32" | "model") and ``intermediate_dtype``
    ("fp32" | "input") are plain attributes so a precision tool can flip one layer.
    """

    def __init__(self, mode: str = "chunk", chunk_size: int = 64, state_dtype: str = "fp32",
                 intermediate_dtype: str = "fp32") -> None:
        super().__init__()
        self.mode = mode
        self.chunk_size = chunk_size
        self.state_dtype = state_dtype
        self.intermediate_dtype = intermediate_dtype

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, chunk_size={self.chunk_size}, state_dtype={self.state_dtype!r}, "
                f"intermediate_dtype={self.intermediate_dtype!r}")

    def forward(self, r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor, initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "recurrent":
            return wkv_recurrent(r, w, k, v, a, b, initial_state,
                                 state_dtype=torch.float32 if self.state_dtype == "fp32" else None)
        if self.mode == "chunk":
            low = r.dtype if self.intermediate_dtype == "input" else None
            return wkv_chunk(r, w, k, v, a, b, initial_state, chunk_size=self.chunk_size,  # type: ignore[return-value]
                             intermediate_dtype=low)
        if self.mode == "fp64":
            o, state = wkv_reference(r, w, k, v, a, b, initial_state)
            return o.to(r.dtype), state
        raise ParityKitError(f"WKV7.mode must be one of {list(WKV_MODES)}; got {self.mode!r}")


def _token_shift(x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """Δ = x[t-1] - x[t] with x[-1] = ``previous`` (zeros when there is none). x: [B, T, C]."""
    first = torch.zeros_like(x[:, :1]) if previous is None else previous.to(x.dtype).unsqueeze(1)
    return torch.cat([first, x[:, :-1]], dim=1) - x


class RWKV7Attention(nn.Module):
    """Time mixing with FLA's parameter names (``x_r … x_g``, ``k_k``, ``k_a``, ``r_k``, ``*_proj``,
    ``{w,a,v,g}_lora``, ``g_norm``); ``v_lora`` is absent in layer 0 as in FLA."""

    def __init__(self, config: RWKV7Config, layer_idx: int) -> None:
        super().__init__()
        c, h, n = config.hidden_size, config.num_heads, config.head_dim
        self.layer_idx = layer_idx
        self.hidden_size, self.num_heads, self.head_dim = c, h, n
        self.num_hidden_layers = config.num_hidden_layers
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, c)))
        self.k_k = nn.Parameter(torch.zeros(c))
        self.k_a = nn.Parameter(torch.zeros(c))
        self.r_k = nn.Parameter(torch.zeros(h, n))
        self.r_proj = nn.Linear(c, c, bias=False)
        self.k_proj = nn.Linear(c, c, bias=False)
        self.v_proj = nn.Linear(c, c, bias=False)
        self.o_proj = nn.Linear(c, c, bias=False)
        self.w_lora = LoRA(c, c, config.decay_low_rank_dim, "tanh")
        if layer_idx != 0:
            self.v_lora = LoRA(c, c, config.v_low_rank_dim, None)
        self.a_lora = LoRA(c, c, config.a_low_rank_dim, None)
        self.g_lora = LoRA(c, c, config.gate_low_rank_dim, "sigmoid", bias=False)
        self.g_norm = RWKV7GroupNorm(h, c, eps=n * config.norm_eps, fp32=config.gn_fp32,
                                     impl=config.gn_impl)
        self.wkv = WKV7(config.wkv_mode, config.chunk_size, config.wkv_state_dtype, config.chunk_intermediate_dtype)

    def forward(
        self, x: torch.Tensor, v_first: torch.Tensor | None, cache: RWKV7State | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, seq, c = x.shape
        h, n = self.num_heads, self.head_dim
        i = self.layer_idx
        delta = _token_shift(x, cache.attn_x[i] if cache is not None else None)
        xr, xw, xk, xv, xa, xg = (x.addcmul(delta, mu) for mu in (self.x_r, self.x_w, self.x_k, self.x_v,
                                                                    self.x_a, self.x_g))
        r = self.r_proj(xr)
        w = -_DECAY_SCALE * self.w_lora(xw).sigmoid()
        k = self.k_proj(xk)
        v = self.v_proj(xv)
        if i == 0 or v_first is None:
            v_first = v
        else:
            v = torch.lerp(v, v_first, self.v_lora(xv).sigmoid())
        a = self.a_lora(xa).sigmoid()
        g = self.g_lora(xg)
        kk = F.normalize((k * self.k_k).view(bsz, seq, h, n), dim=-1, p=2.0)
        k = k.addcmul(k * (a - 1), self.k_a)
        r4, w4, k4, v4, a4 = (t.view(bsz, seq, h, n) for t in (r, w, k, v, a))
        o, state = self.wkv(r4, w4, k4, v4, -kk, kk * a4, cache.wkv[i] if cache is not None else None)
        if cache is not None:
            cache.attn_x[i] = x[:, -1]
            cache.wkv[i] = state
        o = self.g_norm(o.reshape(bsz * seq, c)).view(bsz, seq, c)
        bonus = (r4 * k4 * self.r_k).sum(-1, keepdim=True) * v4  # [B, T, H, N]
        o = (o + bonus.view(bsz, seq, c)) * g
        return self.o_proj(o), v_first


class RWKV7FeedForward(nn.Module):
    """Channel mixing: ``value(relu(key(x + Δ·x_k))²)``; FLA names ``x_k`` ([C]), ``key``, ``value``."""

    def __init__(self, config: RWKV7Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_hidden_layers = config.num_hidden_layers
        self.x_k = nn.Parameter(torch.zeros(config.hidden_size))
        self.key = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.value = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cache: RWKV7State | None = None) -> torch.Tensor:
        delta = _token_shift(x, cache.ffn_x[self.layer_idx] if cache is not None else None)
        if cache is not None:
            cache.ffn_x[self.layer_idx] = x[:, -1]
        return self.value(torch.relu(self.key(x.addcmul(delta, self.x_k))).square())


class RWKV7Block(nn.Module):
    """``pre_norm`` (layer 0) → ``attn_norm`` → ``attn`` → residual → ``ffn_norm`` → ``ffn`` → residual."""

    def __init__(self, config: RWKV7Config, layer_idx: int) -> None:
        super().__init__()
        c, eps, bias = config.hidden_size, config.norm_eps, config.norm_bias
        self.layer_idx = layer_idx
        if config.norm_first and layer_idx == 0:
            self.pre_norm = nn.LayerNorm(c, eps=eps, bias=bias)
        self.attn_norm = nn.LayerNorm(c, eps=eps, bias=bias)
        self.attn = RWKV7Attention(config, layer_idx)
        self.ffn_norm = nn.LayerNorm(c, eps=eps, bias=bias)
        self.ffn = RWKV7FeedForward(config, layer_idx)

    def forward(self, hidden: torch.Tensor, v_first: torch.Tensor | None,
                cache: RWKV7State | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = self.pre_norm(hidden) if hasattr(self, "pre_norm") else hidden
        attn_out, v_first = self.attn(self.attn_norm(residual), v_first, cache)
        hidden = residual + attn_out
        hidden = hidden + self.ffn(self.ffn_norm(hidden), cache)
        return hidden, v_first


class RWKV7PreTrainedModel(PreTrainedModel):
    config_class = RWKV7Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["RWKV7Block"]
    _skip_keys_device_placement = ["cache", "past_key_values"]

    def __init__(self, config: RWKV7Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        if getattr(config, "gn_fp32", False):
            # from_pretrained(dtype=bf16) then loads the GroupNorm weights in fp32, as the original keeps ln_x.
            self._keep_in_fp32_modules_strict = ["g_norm"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BlinkDL's / FLA's initialisation (time-mix shapes per layer depth), through ``transformers.initialization``
        so weights loaded from a checkpoint are never overwritten."""
        cfg = self.config
        if isinstance(module, nn.Embedding):
            init.uniform_(module.weight, a=-1e-4, b=1e-4)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if module is getattr(self, "lm_head", None):
                gain = 0.5 * math.sqrt(cfg.vocab_size / cfg.hidden_size) if cfg.vocab_size > cfg.hidden_size else 0.5
                init.orthogonal_(module.weight, gain=gain)
            else:
                init.normal_(module.weight, mean=0.0, std=cfg.initializer_range)
                if module.bias is not None:
                    init.zeros_(module.bias)
        elif isinstance(module, LoRA):
            out_features, rank = module.lora[2].weight.shape
            init.zeros_(module.lora[0].weight)
            init.orthogonal_(module.lora[2].weight, gain=0.1 * (math.sqrt(rank / out_features) if rank > out_features
                                                                  else 1.0))
            if module.lora[2].bias is not None:
                init.zeros_(module.lora[2].bias)
        elif isinstance(module, RWKV7Attention):
            self._init_attention(module)
        elif isinstance(module, RWKV7FeedForward):
            c = module.x_k.numel()
            depth = 1.0 - module.layer_idx / module.num_hidden_layers
            ddd = torch.arange(c, dtype=torch.float64) / c
            init.copy_(module.x_k, (1.0 - ddd.pow(depth**4)).to(module.x_k.dtype))
            init.orthogonal_(module.key.weight)
            init.zeros_(module.value.weight)

    def _init_attention(self, m: RWKV7Attention) -> None:
        c, n, layers = m.hidden_size, m.head_dim, m.num_hidden_layers
        ratio_0_to_1 = m.layer_idx / max(layers - 1, 1)
        ratio_1_to_0 = 1.0 - m.layer_idx / layers
        idx = torch.arange(c, dtype=torch.float64)
        ddd = idx / c
        linear = idx / max(c - 1, 1) - 0.5
        zigzag = ((idx % n) - (n - 1) / 2) / max((n - 1) / 2, 1e-9)
        zigzag = zigzag * zigzag.abs()
        decay_bias = -6 + 6 * (idx / max(c - 1, 1)) ** (1 + ratio_0_to_1**0.3)

        def put(p: torch.Tensor, value: torch.Tensor) -> None:
            init.copy_(p, value.reshape(p.shape).to(p.dtype))

        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            put(getattr(m, name), 1.0 - ddd.pow(power * ratio_1_to_0))
        put(m.k_k, 0.71 - linear * 0.1)
        init.constant_(m.k_a, 1.02)
        init.constant_(m.r_k, -0.04)
        put(m.w_lora.lora[2].bias, decay_bias + 0.5 + zigzag * 2.5)
        put(m.a_lora.lora[2].bias, -0.19 + zigzag * 0.3 + linear * 0.4)
        if hasattr(m, "v_lora"):
            put(m.v_lora.lora[2].bias, 0.73 - linear * 0.4)
        init.constant_(m.g_norm.weight, ((m.layer_idx + 1) / layers) ** 0.7)
        init.zeros_(m.g_norm.bias)
        init.orthogonal_(m.r_proj.weight)
        init.orthogonal_(m.k_proj.weight, gain=0.1)
        init.orthogonal_(m.v_proj.weight)
        # FLA rescales the residual output projection GPT-2 style (kaiming / sqrt(2 · layers)).
        if not getattr(m.o_proj.weight, "_is_hf_initialized", False):
            nn.init.kaiming_uniform_(m.o_proj.weight, a=math.sqrt(5))
            m.o_proj.weight.div_(math.sqrt(2 * layers))


class RWKV7Model(RWKV7PreTrainedModel):
    """Embeddings, blocks and final norm (``model.embeddings``, ``model.layers``, ``model.norm``)."""

    def __init__(self, config: RWKV7Config) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(RWKV7Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(self, input_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                cache: RWKV7State | None = None, output_hidden_states: bool = False,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ParityKitError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        all_hidden: tuple[torch.Tensor, ...] | None = () if output_hidden_states else None
        v_first = None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden += (hidden,)
            hidden, v_first = layer(hidden, v_first, cache)
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden += (hidden,)
        return hidden, all_hidden


class RWKV7ForCausalLM(RWKV7PreTrainedModel, GenerationMixin):
    """RWKV-7 language model with FLA names (``model.*``, ``lm_head``), incremental decoding and ``generate()``.

    The cache (``cache=``, or ``past_key_values=``) is an :class:`RWKV7State`; with ``use_cache=True`` (the default in eval mode)
    the returned state continues the sequence: prefill once, then feed one token at a time.

    >>> import torch
    >>> cfg = RWKV7Config(hidden_size=32, num_hidden_layers=2, head_dim=16, vocab_size=20, decay_low_rank_dim=8,
    ...                   gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8, wkv_mode="recurrent")
    >>> m = RWKV7ForCausalLM(cfg).eval()
    >>> m.generate(torch.tensor([[0, 3, 4]]), max_new_tokens=3, do_sample=False).shape
    torch.Size([1, 6])
    """

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: RWKV7Config) -> None:
        super().__init__(config)
        self.model = RWKV7Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: RWKV7State | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: RWKV7State | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """``cache`` and ``past_key_values`` are one argument under its new and old name (transformers 5.24)."""
        refuse_unknown_kwargs(kwargs, type(self).__name__, _FORWARD_ARGUMENTS)
        cache = resolve_cache(cache, past_key_values, type(self).__name__)
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ParityKitError(
                "RWKV7ForCausalLM does not support padding (attention_mask has zeros): a recurrent model would "
                "carry the pad tokens in its state; run prompts of different lengths one at a time"
            )
        if cache is not None and not isinstance(cache, RWKV7State):
            raise ParityKitError(
                f"the cache must be an RWKV7State (or None), got {type(cache).__name__}"
            )
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training
        if use_cache and cache is None:
            cache = RWKV7State(self.config.num_hidden_layers)
        hidden, all_hidden = self.model(input_ids, inputs_embeds, cache,
                                        bool(output_hidden_states or self.config.output_hidden_states))
        if cache is not None:
            cache.seen_tokens += hidden.shape[1]
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        logits = self.lm_head(kept)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=all_hidden,
                                      **{CACHE_FIELD: cache if use_cache else None})

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, cache: RWKV7State | None = None,
        attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True, past_key_values: RWKV7State | None = None, **kwargs: Any,
    ) -> dict[str, Any]:
        """After the prefill the state holds the whole prefix, so only the newest token is fed.

        ``kwargs`` are generate's own bookkeeping (next_sequence_length, is_first_iteration, ...): the state
        alone decides what is fed.
        """
        cache = resolve_cache(cache, past_key_values, type(self).__name__)
        if cache is not None and cache.get_seq_length() > 0:
            return {"input_ids": input_ids[:, -1:], "cache": cache, "use_cache": True}
        if inputs_embeds is not None:
            return {"inputs_embeds": inputs_embeds, "cache": cache, "use_cache": use_cache}
        return {"input_ids": input_ids, "cache": cache, "use_cache": use_cache}

    def set_wkv_mode(self, mode: str | None = None, *, chunk_size: int | None = None,
                     state_dtype: str | None = None, intermediate_dtype: str | None = None) -> RWKV7ForCausalLM:
        """Switch every layer's WKV execution (and the config); see :func:`set_wkv_mode`."""
        set_wkv_mode(self, mode, chunk_size=chunk_size, state_dtype=state_dtype, intermediate_dtype=intermediate_dtype)
        return self


def set_wkv_mode(model: nn.Module, mode: str | None = None, *, chunk_size: int | None = None,
                 state_dtype: str | None = None, intermediate_dtype: str | None = None) -> int:
    """Set mode / chunk size / state dtype / chunk intermediate dtype on every :class:`WKV7` in ``model``.

    Returns the number of WKV modules changed; also updates ``model.config`` when present.

    >>> cfg = RWKV7Config(hidden_size=32, num_hidden_layers=2, head_dim=16, vocab_size=20)
    >>> set_wkv_mode(RWKV7ForCausalLM(cfg), "fp64")
    2
    """
    changes = {"mode": mode, "chunk_size": chunk_size, "state_dtype": state_dtype,
               "intermediate_dtype": intermediate_dtype}
    if mode is not None:
        _check_choice("wkv_mode", mode, WKV_MODES)
    if state_dtype is not None:
        _check_choice("wkv_state_dtype", state_dtype, _STATE_DTYPES)
    if intermediate_dtype is not None:
        _check_choice("chunk_intermediate_dtype", intermediate_dtype, _INTERMEDIATE_DTYPES)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ParityKitError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    modules = [m for m in model.modules() if isinstance(m, WKV7)]
    if not modules:
        raise ParityKitError(f"{type(model).__name__} has no WKV7 module; pass an RWKV-7 model from parity_kit")
    for m in modules:
        for attr, value in changes.items():
            if value is not None:
                setattr(m, attr, value)
    config = getattr(model, "config", None)
    if isinstance(config, RWKV7Config):
        for attr, value in (("wkv_mode", mode), ("chunk_size", chunk_size), ("wkv_state_dtype", state_dtype),
                            ("chunk_intermediate_dtype", intermediate_dtype)):
            if value is not None:
                setattr(config, attr, value)
    return len(modules)


AutoConfig.register("rwkv7", RWKV7Config, exist_ok=True)
AutoModelForCausalLM.register(RWKV7Config, RWKV7ForCausalLM, exist_ok=True)
