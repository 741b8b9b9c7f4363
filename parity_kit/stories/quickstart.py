"""Story 00 (``parity_kit/notebooks/00_quickstart.ipynb``): capture and compare one model in two dtypes in a few cells; the
panel re-runs the same comparison for another model, dtype or input length."""

from __future__ import annotations

from functools import partial
from typing import Any

from ..analyses.runs import FROM_CONFIG_LLAMA, RunSpec, compare_runs
from ..present.panels import story_panel
from .bug_report import panel_items


def quickstart_run(params: dict[str, Any], *, smoke: bool = False) -> list[Any]:
    """The quickstart panel's run function: the same model in ``ref_dtype`` and ``dtype``, random ids.

    >>> items = quickstart_run({"model": FROM_CONFIG_LLAMA, "ref_dtype": "fp32", "dtype": "bf16", "device": "cpu",
    ...                         "attn_implementation": "eager", "seq_len": 4, "threshold": 0.01,
    ...                         "modules": "model.layers.*", "seed": 0}, smoke=True)
    >>> [type(x).__name__ for x in items]
    ['str', 'DataFrame', 'Figure', 'Figure']
    """
    common = {"device": params["device"], "attn_implementation": params.get("attn_implementation")}
    result = compare_runs(
        RunSpec(params["model"], params["ref_dtype"], **common), RunSpec(params["model"], params["dtype"], **common),
        modules=params.get("modules") or "*", threshold=float(params["threshold"]),
        seq_len=min(int(params["seq_len"]), 16) if smoke else int(params["seq_len"]),
        seed=int(params["seed"]), layers=2 if smoke else 4, progress=params.get("progress"),
    )
    return panel_items(result, rows=12 if smoke else 24)


def quickstart_panel(*, model: str, ref_dtype: str = "fp32", dtype: str = "bf16", device: str = "cpu",
                     attn_implementation: str = "eager", seq_len: int = 64, threshold: float = 1e-2,
                     modules: str = "*", seed: int = 0, smoke: bool = False) -> Any:
    """The quickstart's panel: model, reference and candidate dtype, device, attention and the knobs.

    >>> panel = quickstart_panel(model=FROM_CONFIG_LLAMA, seq_len=4, modules="model.layers.*", smoke=True)
    >>> panel.set(dtype="fp16"); panel.click(); panel.error is None
    True
    """
    return story_panel(partial(quickstart_run, smoke=smoke), model=model, ref_dtype=ref_dtype, dtype=dtype,
                       device=device, attn_implementation=attn_implementation, extra_models=[FROM_CONFIG_LLAMA],
                       title="Capture and compare: pick the runs, press Run",
                       seq_len=int(seq_len), threshold=float(threshold), modules=str(modules), seed=int(seed))
