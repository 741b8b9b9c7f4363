"""Run an RWKV-7 through BlinkDL's official runtime (PyPI ``rwkv``, the "original implementation" of the
bug reports) on the CPU, for logits to compare ours and a converted model with.

The runtime reads its switches from environment variables when it is imported (``RWKV_V7_ON=1``,
``RWKV_JIT_ON``, ``RWKV_CUDA_ON``) and changes global torch settings (TorchScript autocast, cuDNN flags), so
it runs in a child process: the model is written as a BlinkDL ``.pth`` (:func:`write_blinkdl_checkpoint`),
the child loads it with ``rwkv.model.RWKV(path, strategy="cpu fp32")`` and one thread (with two threads on
two cores it is about 25x slower), and returns the logits of every position. Its quirks: ``ln_x`` eps is
hard-coded 64e-5, it never prepends a BOS token (the caller does), and its "bf16" strategy casts every
weight, ``ln_x`` included, to bf16.

>>> official_runtime_available() in (True, False)
True
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ..dtypes import DtypeLike, dtype_name, parse_dtype
from ..errors import ParityKitError
from .rwkv7 import RWKV7ForCausalLM
from .rwkv7_convert import write_blinkdl_checkpoint

__all__ = ["official_runtime_available", "official_runtime_version", "official_rwkv7_logits"]

_STRATEGY_DTYPES = ("fp32", "bf16", "fp16")

_CHILD = """
import os, sys, torch
os.environ["RWKV_V7_ON"] = "1"
os.environ["RWKV_CUDA_ON"] = "0"
os.environ.setdefault("RWKV_JIT_ON", "1")
torch.set_num_threads(1)
import rwkv.model
base, strategy, tokens_path, out_path = sys.argv[1:5]
tokens = torch.load(tokens_path).tolist()
model = rwkv.model.RWKV(base, strategy)
logits, _ = model.forward(tokens, None, full_output=True)
logits = logits.float().reshape(len(tokens), -1)
torch.save(logits.contiguous(), out_path)
"""


def official_runtime_available() -> bool:
    """True when BlinkDL's ``rwkv`` package is installed (``pip install rwkv``).

    >>> isinstance(official_runtime_available(), bool)
    True
    """
    return importlib.util.find_spec("rwkv") is not None


def official_runtime_version() -> str | None:
    """The installed version of the ``rwkv`` package, or None.

    >>> official_runtime_version() is None or official_runtime_version()[0].isdigit()
    True
    """
    try:
        return importlib.metadata.version("rwkv")
    except importlib.metadata.PackageNotFoundError:
        return None


def official_rwkv7_logits(model: RWKV7ForCausalLM, token_ids: Sequence[int], *, dtype: DtypeLike = "fp32",
                          timeout_s: float = 600.0) -> torch.Tensor:
    """Logits [T, vocab] (fp32) of BlinkDL's official runtime for ``model``'s weights on ``token_ids``.

    ``dtype`` picks the runtime's strategy ("cpu fp32" / "cpu bf16" / "cpu fp16"). The tokens are fed as
    they are: pass the BOS token 0 first if the model expects it. Raises :class:`ParityKitError` when the
    package is missing or the runtime fails.

    >>> import torch
    >>> from parity_kit.models.rwkv7 import RWKV7Config
    >>> cfg = RWKV7Config(hidden_size=64, num_hidden_layers=1, head_dim=64, vocab_size=30,
    ...                   decay_low_rank_dim=8, gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8)
    >>> if official_runtime_available():  # doctest: +SKIP
    ...     official_rwkv7_logits(RWKV7ForCausalLM(cfg), [0, 3, 4]).shape
    torch.Size([3, 30])
    """
    if not official_runtime_available():
        raise ParityKitError("BlinkDL's runtime is not installed; `pip install rwkv` (parity_kit was tested with "
                             "0.8.32), or compare with parity_kit's own fp32 model instead")
    if not isinstance(model, RWKV7ForCausalLM):
        raise ParityKitError(f"official_rwkv7_logits needs a parity_kit RWKV7ForCausalLM, got {type(model).__name__}")
    name = dtype_name(parse_dtype(dtype))
    if name not in _STRATEGY_DTYPES:
        raise ParityKitError(f"the official runtime runs {list(_STRATEGY_DTYPES)}, not {name}")
    if model.config.head_dim != 64:
        raise ParityKitError(f"the official runtime hard-codes head size 64; this model has {model.config.head_dim}")
    tokens = [int(t) for t in token_ids]
    if len(tokens) < 2:
        raise ParityKitError("pass at least 2 tokens (the runtime sends a single token down another path)")
    with tempfile.TemporaryDirectory(prefix="parity_kit_rwkv_") as tmp:
        folder = Path(tmp)
        write_blinkdl_checkpoint(model, folder / "model.pth")
        torch.save(torch.tensor(tokens), folder / "tokens.pt")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, str(folder / "model"), f"cpu {name}", str(folder / "tokens.pt"),
             str(folder / "logits.pt")], capture_output=True, text=True, timeout=timeout_s, env=env)
        if result.returncode != 0:
            raise ParityKitError(f"BlinkDL's runtime failed (exit {result.returncode}): {result.stderr[-2000:]}")
        return torch.load(folder / "logits.pt")
