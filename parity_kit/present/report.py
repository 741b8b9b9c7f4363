"""Findings files and notebook → HTML export.

A finding is only reproducible together with the environment that produced it, so every findings
file carries the capsule (:mod:`parity_kit._util.environment`) of the kernel that wrote it.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..dtypes import dtype_name
from ..errors import ParityKitError
from .._util.atomic import atomic_write
from .._util.environment import environment_capsule

FINDINGS_KEYS = ("notebook", "parameters", "conclusion", "figures", "environment")

# JSON has no NaN/inf; a non-finite figure is written as one of these strings and read back as a float.
_NONFINITE_TO_JSON = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_JSON_TO_NONFINITE = {v: float(k) for k, v in _NONFINITE_TO_JSON.items()}


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
