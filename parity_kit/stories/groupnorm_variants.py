"""Story 02's model variants: the bug report's "as converted" RWKV-7 (GroupNorm weights and arithmetic in the
model dtype) against the correct model, the range figures that explain when that conversion hurts, and the
story's acceptance targets judged from the measured figures.

The variants are load options of the model itself (:data:`parity_kit.models.rwkv7_norm.GROUPNORM_VARIANTS`),
never a switch an analysis reads: the analyses see only a model whose GroupNorm computes one way or another.
"""

from __future__ import annotations

import math

from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..analyses.paired import paired_comparison
from ..dtypes import DtypeLike, dtype_name, parse_dtype
from ..errors import ParityKitError
from ..models import load
from ..models.rwkv7_norm import groupnorm_variant
from .groupnorm import ClassSweepSummary, LocalErrorSummary
from .wording import removes_text

#: The story's targets (issue 18): class rank 1 and at least half of the logit error removed by GroupNorm in
#: fp32; g_norm's own error at least 3x its floor; the fix's paired |z| at least 2; the correct model's GroupNorm
#: share below 10%.
TARGETS = {"removed": 0.5, "local_floor_ratio": 3.0, "paired_z": 2.0, "correct_removed": 0.10}


def load_variant(model: str, variant: str, dtype: DtypeLike, device: str = "cpu") -> tuple[nn.Module, Any]:
    """``model`` in ``dtype`` with the GroupNorm treatment ``variant`` ("as converted", "fixed", "native").

    >>> m, _ = load_variant("tiny-rwkv7", "as converted", "bf16")
    >>> m.get_submodule("model.layers.0.attn.g_norm").impl, m.get_submodule("model.layers.0.attn.g_norm").weight.dtype
    ('elementwise', torch.bfloat16)
    """
    return load(model, dtype=dtype, device=device, **groupnorm_variant(variant))


