"""Shared fixtures: tiny, randomly initialised transformers models built from small configs."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

torch.set_num_threads(1)


def build_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).to(dtype).eval()


def build_tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def build_tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    return BertModel(config).eval()


def hook_counts(model: torch.nn.Module) -> dict[str, tuple[int, int, int, int]]:
    """Number of forward, forward-pre and kwargs hooks on every module and whether its ``forward`` is
    replaced by an instance attribute (a capture wrapper), and the hooks in torch's process-wide
    registry under ``"<global>"`` (to prove none leak)."""
    from torch.nn.modules import module as torch_module

    counts = {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._forward_hooks_with_kwargs),
                     int("forward" in m.__dict__))
              for name, m in model.named_modules()}
    counts["<global>"] = (len(torch_module._global_forward_hooks), len(torch_module._global_forward_pre_hooks),
                          len(torch_module._global_forward_hooks_with_kwargs), 0)
    return counts


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return build_tiny_llama()


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    return build_tiny_gpt2()


@pytest.fixture
def tiny_bert() -> BertModel:
    return build_tiny_bert()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])


@pytest.fixture
def deprecation_messages():
    """A function that lists every deprecation reported so far in the test: Python warnings and
    transformers' own log warnings (which it prints once per process, so its once-cache is cleared first)."""
    from transformers.utils import logging as hf_logging

    logged: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    hf_logging.warning_once.cache_clear()
    handler, root = Keep(level=logging.WARNING), hf_logging.get_logger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")

            def messages() -> list[str]:
                shown = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
                return [m for m in logged + shown if "deprecat" in m.lower()]

            yield messages
    finally:
        root.removeHandler(handler)
