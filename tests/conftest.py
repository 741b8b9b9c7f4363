"""Shared fixtures; the model builders themselves are in :mod:`parity_kit.testing`."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from transformers import BertModel, GPT2LMHeadModel, LlamaForCausalLM

from parity_kit import testing

torch.set_num_threads(1)


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return testing.tiny_llama()


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    return testing.tiny_gpt2()


@pytest.fixture
def tiny_bert() -> BertModel:
    return testing.tiny_bert()


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
