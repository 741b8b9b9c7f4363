"""BlinkDL's official runtime (PyPI ``rwkv``) on our tiny-rwkv7 weights: skipped when it is not installed."""

from __future__ import annotations

import pytest
import torch

import parity_kit as pk
from parity_kit.errors import ParityKitError
from parity_kit.models.rwkv7_official import official_runtime_available, official_rwkv7_logits

needs_runtime = pytest.mark.skipif(not official_runtime_available(), reason="pip install rwkv (BlinkDL's runtime)")


@needs_runtime
def test_official_runtime_matches_our_logits_on_tiny_rwkv7():
    model, tokenizer = pk.models.load("tiny-rwkv7", dtype="fp32")
    ids = [0, *tokenizer("The cat sat on the mat. Then it slept by the door.", add_special_tokens=False)["input_ids"]]
    official = official_rwkv7_logits(model, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]), use_cache=False).logits[0]
    assert official.shape == ours.shape
    assert pk.metrics.rel_rms(official.double(), ours.double()) < 1e-5
    assert torch.equal(official.argmax(-1), ours.argmax(-1))


def test_bad_requests_raise():
    model, _ = pk.models.load("tiny-rwkv7", dtype="fp32")
    if not official_runtime_available():
        with pytest.raises(ParityKitError, match="pip install rwkv"):
            official_rwkv7_logits(model, [0, 1, 2])
        return
    with pytest.raises(ParityKitError, match="at least 2 tokens"):
        official_rwkv7_logits(model, [0])
    with pytest.raises(ParityKitError, match="runs"):
        official_rwkv7_logits(model, [0, 1], dtype="fp64")
    with pytest.raises(ParityKitError, match="RWKV7ForCausalLM"):
        official_rwkv7_logits(torch.nn.Linear(2, 2), [0, 1])  # type: ignore[arg-type]
