"""``tiny-llama-from-config``: a small ``LlamaForCausalLM`` built from a config with seeded random weights.

It needs no files, so the quickstart runs anywhere; its vocabulary is the project's tokenizer's
(``data/tokenizer``), so text can be encoded for it too.
"""

from __future__ import annotations

from typing import Any

import torch

from .._util.paths import data_dir
from ..builtins.tokenizer import DEFAULT_VOCAB_SIZE
from ..dtypes import DtypeLike, check_dtype_on_device

FROM_CONFIG_LLAMA = "tiny-llama-from-config"
"""Model name of a small ``LlamaForCausalLM`` built from a config with seeded random weights (no files)."""


def build_tiny_llama(seed: int = 0, layers: int = 4, *, vocab_size: int = DEFAULT_VOCAB_SIZE) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` with hidden size 64 built from a config, weights drawn from ``seed``.

    The global RNG is left as it was, so building it does not change what the caller draws next.

    >>> build_tiny_llama(layers=2).config.num_hidden_layers
    2
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def load_from_config(
    dtype: DtypeLike = "fp32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    *,
    seed: int = 0,
    layers: int = 4,
) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` of :data:`FROM_CONFIG_LLAMA`: :func:`build_tiny_llama` and the project's tokenizer.

    >>> model, tok = load_from_config("bf16", layers=1)
    >>> next(model.parameters()).dtype, tok("User: hi")["input_ids"][0]
    (torch.bfloat16, 0)
    """
    from transformers import AutoTokenizer

    model = build_tiny_llama(seed, layers)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    model = model.to(device=device, dtype=check_dtype_on_device(dtype, device))
    return model, AutoTokenizer.from_pretrained(data_dir() / "tokenizer")