def groupnorm_input_range(model: nn.Module, inputs: Mapping[str, Any], dtypes: tuple[DtypeLike, ...] = ("bf16", "fp16"),
                          suffix: str = "attn.g_norm") -> pd.DataFrame:
    """What the GroupNorms of ``model`` (run as given, usually fp32) receive on ``inputs``, per module: the largest
    input magnitude, the median |mean| / std over (token, head) groups (a large ratio makes centring lose bits),
    the variance against ``eps``, and per dtype the fraction of groups in which a squared deviation from the
    mean exceeds the dtype's largest finite number (where a GroupNorm written out in that dtype overflows).

    >>> m, _ = load("tiny-rwkv7")
    >>> t = groupnorm_input_range(m, {"input_ids": torch.tensor([[0, 5, 9, 11]]), "use_cache": False})
    >>> list(t.columns)[:3], len(t)
    (['module', 'max_abs_input', 'median_mean_over_std'], 4)
    """
    modules = [(n, m) for n, m in model.named_modules() if n.endswith(suffix) and isinstance(m, nn.GroupNorm)]
    if not modules:
        raise ParityKitError(f"no nn.GroupNorm ending with {suffix!r} in {type(model).__name__}; pass an RWKV-7 model")
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, name=n: seen.__setitem__(name, args[0].detach()))
               for n, m in modules]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name, module in modules:
        x = seen[name].double()
        groups = x.reshape(-1, module.num_groups, x.shape[-1] // module.num_groups)
        mean, std = groups.mean(-1), groups.std(-1, unbiased=False)
        largest_square = (groups - mean.unsqueeze(-1)).square().amax(-1)
        row: dict[str, Any] = {"module": name, "max_abs_input": float(x.abs().max()),
                               "median_mean_over_std": float((mean.abs() / std).median()),
                               "median_var_over_eps": float((std.square() / module.eps).median())}
        for dt in dtypes:
            row[f"overflow_fraction_{dtype_name(parse_dtype(dt))}"] = float(
                (largest_square > torch.finfo(parse_dtype(dt)).max).double().mean())
        rows.append(row)
    return pd.DataFrame(rows)


def fix_paired_z(evals: Mapping[str, Any], plain_label: str, fix_label: str, *, n_bootstrap: int = 10_000) -> float:
    """Paired z of the fix against the plain run (per-document loss, fixed minus plain: negative where the fix
    scores better).

    >>> from parity_kit.analyses.evaluation import LastWordResult
    >>> a = LastWordResult.from_loglikelihoods([-1.0, -2.0, -1.5, -1.2], n_bootstrap=10, label="a")
    >>> b = LastWordResult.from_loglikelihoods([-0.9, -1.9, -1.4, -1.0], n_bootstrap=10, label="b")
    >>> round(fix_paired_z({"a": a, "b": b}, "a", "b", n_bootstrap=10), 2) < -2
    True
    """
    missing = [label for label in (plain_label, fix_label) if label not in evals]
    if missing:
        raise ParityKitError(f"no evaluation named {missing} (have {list(evals)}); pass measure_variants(...).evals")
    return float(paired_comparison(evals[plain_label], evals[fix_label], n_bootstrap=n_bootstrap)["z"])


def acceptance(*, sweep: ClassSweepSummary, local: LocalErrorSummary, leaves_chosen: list[str], ppl_plain: float,
               ppl_fixed: float, ppl_reference: float, fix_z: float, correct_sweep: ClassSweepSummary,
               suffix: str = "attn.g_norm") -> dict[str, bool]:
    """Each of story 02's targets (:data:`TARGETS`) judged from the measured figures: True where it is met.

    >>> s = ClassSweepSummary("GN", 0.6, 1, pd.DataFrame({"class": ["GN"], "error_removed_fraction": [0.6]}), 0.7, 0.9)
    >>> c = ClassSweepSummary("GN", 0.02, 3, pd.DataFrame({"class": ["L"], "error_removed_fraction": [0.3]}), 0.5, 0.9)
    >>> l = LocalErrorSummary([3.5, 4.0], [5.0, 6.0], "x.attn.g_norm", 4.0)
    >>> acceptance(sweep=s, local=l, leaves_chosen=["m.layers.1.attn.g_norm"], ppl_plain=5.2, ppl_fixed=5.0,
    ...            ppl_reference=5.0, fix_z=2.5, correct_sweep=c)["all_met"]
    True
    """
    toward = abs(ppl_fixed - ppl_reference) < abs(ppl_plain - ppl_reference)
    checks = {
        "groupnorm_ranks_first": sweep.rank == 1,
        "groupnorm_removes_half": sweep.removed >= TARGETS["removed"],
        "g_norm_own_error_3x_floor": min(local.local_floor_ratio) >= TARGETS["local_floor_ratio"],
        "bisection_keeps_g_norm": any(name.endswith(suffix) for name in leaves_chosen),
        "fix_moves_ppl_toward_reference_z2": bool(toward and abs(fix_z) >= TARGETS["paired_z"]),
        "correct_variant_groupnorm_below_10pct": correct_sweep.removed < TARGETS["correct_removed"],
    }
    checks["all_met"] = all(checks.values())
    return checks


def conclude_variants(*, variant: str, correct_variant: str, dtype: str, checks: Mapping[str, bool],
                      sweep: ClassSweepSummary, local: LocalErrorSummary, fix_z: float,
                      correct_sweep: ClassSweepSummary, ranges: pd.DataFrame) -> str:
    """The paragraph that places the candidate variant's figures against the story's targets.

    >>> s = ClassSweepSummary("GN", 0.006, 7, pd.DataFrame({"class": ["L"], "error_removed_fraction": [0.02]}), .1, .5)
    >>> l = LocalErrorSummary([2.6, 2.7], [2.9, 3.0], "x.attn", 3.8)
    >>> r = pd.DataFrame({"max_abs_input": [910.0], "median_mean_over_std": [0.05], "overflow_fraction_fp16": [0.1]})
    >>> text = conclude_variants(variant="as converted", correct_variant="native", dtype="bf16",
    ...     checks={"all_met": False, "groupnorm_ranks_first": False}, sweep=s, local=l, fix_z=0.3, correct_sweep=s,
    ...     ranges=r)
    >>> "not met: groupnorm_ranks_first" in text
    True
    """
    missed = [name for name, ok in checks.items() if name != "all_met" and not ok]
    verdict = "every target is met" if checks.get("all_met") else f"targets not met: {', '.join(missed)}"
    overflow = [c for c in ranges.columns if c.startswith("overflow_fraction_")]
    range_text = "; ".join(f"{c.removeprefix('overflow_fraction_')}: squared deviations overflow in "
                           + (f"{ranges[c].min():.1%}-{ranges[c].max():.1%} of" if ranges[c].max() > 0 else "none of")
                           + " the (token, head) groups" for c in overflow)
    mean_over_std = float(ranges["median_mean_over_std"].median())
    conditioning = ("the mean is smaller than the spread, so centring cancels no bits" if mean_over_std < 1 else
                    f"the mean is {mean_over_std:.2g}x the spread, so centring cancels about "
                    f"{math.log2(mean_over_std):.1f} bits")
    return (
        f"Variant {variant!r} in {dtype}: GroupNorm in fp32 {removes_text(sweep.removed)} the logit error (rank "
        f"{sweep.rank} of {sweep.n_classes}), its local error (fed the reference inputs) is "
        f"{min(local.local_floor_ratio):.2g}-{max(local.local_floor_ratio):.2g}x one {dtype} rounding, the fix's "
        f"paired z against the plain run is {fix_z:.2f}; "
        f"{verdict}. On the correct variant {correct_variant!r} GroupNorm in fp32 {removes_text(correct_sweep.removed)} "
        f"its error ({'below' if correct_sweep.removed < TARGETS['correct_removed'] else 'not below'} 10%: "
        f"{'not the culprit' if correct_sweep.removed < TARGETS['correct_removed'] else 'a contributor'}). "
        f"What the GroupNorm receives: inputs up to |x| = {ranges['max_abs_input'].max():.0f} with median |mean|/std "
        f"{mean_over_std:.2g} ({conditioning}); {range_text}."
    )

