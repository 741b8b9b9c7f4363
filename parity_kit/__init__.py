"""parity_kit: reproduce, localise and explain numerical differences between two runs of a language model.

>>> import parity_kit as pk
>>> "record" in pk.__all__ and "compare" in pk.__all__
True

Public names are imported lazily: ``import parity_kit`` loads neither torch nor pandas, and a notebook
only pays for what it uses.

Imported before torch, it sets ``OMP_WAIT_POLICY=PASSIVE`` unless that variable is already set (any value you
export wins): torch's CPU kernels run on OpenMP threads that by default spin while they wait, and on cores
shared with other processes a spinning or descheduled thread stalls every parallel region. A triage of
``tiny-rwkv7`` (about 200,000 small operations) took 40–75 s instead of 3–5 s on 2 shared cores that way
(``benchmarks/triage_time.py``). The policy changes when idle threads sleep, never what they compute.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

if "torch" not in sys.modules:  # libgomp reads it once, when torch loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import ParityKitError

__version__ = "0.1.0"

# public name -> module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    # capture and recordings
    "record": "capture", "select_modules": "capture",
    "Recording": "recording", "Call": "recording", "TensorStats": "recording",
    # metrics and comparison
    "compare": "comparison", "first_divergence": "comparison", "first_nonfinite": "comparison",
    "per_token_error": "comparison", "compare_live": "comparison",
    "ModuleMapping": "comparison.mapping",
    "Floor": "comparison.floor", "FloorComponent": "comparison.floor", "apply_floor": "comparison.floor",
    "culprits": "comparison.floor", "run_verdict": "comparison.floor", "verdict_summary": "comparison.floor",
    "verdict_figures": "comparison.floor", "describe_verdict": "comparison.floor",
    # analyses
    "local_vs_propagated": "analyses.replay",
    "calibrate_floor": "analyses.calibration", "compare_models": "analyses.calibration",
    "rounding_only": "analyses.calibration",
    "run_in_dtype": "analyses.mixed_precision", "sweep_by_class": "analyses.precision",
    "bisect_precision": "analyses.precision",
    "lockstep_greedy": "analyses.generation", "teacher_forced": "analyses.generation",
    "divergence_statistics": "analyses.divergence", "ModelPair": "analyses.divergence",
    "execution_floor": "analyses.execution_floor", "ExecutionFloor": "comparison.execution",
    "evaluate_lastword": "analyses.evaluation", "paired_comparison": "analyses.paired",
    "token_provenance": "analyses.provenance",
    "triage": "analyses.triage",
    # reports
    "environment_capsule": "_util.environment", "diff_capsules": "_util.environment", "write_findings": "present.report",
    "read_findings": "present.report", "export_html": "present.report",
}
# public names that are modules
_MODULES: dict[str, str] = {
    "metrics": "comparison.metrics", "mapping": "comparison.mapping", "models": "models",
    "plots": "present.plots", "ui": "present.panels", "recurrence": "models.wkv",
    "prefill": "analyses.prefill", "generation": "analyses.generation", "evaluation": "analyses.evaluation",
    "precision": "analyses.precision", "bugreport": "stories.bug_report",
}

__all__ = ["ParityKitError", "__version__", *_EXPORTS, *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(f".{_MODULES[name]}", __name__)
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'parity_kit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
