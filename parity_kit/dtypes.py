"""Parsing and checking dtypes given as strings ("fp16", "bf16", ...) or torch.dtype."""

from __future__ import annotations

import torch

from .errors import ParityKitError

_ALIASES: dict[str, torch.dtype] = {
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
_SHORT: dict[torch.dtype, str] = {
    torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
}

DtypeLike = str | torch.dtype


def parse_dtype(dtype: DtypeLike) -> torch.dtype:
    """Return the torch dtype named by ``dtype`` ("fp16", "bfloat16", torch.float32, ...).

    >>> parse_dtype("bf16")
    torch.bfloat16
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _ALIASES:
            return _ALIASES[key]
    raise ParityKitError(
        f"unknown dtype {dtype!r}; use one of {sorted(set(_ALIASES))} or a torch.dtype"
    )


def dtype_name(dtype: DtypeLike) -> str:
    """Short name of a floating dtype: "fp32", "bf16", ...; other dtypes print as torch does.

    >>> dtype_name(torch.float16)
    'fp16'
    """
    d = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    return _SHORT.get(d, str(d).removeprefix("torch."))


def check_dtype_on_device(dtype: DtypeLike, device: str | torch.device) -> torch.dtype:
    """Return ``dtype`` if ``device`` can run a matmul in it, else raise a ParityKitError naming the fix.

    >>> check_dtype_on_device("fp32", "cpu")
    torch.float32
    """
    d = parse_dtype(dtype)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParityKitError(f"device {str(dev)!r} requested but CUDA is not available here; use device='cpu'")
    try:
        a = torch.ones(2, 2, dtype=d, device=dev)
        (a @ a).sum().item()
    except (RuntimeError, TypeError) as e:  # the backend has no kernel for this dtype
        raise ParityKitError(
            f"device {str(dev)!r} cannot run dtype {dtype_name(d)} ({e.__class__.__name__}: {e}); "
            "pick another dtype (fp32 works everywhere) or another device"
        ) from None
    return d
