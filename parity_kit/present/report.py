"""Environment capsule, findings files and notebook → HTML export.

A finding is only reproducible together with the environment that produced it, so every findings
file carries the capsule of the kernel that wrote it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import numbers
import os
import re
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..dtypes import dtype_name
from ..errors import ParityKitError
from .._util.atomic import atomic_write
from .._util.paths import repo_root

FINDINGS_KEYS = ("notebook", "parameters", "conclusion", "figures", "environment")

# JSON has no NaN/inf; a non-finite figure is written as one of these strings and read back as a float.
_NONFINITE_TO_JSON = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_JSON_TO_NONFINITE = {v: float(k) for k, v in _NONFINITE_TO_JSON.items()}


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
    from .. import __version__

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

    fa, fb = _flatten(a), _flatten(b)
    keys = list(fa) + [k for k in fb if k not in fa]
    rows = [
        {"key": k, "a": fa.get(k), "b": fb.get(k)}
        for k in keys
        if k not in fa or k not in fb or fa[k] != fb[k]
    ]
    return pd.DataFrame(rows, columns=["key", "a", "b"])


def _figure_value(value: Any, where: str) -> Any:
    """A figure as plain JSON: numbers, None, (nested) lists of those, dicts of those."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise ParityKitError(f"figure {where!r} is a {value.dtype} tensor; figures must be real numbers")
        value = value.detach().cpu().tolist()
    elif hasattr(value, "tolist") and type(value).__module__ == "numpy":
        if getattr(value, "dtype", None) is not None and value.dtype.kind not in "iuf":
            raise ParityKitError(f"figure {where!r} is a numpy array of dtype {value.dtype}; figures must be numbers")
        value = value.tolist()
    if value is None:
        return None
    if isinstance(value, bool):
        raise ParityKitError(
            f"figure {where!r} is a bool ({value}); figures are numbers the conclusion relies on — "
            "use int(...) for a count or state the yes/no in the conclusion"
        )
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else _NONFINITE_TO_JSON[str(f)]
    if isinstance(value, list | tuple):
        return [_figure_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _figure_value(v, f"{where}.{k}") for k, v in value.items()}
    raise ParityKitError(
        f"figure {where!r} is a {type(value).__name__} ({value!r:.60}); figures must be numbers, None, "
        "lists of numbers or dicts of those — put names and text in the conclusion or the parameters"
    )


def _parameter_value(value: Any, where: str) -> Any:
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, list | tuple):
        return [_parameter_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _parameter_value(v, f"{where}.{k}") for k, v in value.items()}
    if hasattr(value, "item"):  # numpy / torch scalars
        return _parameter_value(value.item(), where)
    raise ParityKitError(
        f"parameter {where!r} is a {type(value).__name__}, which JSON cannot hold; pass str, number, bool, "
        "None, or lists/dicts of those"
    )


def write_findings(
    notebook: str,
    parameters: Mapping[str, Any],
    conclusion: str,
    figures: Mapping[str, Any],
    reports_dir: str | os.PathLike[str] = "reports",
) -> Path:
    """Write ``<reports_dir>/<notebook>.findings.json`` atomically and return its path.

    The file is ``{"notebook", "parameters", "conclusion", "figures", "environment"}``; the environment
    is :func:`environment_capsule` of the calling process. ``figures`` values must be numbers, ``None``
    (no value, e.g. "no divergence found"), lists of those or dicts of those; numpy and torch scalars
    and tensors are converted. Non-finite numbers are written as the strings ``"NaN"``,
    ``"Infinity"``, ``"-Infinity"`` (JSON has no such numbers) and :func:`read_findings` turns them
    back into floats.

    >>> import tempfile
    >>> p = write_findings("00_demo", {"dtype": "bf16"}, "bf16 stays close", {"max_rel_rms": 0.004},
    ...                    reports_dir=tempfile.mkdtemp())
    >>> p.name, read_findings(p)["figures"]
    ('00_demo.findings.json', {'max_rel_rms': 0.004})
    """
    name = Path(str(notebook)).name.removesuffix(".ipynb")
    if not name or name != str(notebook).removesuffix(".ipynb"):
        raise ParityKitError(
            f"notebook name {notebook!r} must be a plain name like '01_fp16_fp32_divergence' (no folders); "
            "use reports_dir= to choose the folder"
        )
    if not isinstance(conclusion, str) or not conclusion.strip():
        raise ParityKitError("conclusion must be a non-empty string stating what the figures show")
    if not isinstance(figures, Mapping):
        raise ParityKitError(f"figures must be a dict of name -> number, got {type(figures).__name__}")
    if not isinstance(parameters, Mapping):
        raise ParityKitError(f"parameters must be a dict of name -> value, got {type(parameters).__name__}")
    findings = {
        "notebook": name,
        "parameters": {str(k): _parameter_value(v, str(k)) for k, v in parameters.items()},
        "conclusion": conclusion,
        "figures": {str(k): _figure_value(v, str(k)) for k, v in figures.items()},
        "environment": environment_capsule(),
    }
    path = Path(reports_dir) / f"{name}.findings.json"
    with atomic_write(path) as f:
        json.dump(findings, f, indent=2, allow_nan=False)
        f.write("\n")
    return path


