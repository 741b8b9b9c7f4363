"""The environment capsule: everything about this process that can change a numerical result.

Every recording and every findings file carries one, so two results can be told apart by what ran them.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import torch

from ..dtypes import dtype_name
from ..errors import ParityKitError
from .paths import repo_root


@functools.lru_cache(maxsize=None)
def _package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=None)
def _git(*args: str) -> str | None:
    # read once per process: record() embeds the capsule in every recording, and git takes ~20 ms
    root = repo_root()
    # Only our own checkout: an installed copy must not report the commit of an unrelated repository.
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=3, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _sdpa_flag(name: str) -> bool | None:
    fn = getattr(torch.backends.cuda, f"{name}_sdp_enabled", None)
    return bool(fn()) if fn is not None else None


def environment_capsule() -> dict[str, Any]:
    """Everything about this process that can change a numerical result, as a flat JSON-ready dict.

    Keys: versions (``python``, ``torch``, ``transformers``, ``numpy``, ``fla``, ``parity_kit``),
    ``git_commit``/``git_dirty``, ``platform``, CUDA (``cuda_available``, ``cuda_version``,
    ``cudnn_version``, ``cuda_devices``), TF32 (``tf32_matmul``, ``tf32_cudnn``,
    ``float32_matmul_precision``), SDPA backends (``sdpa_flash``, ``sdpa_mem_efficient``,
    ``sdpa_math``, ``sdpa_cudnn``), determinism flags, ``default_dtype``, ``torch_initial_seed`` and
    thread counts. Absent things (no git, no CUDA, no fla) are ``None``.

    >>> cap = environment_capsule()
    >>> cap["torch"] == torch.__version__ and cap["default_dtype"]
    'fp32'
    """
    from .. import __version__  # the package's own attribute: a top-level import would be circular

    cuda = torch.cuda.is_available()
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "python_prefix": sys.prefix,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "parity_kit": __version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if dirty is None else bool(dirty),
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "numpy": _package_version("numpy"),
        "fla": _package_version("flash-linear-attention", "fla-core"),
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "cudnn_version": cudnn,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "sdpa_flash": _sdpa_flag("flash"),
        "sdpa_mem_efficient": _sdpa_flag("mem_efficient"),
        "sdpa_math": _sdpa_flag("math"),
        "sdpa_cudnn": _sdpa_flag("cudnn"),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "default_dtype": dtype_name(torch.get_default_dtype()),
        "torch_initial_seed": torch.initial_seed(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
    }


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def diff_capsules(a: Mapping[str, Any], b: Mapping[str, Any]) -> Any:
    """The keys whose values differ between two capsules, as a DataFrame with columns ``key, a, b``.

    Nested dicts are compared key by key (``"group.key"``); a key missing on one side shows ``None``.
    Pass the ``environment`` of two findings files to see why two runs may disagree.

    >>> cap = environment_capsule()
    >>> other = dict(cap, tf32_matmul=not cap["tf32_matmul"])
    >>> diff_capsules(cap, other)["key"].tolist()
    ['tf32_matmul']
    """
    import pandas as pd

    for name, capsule in (("a", a), ("b", b)):
        if not isinstance(capsule, Mapping):
            raise ParityKitError(f"diff_capsules: {name} must be a capsule dict (pk.environment_capsule(), or the "
                                 f"'environment' of a findings file), got {type(capsule).__name__}")
    fa, fb = _flatten(a), _flatten(b)
    keys = list(fa) + [k for k in fb if k not in fa]
    rows = [
        {"key": k, "a": fa.get(k), "b": fb.get(k)}
        for k in keys
        if k not in fa or k not in fb or fa[k] != fb[k]
    ]
    return pd.DataFrame(rows, columns=["key", "a", "b"])
