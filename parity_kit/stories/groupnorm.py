"""Story 02 (``parity_kit/notebooks/02_groupnorm_precision.ipynb``): a low-precision RWKV-7 drifts from its reference; is the
GroupNorm of the attention output (``ln_x`` / ``attn.g_norm``) to blame?

The plan: logits error of the candidate against the reference and fp64; the layer-by-layer comparison with its
floors; a sweep keeping one module class at a time in fp32; each module's own vs inherited error; precision
bisection over blocks and leaves; the GroupNorm fix's effect on logits and held-out perplexity. The conclusion
names the GroupNorm's role from those measurements only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from .._util.calling import call_model, model_dtype, primary_tensor
from .._util.paths import data_dir
from ..analyses.calibration import ModelComparison
from ..analyses.evaluation import load_lastword_items
from ..analyses.paired import paired_comparison
from ..analyses.mixed_precision import MasterWeights, run_in_dtype
from ..analyses.precision import BisectionResult, bisect_precision, sweep_by_class
from ..capture import ModuleSpec
from ..comparison import first_divergence, metrics
from ..comparison.floor import CONSISTENT, INHERITED, OWN, describe_verdict, module_diagnosis_counts
from ..dtypes import DtypeLike, parse_dtype
from ..errors import ParityKitError
from ..models.cache import MODELS
from ..present import plots
from .wording import ppl_change, removes_text


#: Suffix of the GroupNorm over heads in FLA's RWKV-7 names (``ln_x`` in the reference code).
GROUPNORM_SUFFIX = "attn.g_norm"


#: Sub-modules of an RWKV-7 layer whose error the layer-by-layer plot follows ("(block)": the layer itself).
RWKV7_KINDS = ("(block)", "attn", "attn.wkv", "attn.g_norm", "attn.o_proj", "ffn")


#: Bisection candidates at two granularities: leaf modules, and attention / feed-forward blocks as wholes
#: (a leaf in fp32 still hands bf16 tensors to the element-wise code around it).
RWKV7_GRANULARITIES: dict[str, ModuleSpec] = {
    "leaves": "*",
    "blocks": [r"re:model\.layers\.\d+\.(attn|ffn|attn_norm|ffn_norm|pre_norm)", "model.embeddings",
               "model.norm", "lm_head"],
}


#: Modules whose local and propagated error the story separates: each layer and its main sub-modules.
RWKV7_REPLAY_MODULES = r"re:model\.layers\.\d+(\.(attn_norm|attn|attn\.wkv|attn\.g_norm|attn\.o_proj|ffn_norm|ffn))?"


_PRIMARY_TENSORS = ("output", "output.0")


def held_out_input_ids(items: Sequence[Any], tokenizer: Callable[..., Mapping[str, Any]], *, skip: int,
                       seq_len: int, bos_id: int = 0) -> list[int]:
    """Token ids of held-out text: the last documents after the first ``skip``, cut to ``seq_len`` tokens.

    Documents (``context + target``) are taken from the end of ``items`` backwards until there are more
    than 8·``seq_len`` characters (a generous bound at about 4 characters per token), joined with spaces,
    tokenised without special tokens and prefixed with ``bos_id``, so the result never overlaps the first
    ``skip`` documents that an evaluation scores.

    >>> from types import SimpleNamespace as Item
    >>> chars = lambda text, add_special_tokens: {"input_ids": [ord(c) for c in text]}
    >>> held_out_input_ids([Item(context="ab", target="c"), Item(context="de", target="f")], chars, skip=1, seq_len=3)
    [0, 100, 101]
    """
    if seq_len < 2:
        raise ParityKitError(f"seq_len={seq_len} leaves no room for text after the BOS token; use seq_len >= 2")
    if skip >= len(items):
        raise ParityKitError(
            f"all {len(items)} documents are reserved for the evaluation (skip={skip}), none is left as held-out "
            "text; lower n_items or use a larger last-word set"
        )
    held_out: list[str] = []
    for item in reversed(items[skip:]):
        held_out.append(item.context + item.target)
        if sum(map(len, held_out)) > 8 * seq_len:
            break
    ids = tokenizer(" ".join(held_out), add_special_tokens=False)["input_ids"]
    return [bos_id, *ids[: seq_len - 1]]


def logits_error_table(logits: Mapping[str, torch.Tensor], *, dtype: str, reference_dtype: str,
                       tolerance: float = 2.0) -> pd.DataFrame:
    """How far the logits of three runs are apart: ``dtype`` vs the reference, ``dtype`` vs fp64, reference vs fp64.

    ``logits`` maps run names to logits: ``dtype``, ``reference_dtype`` and ``"fp64"`` as passed (the
    same spelling). Columns: ``run, reference, rel_rms, max_abs, floor`` (rel_rms of the reference
    rounded to the run's dtype), ``floor_ratio`` and ``verdict``; the rows keep that order.

    >>> ref = torch.linspace(-3, 3, 64, dtype=torch.float64)
    >>> t = logits_error_table({"fp64": ref, "fp32": ref.float(), "bf16": ref.bfloat16()}, dtype="bf16",
    ...                        reference_dtype="fp32")
    >>> t["run"].tolist(), t.loc[1, "verdict"]
    (['bf16', 'bf16', 'fp32'], 'within floor')
    """

    missing = [name for name in (dtype, reference_dtype, "fp64") if name not in logits]
    if missing:
        raise ParityKitError(f"logits has no run named {missing} (has {list(logits)}); pass the logits of the "
                             f"{dtype} run, the {reference_dtype} run and the fp64 run under those names")
    rows = []
    for run, ref_name in ((dtype, reference_dtype), (dtype, "fp64"), (reference_dtype, "fp64")):
        m = metrics.all_metrics(logits[ref_name], logits[run], parse_dtype(run))
        rows.append({"run": run, "reference": ref_name, "rel_rms": m["rel_rms"], "max_abs": m["max_abs"],
                     "floor": m["floor"], "floor_ratio": m["rel_rms"] / m["floor"] if m["floor"] else float("nan"),
                     "verdict": metrics.verdict(m["rel_rms"], m["floor"], tolerance)})
    return pd.DataFrame(rows)


def primary_outputs(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a comparison table that hold a module's primary output (``output`` or ``output.0``).

    >>> primary_outputs(pd.DataFrame({"tensor": ["output.0", "output.1", "output"]})).index.tolist()
    [0, 2]
    """
    if "tensor" not in table.columns:
        raise ParityKitError("the table has no 'tensor' column; pass a pk.compare or pk.local_vs_propagated table")
    return table[table["tensor"].isin(_PRIMARY_TENSORS)]


def kinds_present(table: pd.DataFrame, kinds: Sequence[str] = RWKV7_KINDS) -> list[str]:
    """Those of ``kinds`` (module names below ``layers.<i>``; "(block)" = the layer itself) the table holds.

    >>> kinds_present(pd.DataFrame({"module": ["model.layers.0.attn", "model.layers.0", "model.norm"]}))
    ['(block)', 'attn']
    """
    below_layer = table["module"].str.replace(r"^.*layers\.\d+\.?", "", regex=True).replace("", "(block)")
    present = set(below_layer)
    return [kind for kind in kinds if kind in present]


def modules_ending_with(table: pd.DataFrame, suffix: str = GROUPNORM_SUFFIX) -> pd.DataFrame:
    """The rows whose ``module`` ends with ``suffix`` (by default every layer's GroupNorm).

    >>> modules_ending_with(pd.DataFrame({"module": ["l.0.attn.g_norm", "l.0.attn"]}))["module"].tolist()
    ['l.0.attn.g_norm']
    """
    return table[table["module"].str.endswith(suffix)]


def first_above_floor_text(primary: pd.DataFrame, threshold: float = 2.0) -> str:
    """One line naming the first module, in execution order, whose free-run error exceeds ``threshold`` × its
    (calibrated) floor, or "none".

    >>> t = pd.DataFrame({"order": [0, 1], "module": ["a", "b"], "rel_rms": [1e-3, 2e-2], "floor_ratio": [1.0, 9.0],
    ...                   "verdict": ["within floor", "above floor ×9"]})
    >>> first_above_floor_text(t)
    'first module (execution order) whose free-run error is above 2x its floor: b (0.02, above floor ×9)'
    """

    first = first_divergence(primary, metric="floor_ratio", threshold=threshold)
    found = "none" if first is None else f"{first['module']} ({first['rel_rms']:.3g}, {first['verdict']})"
    return f"first module (execution order) whose free-run error is above {threshold:g}x its floor: {found}"


def join_sweeps(sweep: pd.DataFrame, sweep_vs_fp64: pd.DataFrame) -> pd.DataFrame:
    """``sweep`` with a column ``error_removed_vs_fp64``: the same class's removed fraction in ``sweep_vs_fp64``.

    >>> a = pd.DataFrame({"class": ["x", "y"], "error_removed_fraction": [0.5, 0.1]})
    >>> join_sweeps(a, a.iloc[::-1].assign(error_removed_fraction=[0.2, 0.4]))["error_removed_vs_fp64"].tolist()
    [0.4, 0.2]
    """
    missing = sorted(set(sweep["class"]) - set(sweep_vs_fp64["class"]))
    if missing:
        raise ParityKitError(f"classes {missing} are missing from the fp64 sweep; run both sweeps on the same model")
    joined = sweep.copy()
    joined["error_removed_vs_fp64"] = (
        sweep_vs_fp64.set_index("class").loc[sweep["class"], "error_removed_fraction"].to_numpy())
    return joined


@dataclass
class ClassSweepSummary:
    """Where one module class stands in a :func:`sweep_by_class` table.

    ``rank`` counts from 1 among the class rows (sorted by the error they remove); ``all_classes_removed``
    and ``whole_model_removed`` come from the context rows "all listed classes" and "whole model".
    """

    class_name: str
    removed: float
    rank: int
    class_rows: pd.DataFrame = field(repr=False)
    all_classes_removed: float
    whole_model_removed: float

    @property
    def n_classes(self) -> int:
        return len(self.class_rows)

    @property
    def top_class(self) -> str:
        return str(self.class_rows.iloc[0]["class"])

    @property
    def top_removed(self) -> float:
        return float(self.class_rows.iloc[0]["error_removed_fraction"])

    def describe(self) -> str:
        """One line: the class's share, its rank and the top class."""
        return (f"{self.class_name}: removes {self.removed:.1%} of the error (rank {self.rank} of {self.n_classes} "
                f"classes); top class: {self.top_class} ({self.top_removed:.1%})")


def summarise_class_sweep(sweep: pd.DataFrame, class_name: str) -> ClassSweepSummary:
    """The share of the output error that keeping ``class_name`` in high precision removes, and its rank.

    >>> sweep = pd.DataFrame({"kind": ["context"] * 3 + ["class"] * 2,
    ...     "class": ["nothing", "all listed", "whole model", "Linear", "GroupNorm"],
    ...     "error_removed_fraction": [0.0, 0.7, 0.9, 0.5, 0.1]})
    >>> summarise_class_sweep(sweep, "GroupNorm").describe()
    'GroupNorm: removes 10.0% of the error (rank 2 of 2 classes); top class: Linear (50.0%)'
    """
    class_rows = sweep[sweep["kind"] == "class"].reset_index(drop=True)
    matches = class_rows.index[class_rows["class"] == class_name]
    if len(matches) == 0:
        raise ParityKitError(f"class {class_name!r} is not among the swept classes {class_rows['class'].tolist()}; "
                             "pass the class name of a module the sweep covered")
    context = sweep[sweep["kind"] == "context"]
    if len(context) < 3:
        raise ParityKitError("the sweep lacks its context rows (nothing / all listed classes / whole model); "
                             "pass the table pk.sweep_by_class returned")
    # The context rows come in sweep_by_class's order: nothing, all listed classes, whole model.
    return ClassSweepSummary(
        class_name=class_name, removed=float(class_rows.loc[matches[0], "error_removed_fraction"]),
        rank=int(matches[0]) + 1, class_rows=class_rows,
        all_classes_removed=float(context.iloc[1]["error_removed_fraction"]),
        whole_model_removed=float(context.iloc[2]["error_removed_fraction"]),
    )


@dataclass
class LocalErrorSummary:
    """The GroupNorm rows of a local-vs-propagated table, and the module with the largest local error.

    Ratios are errors over each row's own floor, one per GroupNorm instance in execution order.
    """

    local_floor_ratio: list[float]
    free_floor_ratio: list[float]
    largest_local_module: str
    largest_local_ratio: float

    @property
    def inherited(self) -> bool:
        """True when the median free-run ratio exceeds twice the median local ratio."""
        return bool(pd.Series(self.free_floor_ratio).median() > 2 * pd.Series(self.local_floor_ratio).median())

    def describe(self) -> str:
        """One line: the GroupNorm's local error range and the largest local error."""
        local = pd.Series(self.local_floor_ratio)
        return (f"GroupNorm local error: {local.min():.2g}-{local.max():.2g} x one rounding; largest local error "
                f"relative to one rounding: {self.largest_local_module} ({self.largest_local_ratio:.3g} x)")


def summarise_local_errors(table: pd.DataFrame, suffix: str = GROUPNORM_SUFFIX,
                           metric: str = "rel_rms") -> LocalErrorSummary:
    """Local and free-run error over the floor for the modules ending with ``suffix``, and the module with the
    largest local error over its floor, from a :func:`parity_kit.local_vs_propagated` table (primary outputs).

    >>> t = pd.DataFrame({"module": ["l.0.attn", "l.0.attn.g_norm"], "local_rel_rms": [4e-2, 1e-2],
    ...                   "free_rel_rms": [5e-2, 6e-2], "floor": [1e-2, 1e-2]})
    >>> s = summarise_local_errors(t)
    >>> s.local_floor_ratio, s.largest_local_module, s.inherited
    ([1.0], 'l.0.attn', True)
    """
    local, free = f"local_{metric}", f"free_{metric}"
    missing = sorted({"module", local, free, "floor"} - set(table.columns))
    if missing:
        raise ParityKitError(f"the table lacks columns {missing}; pass a pk.local_vs_propagated table "
                             f"computed with metric={metric!r}")
    rows = modules_ending_with(table, suffix)
    if rows.empty:
        raise ParityKitError(f"no module ending with {suffix!r} in the table; replay modules that include it")
    ranked = table.assign(ratio=table[local] / table["floor"]).sort_values("ratio", ascending=False)
    return LocalErrorSummary(
        local_floor_ratio=[float(v) for v in rows[local] / rows["floor"]],
        free_floor_ratio=[float(v) for v in rows[free] / rows["floor"]],
        largest_local_module=str(ranked.iloc[0]["module"]), largest_local_ratio=float(ranked.iloc[0]["ratio"]),
    )


def groupnorm_fix_variants(model_low: nn.Module, master_model: nn.Module, bisection_chosen: Sequence[str],
                           dtype: str) -> dict[str, tuple[list[str], nn.Module | None]]:
    """The variants story 02 measures: label → (modules kept in fp32, master weights or None), in this order:
    plain ``dtype``; every ``nn.GroupNorm`` in fp32 with up-cast weights; the same with ``master_model``'s
    weights (the fix); the bisection's set in fp32 with master weights.

    >>> net = nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4))
    >>> [(label, modules) for label, (modules, _) in groupnorm_fix_variants(net, net, ["0"], "bf16").items()][1:3]
    [('bf16 + GroupNorm fp32 (up-cast weights)', ['1']), ('bf16 + GroupNorm fp32 (fp32 master weights)', ['1'])]
    """
    groupnorms = [n for n, m in model_low.named_modules() if isinstance(m, nn.GroupNorm)]
    if not groupnorms:
        raise ParityKitError(f"{type(model_low).__name__} has no nn.GroupNorm module; this story needs a model with "
                             "a GroupNorm over heads (e.g. RWKV-7's attn.g_norm)")
    return {
        dtype: ([], None),
        f"{dtype} + GroupNorm fp32 (up-cast weights)": (groupnorms, None),
        f"{dtype} + GroupNorm fp32 (fp32 master weights)": (groupnorms, master_model),
        f"{dtype} + bisection set fp32 ({len(bisection_chosen)} blocks)": (list(bisection_chosen), master_model),
    }


@dataclass
class VariantMeasurements:
    """What :func:`measure_variants` measured: ``table`` (one row per variant), and per variant label its
    last-word evaluation (``evals``) and its logits on the analysis input (``logits``)."""

    table: pd.DataFrame
    evals: dict[str, Any]
    logits: dict[str, torch.Tensor] = field(repr=False)


def measure_variants(
    model_low: nn.Module,
    variants: Mapping[str, tuple[Sequence[str], MasterWeights]],
    inputs: Any,
    reference_logits: Mapping[str, torch.Tensor],
    *,
    error_low: float,
    evaluate: Callable[[nn.Module, str], Any],
    reference_eval: Any,
    high_dtype: DtypeLike = "fp32",
    n_bootstrap_paired: int = 10_000,
) -> VariantMeasurements:
    """Run ``model_low`` once per variant (modules in ``high_dtype`` with optional master weights, as
    :func:`run_in_dtype`) and measure its logits and its last-word evaluation.

    ``reference_logits``: name → logits on ``inputs``; the first entry is the reference that
    ``removed_vs_plain`` (1 − error / ``error_low``, the plain low-precision error) is judged against.
    ``evaluate(model, label)`` returns a :class:`parity_kit.analyses.evaluation.LastWordResult` and runs inside the
    variant's precision setting; each result is paired with ``reference_eval``
    (:func:`parity_kit.paired_comparison`). Table columns: ``variant, modules_in_fp32``,
    ``rel_rms_vs_<name>`` and ``verdict_vs_<name>`` per reference, ``removed_vs_plain, ppl, ppl_stderr,
    acc, ppl_minus_ref, paired_z``.

    >>> from parity_kit.analyses.evaluation import LastWordResult
    >>> _ = torch.manual_seed(0)
    >>> ref = nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8)).eval()
    >>> low, x = __import__("copy").deepcopy(ref).bfloat16(), torch.randn(3, 4)
    >>> ev = lambda model, label: LastWordResult.from_loglikelihoods([-1.0, -2.0, -1.5], n_bootstrap=10, label=label)
    >>> logits = {"fp32": ref(x).detach()}
    >>> m = measure_variants(low, {"plain": ([], None), "gn": (["1"], ref)}, x.bfloat16(), logits,
    ...     error_low=__import__("parity_kit").metrics.rel_rms(logits["fp32"], low(x.bfloat16())),
    ...     evaluate=ev, reference_eval=ev(ref, "fp32"), n_bootstrap_paired=10)
    >>> m.table["variant"].tolist(), float(m.table.loc[0, "removed_vs_plain"])
    (['plain', 'gn'], 0.0)
    """

    if not reference_logits:
        raise ParityKitError("reference_logits is empty; pass {name: logits} with the main reference first")
    low = model_dtype(model_low)
    main_reference = next(iter(reference_logits))
    rows, evals, variant_logits = [], {}, {}
    for label, (modules, master) in variants.items():
        fixed = run_in_dtype(model_low, list(modules), high_dtype, master_weights=master) if modules \
            else contextlib.nullcontext()
        with fixed:
            with torch.no_grad():
                out = variant_logits[label] = primary_tensor(call_model(model_low, inputs), label)
            evals[label] = evaluate(model_low, label)
        row: dict[str, Any] = {"variant": label, "modules_in_fp32": len(modules)}
        for ref_name, ref_out in reference_logits.items():
            m = metrics.all_metrics(ref_out, out, low)
            row[f"rel_rms_vs_{ref_name}"] = m["rel_rms"]
            row[f"verdict_vs_{ref_name}"] = metrics.verdict(m["rel_rms"], m["floor"])
        row["removed_vs_plain"] = 1 - row[f"rel_rms_vs_{main_reference}"] / error_low
        paired = paired_comparison(reference_eval, evals[label], n_bootstrap=n_bootstrap_paired)
        row.update(ppl=evals[label].ppl, ppl_stderr=evals[label].ppl_stderr, acc=evals[label].acc,
                   ppl_minus_ref=evals[label].ppl - reference_eval.ppl, paired_z=paired["z"])
        rows.append(row)
    return VariantMeasurements(table=pd.DataFrame(rows), evals=evals, logits=variant_logits)


@dataclass(frozen=True)
class GroupNormVerdict:
    """The judgements story 02's conclusion states, as keywords; the prose is rendered from them.

    ``role``: "main culprit" (the GroupNorm class ranks first and removes at least half of the error),
    "contributor" (it removes at least a fifth) or "minor"; ``error_origin``: "inherited" or "own"
    (:attr:`LocalErrorSummary.inherited`); ``indistinguishable``: neither the plain nor the fixed run's
    last-word score differs from the reference's by paired |z| >= 2 (False when a z is unknown);
    ``upcast_bit_identical``: GroupNorm arithmetic in fp32 on the same weights leaves the logits unchanged.
    """

    role: str
    error_origin: str
    indistinguishable: bool
    upcast_bit_identical: bool


def judge_groupnorm_precision(sweep: ClassSweepSummary, local: LocalErrorSummary, fix_table: pd.DataFrame,
                              upcast_logits_change: float) -> GroupNormVerdict:
    """Story 02's judgements (the arguments of :func:`conclude_groupnorm_precision` of those names).

    >>> s = ClassSweepSummary("GN", 0.6, 1, pd.DataFrame({"class": ["GN"], "error_removed_fraction": [0.6]}), .7, .9)
    >>> fix = pd.DataFrame({"paired_z": [-2.5, 0.0, 0.4]})
    >>> judge_groupnorm_precision(s, LocalErrorSummary([1.0], [5.0], "x", 1.0), fix, 0.0)
    GroupNormVerdict(role='main culprit', error_origin='inherited', indistinguishable=False, upcast_bit_identical=True)
    """
    if sweep.rank == 1 and sweep.removed >= 0.5:
        role = "main culprit"
    else:
        role = "contributor" if sweep.removed >= 0.2 else "minor"
    z = max(abs(fix_table.iloc[0]["paired_z"]), abs(fix_table.iloc[2]["paired_z"]))
    return GroupNormVerdict(role=role, error_origin="inherited" if local.inherited else "own",
                            indistinguishable=bool(z < 2), upcast_bit_identical=upcast_logits_change == 0)


_ROLE_TEXT = {"main culprit": "the main culprit", "contributor": "a contributor but not the whole story",
              "minor": "not the main culprit"}


def conclude_groupnorm_precision(
    *,
    model: str,
    dtype: str,
    reference_dtype: str,
    logit_table: pd.DataFrame,
    sweep: ClassSweepSummary,
    local: LocalErrorSummary,
    blocks: BisectionResult,
    leaves: BisectionResult,
    fix_table: pd.DataFrame,
    reference_ppl: float,
    reference_ppl_stderr: float,
    upcast_logits_change: float,
    verdict: ModelComparison | None = None,
) -> tuple[str, dict[str, Any]]:
    """Story 02's conclusion and every number it relies on, from the notebook's measurements.

    ``logit_table``: :func:`logits_error_table`. ``sweep``: :func:`summarise_class_sweep` for the
    GroupNorm class. ``local``: :func:`summarise_local_errors`. ``blocks`` / ``leaves``: the bisections
    over blocks and over leaf modules. ``fix_table``: :attr:`VariantMeasurements.table` for
    :func:`groupnorm_fix_variants` (row 0 plain, row 2 the GroupNorm fix with master weights).
    ``upcast_logits_change``: rel_rms between the plain logits and those with GroupNorm arithmetic in
    fp32 on the same weights. The GroupNorm is called the main culprit when it ranks first and removes at
    least half of the error, a contributor when it removes at least a fifth, and not the main culprit otherwise.
    ``verdict``: the layer-by-layer :func:`parity_kit.compare_models` (every module judged by the calibrated floor).

    >>> text, figures = conclude_groupnorm_precision(model="tiny-rwkv7", dtype="bf16", reference_dtype="fp32",
    ...     logit_table=logit_table, sweep=sweep, local=local, blocks=blocks, leaves=leaves, fix_table=fix_table,
    ...     reference_ppl=4.1, reference_ppl_stderr=0.1, upcast_logits_change=0.0)  # doctest: +SKIP
    """
    if len(logit_table) < 3 or len(fix_table) < 3:
        raise ParityKitError("logit_table needs its three rows (logits_error_table) and fix_table at least the plain, "
                             "up-cast and master-weight rows (groupnorm_fix_variants); pass the tables the story built")
    error_low = float(logit_table.loc[0, "rel_rms"])
    plain, gn_fix = fix_table.iloc[0], fix_table.iloc[2]
    local_ratio, free_ratio = pd.Series(local.local_floor_ratio), pd.Series(local.free_floor_ratio)
    judgement = judge_groupnorm_precision(sweep, local, fix_table, upcast_logits_change)
    z_note = f"; neither run is distinguishable from {reference_dtype} on this set, |z| < 2" \
        if judgement.indistinguishable else ""
    parts = [
        f"In {model}, {dtype} logits differ from {reference_dtype} by rel_rms {error_low:.3g} "
        f"({logit_table.loc[0, 'floor_ratio']:.3g}x the {dtype} rounding floor of the logits; "
        f"{reference_dtype} itself is {logit_table.loc[2, 'rel_rms']:.2g} from fp64).",
        f"GroupNorm ({sweep.class_name}, attn.g_norm) is {_ROLE_TEXT[judgement.role]}: keeping it in "
        f"fp32 {removes_text(sweep.removed)} the output error (class rank {sweep.rank} of {sweep.n_classes}; "
        f"{sweep.top_class} {removes_text(sweep.top_removed)} it). Its outputs are {free_ratio.min():.2g}-"
        f"{free_ratio.max():.2g}x one {dtype} rounding in the free run but {local_ratio.min():.2g}-"
        f"{local_ratio.max():.2g}x when fed the reference inputs, so "
        f"{'most of the error it shows is inherited' if judgement.error_origin == 'inherited' else 'at least half of the error it shows is its own'}; "
        f"the largest local error relative to one rounding is {local.largest_local_module}'s "
        f"({local.largest_local_ratio:.2g}x).",
        f"All leaf modules in fp32 together remove {sweep.all_classes_removed:.1%} of the output error, the whole "
        f"model (logits still rounded to {dtype}) {sweep.whole_model_removed:.1%}: the difference is made outside "
        f"the leaf modules, in the element-wise code of the blocks and the {dtype} hand-offs between modules.",
        f"Bisection over blocks keeps {len(blocks.chosen)} of {blocks.n_candidates} in fp32 "
        f"({', '.join(blocks.chosen) or 'none'}; {blocks.curve.iloc[-1]['param_fraction']:.1%} of parameters, "
        f"{blocks.passes} passes) to reach rel_rms {blocks.error_chosen:.3g}; over leaves it keeps "
        f"{len(leaves.chosen)} of {leaves.n_candidates} ({leaves.passes} passes).",
        f"GroupNorm arithmetic in fp32 with the same bf16 weights moves the logits by rel_rms "
        f"{upcast_logits_change:.2g}{' (bit-identical on this input)' if judgement.upcast_bit_identical else ''}. "
        f"The GroupNorm fix (fp32 with fp32 master weights) changes the logits error by "
        f"{-gn_fix['removed_vs_plain']:+.1%} and {ppl_change(plain['ppl'], gn_fix['ppl'])} "
        f"({reference_dtype}: {reference_ppl:.4f} ± {reference_ppl_stderr:.4f}; paired z vs "
        f"{reference_dtype}: {plain['paired_z']:.2f} -> {gn_fix['paired_z']:.2f}"
        f"{z_note}).",
    ]
    figures = _groupnorm_figures(logit_table=logit_table, sweep=sweep, local=local, blocks=blocks, leaves=leaves,
                                 fix_table=fix_table, reference_dtype=reference_dtype, reference_ppl=reference_ppl,
                                 reference_ppl_stderr=reference_ppl_stderr,
                                 upcast_logits_change=upcast_logits_change)
    if verdict is not None:
        text, verdict_numbers = calibrated_verdict_part(verdict, dtype)
        parts.insert(1, text)
        figures.update(verdict_numbers)
    return " ".join(parts), figures


def calibrated_verdict_part(result: ModelComparison, label: str) -> tuple[str, dict[str, Any]]:
    """The sentence and figures of the layer-by-layer calibrated verdict: the run's verdict, and how the
    GroupNorms (every ``attn.g_norm``) read, with their own error over its floor."""
    ok = result.table[result.table["status"] == "ok"]
    norms = modules_ending_with(primary_outputs(ok))
    counts = module_diagnosis_counts(norms)
    own = norms["own_floor_ratio"].astype(float).dropna()
    spread = f"{own.min():.2g}-{own.max():.2g}x" if len(own) else "not measured"
    text = (f"Module by module against the calibrated floor (what rounding alone produces at each module): "
            f"{describe_verdict(result.verdict, label)} Its {len(norms)} GroupNorms: {counts[CONSISTENT]} consistent "
            f"with rounding, {counts[INHERITED]} inherited, {counts[OWN]} with own error above the floor (own error "
            f"{spread} its floor).")
    figures = {**result.figures("verdict_"), "groupnorm_n_modules": len(norms),
               "groupnorm_n_consistent": counts[CONSISTENT], "groupnorm_n_inherited": counts[INHERITED],
               "groupnorm_n_own_error_above_floor": counts[OWN], "groupnorm_own_floor_ratio": own.tolist()}
    return text, figures


def _groupnorm_figures(*, logit_table: pd.DataFrame, sweep: ClassSweepSummary, local: LocalErrorSummary,
                       blocks: BisectionResult, leaves: BisectionResult, fix_table: pd.DataFrame, reference_dtype: str,
                       reference_ppl: float, reference_ppl_stderr: float,
                       upcast_logits_change: float) -> dict[str, Any]:
    """Every number :func:`conclude_groupnorm_precision` states, under the findings file's names."""
    error_low = float(logit_table.loc[0, "rel_rms"])
    figures: dict[str, Any] = {
        "logits_rel_rms_vs_ref": error_low,
        "logits_rel_rms_vs_fp64": float(logit_table.loc[1, "rel_rms"]),
        "ref_vs_fp64_rel_rms": float(logit_table.loc[2, "rel_rms"]),
        "logits_floor": float(logit_table.loc[0, "floor"]),
        "groupnorm_error_removed": sweep.removed,
        "groupnorm_class_rank": sweep.rank,
        "n_classes": sweep.n_classes,
        "top_class_error_removed": sweep.top_removed,
        "all_leaf_classes_error_removed": sweep.all_classes_removed,
        "whole_model_error_removed": sweep.whole_model_removed,
        "class_error_removed": dict(zip(sweep.class_rows["class"],
                                        sweep.class_rows["error_removed_fraction"].astype(float))),
        "groupnorm_local_floor_ratio": list(local.local_floor_ratio),
        "groupnorm_free_floor_ratio": list(local.free_floor_ratio),
        "largest_local_floor_ratio": local.largest_local_ratio,
        "groupnorm_upcast_logits_change": upcast_logits_change,
        "bisection_blocks_chosen": len(blocks.chosen),
        "bisection_blocks_candidates": blocks.n_candidates,
        "bisection_blocks_passes": blocks.passes,
        "bisection_blocks_pass_bound": blocks.pass_bound,
        "bisection_blocks_error": blocks.error_chosen,
        "bisection_leaves_chosen": len(leaves.chosen),
        "bisection_leaves_candidates": leaves.n_candidates,
        "bisection_leaves_passes": leaves.passes,
        "bisection_leaves_error": leaves.error_chosen,
        "ppl_reference": reference_ppl,
        "ppl_reference_stderr": reference_ppl_stderr,
        "ppl_by_variant": dict(zip(fix_table["variant"], fix_table["ppl"].astype(float))),
        "logits_rel_rms_by_variant": dict(zip(fix_table["variant"],
                                              fix_table[f"rel_rms_vs_{reference_dtype}"].astype(float))),
        "paired_z_by_variant": dict(zip(fix_table["variant"], fix_table["paired_z"].astype(float))),
    }
    return figures


def explore_precision(
    model: str,
    *,
    dtype: DtypeLike = "bf16",
    reference_dtype: DtypeLike = "fp32",
    device: str = "cpu",
    seq_len: int = 128,
    removed: float = 0.5,
    candidates: ModuleSpec = "blocks",
    skip_items: int = 150,
) -> list[Any]:
    """The story-02 panel's analysis: class sweep and bisection of ``model`` in ``dtype`` against ``reference_dtype``.

    Models come from the shared cache (``pk.ui.MODELS``); the input is ``seq_len`` tokens of held-out
    text after the first ``skip_items`` last-word documents, as in the notebook; the bisection looks for
    the fewest modules that remove the fraction ``removed`` of the error fp32 can remove. Returns the
    sweep table and plot, the bisection summary, and its error/cost curve as a table and a plot.
    ``candidates`` is ``"blocks"`` or ``"leaves"`` (:data:`RWKV7_GRANULARITIES`) or any module pattern.

    >>> out = explore_precision("tiny-rwkv7", seq_len=16)
    >>> [type(x).__name__ for x in out]
    ['DataFrame', 'Figure', 'str', 'DataFrame', 'Figure']
    """
    if isinstance(candidates, str):
        candidates = RWKV7_GRANULARITIES.get(candidates, candidates)
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ParityKitError(f"seq_len={seq_len!r}: use at least 2 tokens")
    reference, tokenizer = MODELS.load(model, reference_dtype, device)
    candidate, _ = MODELS.load(model, dtype, device)
    items = load_lastword_items(data_dir() / "eval" / "lastword.jsonl")
    ids = held_out_input_ids(items, tokenizer, skip=skip_items, seq_len=seq_len)
    inputs = {"input_ids": torch.tensor([ids], device=device), "use_cache": False}
    sweep = sweep_by_class(candidate, reference, inputs, master_model=reference, progress=False)
    with torch.no_grad():
        reference_logits = reference(**inputs).logits.detach()
    result = bisect_precision(candidate, reference_logits, inputs, candidates=candidates, target_removed=removed,
                              master_model=reference, progress=False)
    return [sweep, plots.class_sweep(sweep), result.summary(), result.curve, plots.bisection_curve(result)]
