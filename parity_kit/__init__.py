"""parity_kit: reproduce, localise and explain numerical differences between two runs of a language model.

>>> import parity_kit as pk
>>> "record" in pk.__all__ and "compare" in pk.__all__
True

Public names are imported lazily, so ``import parity_kit`` stays fast and a notebook only pays for
what it uses.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ParityKitError

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # capture and recordings
    "record": "capture", "select_modules": "capture",
    "Recording": "recording", "Call": "recording", "TensorStats": "recording",
    # metrics and comparison
    "metrics": "metrics",
    "compare": "compare", "first_divergence": "compare", "first_nonfinite": "compare",
    "per_token_error": "compare", "local_vs_propagated": "compare",
    "ModuleMapping": "mapping", "mapping": "mapping", "compare_live": "live",
    # precision
    "run_in_dtype": "precision", "sweep_by_class": "precision", "bisect_precision": "precision",
    # generation and evaluation
    "lockstep_greedy": "generation", "teacher_forced": "generation", "divergence_statistics": "generation",
    "evaluate_lastword": "evaluation", "paired_comparison": "evaluation", "token_provenance": "evaluation",
    # reports
    "environment_capsule": "report", "diff_capsules": "report", "write_findings": "report",
    "read_findings": "report", "export_html": "report",
    # subpackages / helper modules
    "models": "models", "plots": "plots", "recurrence": "recurrence", "ui": "ui", "prefill": "prefill",
    "generation": "generation", "evaluation": "evaluation", "precision": "precision", "bugreport": "bugreport",
}

__all__ = ["ParityKitError", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'parity_kit' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    value = module if _EXPORTS[name] == name else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


# "compare" names both a submodule and its main function. Importing a submodule binds it as a package
# attribute, which would shadow the function, so bind the function eagerly, after that import.
from .compare import compare  # noqa: E402