def _restore_nonfinite(value: Any) -> Any:
    if isinstance(value, str):
        return _JSON_TO_NONFINITE.get(value, value)
    if isinstance(value, list):
        return [_restore_nonfinite(v) for v in value]
    if isinstance(value, dict):
        return {k: _restore_nonfinite(v) for k, v in value.items()}
    return value


def read_findings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a findings file written by :func:`write_findings`; non-finite figures come back as floats.

    >>> import tempfile
    >>> p = write_findings("x", {}, "no divergence", {"first": None, "err": float("inf")},
    ...                    reports_dir=tempfile.mkdtemp())
    >>> read_findings(p)["figures"]
    {'first': None, 'err': inf}
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParityKitError(f"no findings file at {p}; run the notebook (or `parity-kit demo`) first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ParityKitError(f"{p} is not a valid findings file ({e}); re-run the notebook to rewrite it") from None
    missing = [k for k in FINDINGS_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise ParityKitError(f"{p} is not a findings file: missing keys {missing}; re-run the notebook")
    data["figures"] = _restore_nonfinite(data["figures"])
    return data


_REMOTE_SCRIPT = re.compile(r"<script\b[^>]*\bsrc=[\"']?https?://[^>]*>.*?</script>", re.S | re.I)


def export_html(
    ipynb_path: str | os.PathLike[str], html_path: str | os.PathLike[str], hide_code: bool = False
) -> Path:
    """Render a notebook (with its outputs) to a self-contained HTML file, atomically.

    Figures are embedded as base64 PNG; saved widget state (whose renderer would come from a CDN) and
    the template's remote ``<script src=https://…>`` tags (require.js, MathJax) are left out, so the
    page reads offline and can be attached to a bug report on its own. ``hide_code=True`` leaves out
    the input cells and shows only outputs and markdown.

    >>> import nbformat, tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Hi")]), d / "a.ipynb")
    >>> page = export_html(d / "a.ipynb", d / "a.html").read_text()
    >>> "Hi" in page, "src='http" in page or 'src="http' in page
    (True, False)
    """
    import nbformat
    from nbconvert import HTMLExporter

    src = Path(ipynb_path)
    try:
        nb = nbformat.read(src, as_version=4)
    except FileNotFoundError:
        raise ParityKitError(f"no notebook at {src}; check the path") from None
    except Exception as e:  # nbformat raises several unrelated types for unreadable files
        raise ParityKitError(f"{src} is not a readable notebook ({type(e).__name__}: {e})") from None
    nb.metadata.pop("widgets", None)
    exporter = HTMLExporter(embed_images=True, exclude_input=hide_code, exclude_input_prompt=hide_code)
    body, _ = exporter.from_notebook_node(nb)
    out = Path(html_path)
    with atomic_write(out) as f:
        f.write(_REMOTE_SCRIPT.sub("", body))
    return out
