"""Calibrated verdicts: the floor that honest arithmetic produces at each module, measured on rounding-only runs,
and two models compared and judged against it (the rule itself is :mod:`parity_kit.comparison.floor`).

- :func:`rounding_only` — a copy of a model that computes in a dtype's accumulation precision while its
  weights, and every module's floating inputs and outputs, are rounded to that dtype: what a module that
  computes its function well from rounded values produces;
- :func:`calibrate_floor` — for each module, the free-run error and the own error (the module alone on the
  baseline's inputs) of such runs against the same model in fp64: a :class:`parity_kit.comparison.floor.Floor`;
- :func:`compare_models` — record both models, compare, measure each module's own error by replaying it on the
  reference inputs, calibrate the floor on the wider run's model, judge every row, and recompute each culprit
  in fp64 in both runs to tell a module that computes differently from a precision-sensitive one.

>>> import copy, torch
>>> from parity_kit.testing import tiny_llama
>>> ref = tiny_llama(layers=1)
>>> result = compare_models(ref, copy.deepcopy(ref).to(torch.bfloat16), torch.tensor([[1, 5, 9, 3]]),
...                         modules="model.layers.*", show_progress=False)
>>> result.verdict["verdict"]
'healthy'
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .._util.calling import call_model, check_token_ids, model_device, model_dtype, prepare_inputs
from .._util.trees import map_tensors
from ..capture import ModuleSpec, record
from ..comparison import compare
from ..comparison.floor import (COMPUTES_DIFFERENTLY, PRECISION_SENSITIVE, Floor, FloorComponent, apply_floor,
                                check_tolerance, culprits, describe_verdict, dtype_pair, narrower, run_verdict,
                                verdict_figures)
from ..dtypes import DtypeLike, dtype_name, parse_dtype
from ..errors import ParityKitError
from ..recording import Recording
from .mixed_precision import run_in_dtype
from .replay import local_vs_propagated

_FP64 = torch.float64


def accumulation_dtype(dtype: DtypeLike) -> torch.dtype:
    """The precision a correct kernel of ``dtype`` computes in before it rounds its result: fp32 for fp16/bf16
    (their matrix products and reductions accumulate in fp32), the dtype itself otherwise.

    >>> accumulation_dtype("bf16"), accumulation_dtype("fp64")
    (torch.float32, torch.float64)
    """
    target = parse_dtype(dtype)
    return torch.float32 if target in (torch.float16, torch.bfloat16) else target


def _rounder(dtype: torch.dtype) -> Callable[[str, torch.Tensor], torch.Tensor]:
    def rounded(_name: str, t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).to(t.dtype) if t.is_floating_point() and t.dtype != dtype else t
    return rounded


@contextlib.contextmanager
def rounding_only(model: nn.Module, dtype: DtypeLike) -> Iterator[nn.Module]:
    """A rounding-only run of ``model`` in ``dtype``: a copy that computes in :func:`accumulation_dtype` with its
    parameters and floating buffers rounded to ``dtype`` and, around every module, its floating inputs and
    outputs rounded to ``dtype`` (the values stay in the accumulation dtype). ``model`` is left untouched; the
    copy's hooks are removed on exit.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Linear(3, 3)
    >>> with rounding_only(net, "bf16") as sim:
    ...     y = sim(torch.randn(2, 3))
    >>> bool((y == y.bfloat16().float()).all()), sim.weight.dtype
    (True, torch.float32)
    """
    if not isinstance(model, nn.Module):
        raise ParityKitError(f"rounding_only needs a torch.nn.Module, got {type(model).__name__} {model!r:.40}")
    target = parse_dtype(dtype)
    rounded = _rounder(target)
    sim = copy.deepcopy(model).to(accumulation_dtype(target))
    with torch.no_grad():
        for tensor in (*sim.parameters(), *sim.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(target).to(tensor.dtype))
    handles = []
    try:
        for module in sim.modules():
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs: (map_tensors(args, rounded), map_tensors(kwargs, rounded)), with_kwargs=True))
            handles.append(module.register_forward_hook(lambda _m, _args, output: map_tensors(output, rounded)))
        yield sim
    finally:
        for handle in handles:
            handle.remove()


def without_cache(model: nn.Module, inputs: Any) -> Any:
    """``inputs`` on the model's device, with ``use_cache=False`` where the model's forward takes it: a replayed
    module would otherwise update its key/value cache (or recurrent state) a second time and read it back.

    >>> from parity_kit.testing import tiny_llama
    >>> sorted(without_cache(tiny_llama(layers=1), torch.tensor([[1, 2]])))
    ['input_ids', 'use_cache']
    """
    if not callable(inputs) or isinstance(inputs, torch.Tensor):
        device = model_device(model)
        inputs = map_tensors(inputs, lambda _name, t: t.to(device))
    params = inspect.signature(model.forward).parameters
    if "use_cache" not in params:
        return inputs
    if isinstance(inputs, torch.Tensor):
        first = next(iter(params))
        return {first: inputs, "use_cache": False}
    if isinstance(inputs, Mapping) and "use_cache" not in inputs:
        return {**inputs, "use_cache": False}
    return inputs


def _record_with_inputs(model: nn.Module, inputs: Any, modules: ModuleSpec) -> Recording:
    with torch.no_grad(), record(model, modules, mode="tensors", inputs=True, memory_budget=None) as rec:
        call_model(model, prepare_inputs(model, inputs))
    return rec


def calibrate_floor(model: nn.Module, inputs: Any, dtypes: tuple[DtypeLike, DtypeLike], *,
                    modules: ModuleSpec = "*", keyed_by: str = "reference") -> Floor:
    """The rounding floor of every selected module for two runs in ``dtypes`` (reference's, candidate's), measured
    on ``model`` — the *wider* run's model, whose weights are the more precise ones (``keyed_by`` says whose
    names those are, "reference" or "candidate").

    The baseline is ``model`` in fp64. For each run's dtype, a :func:`rounding_only` run is compared with it by
    :func:`parity_kit.local_vs_propagated`: its free-run error is that run's accumulated rounding at each module,
    its local error the module's own rounding on the baseline's inputs. The two runs round independently, so
    their errors add in quadrature (fp64 adds nothing; two runs in one dtype count twice). Both become the
    ``rounding`` component of the returned :class:`~parity_kit.comparison.floor.Floor`, in rel_rms.

    >>> from parity_kit.testing import tiny_llama
    >>> floor = calibrate_floor(tiny_llama(layers=1), torch.tensor([[1, 2, 3]]), ("fp32", "bf16"),
    ...                         modules="model.layers.0.mlp")
    >>> floor.free(("model.layers.0.mlp", 0, "output")) > 0
    True
    """
    if not isinstance(model, nn.Module):
        raise ParityKitError(f"calibrate_floor needs the model (an nn.Module), not {type(model).__name__}")
    kinds = [parse_dtype(d) for d in dtypes]
    check_token_ids([model], inputs)
    if len(kinds) != 2:
        raise ParityKitError(f"dtypes={dtypes!r}: give the two runs' dtypes, e.g. ('fp32', 'bf16')")
    inputs = without_cache(model, inputs)
    baseline = copy.deepcopy(model).to(_FP64).eval()
    base_rec = _record_with_inputs(baseline, inputs, modules)
    if not base_rec.calls:
        raise ParityKitError(f"modules={modules!r} selected no module that ran; pick modules the forward calls")
    squares: dict[str, dict[tuple[str, int, str], float]] = {"free": {}, "own": {}}
    for dtype, runs in _rounding_runs(kinds).items():
        with rounding_only(model, dtype) as sim:
            table = local_vs_propagated(base_rec, sim.eval(), inputs)
        for row in table[table["status"].isin(["ok", "inputs not replayable"])].itertuples():
            key = (row.module, int(row.call), row.tensor)
            for kind, value in (("free", row.free_rel_rms), ("own", row.local_rel_rms)):
                if not math.isnan(value):  # no own floor where the module cannot be replayed
                    squares[kind][key] = squares[kind].get(key, 0.0) + runs * float(value) ** 2
    component = FloorComponent(
        "rounding", "rounding-only runs in " + " and ".join(dtype_name(k) for k in kinds) + " against fp64 "
        "(weights and every module's inputs and outputs rounded, computing in the accumulation precision)",
        free={k: math.sqrt(v) for k, v in squares["free"].items()},
        own={k: math.sqrt(v) for k, v in squares["own"].items()})
    return Floor(dtype_pair(*kinds), keyed_by, "rel_rms", {"rounding": component})


def _rounding_runs(kinds: list[torch.dtype]) -> dict[torch.dtype, int]:
    """dtype → how many of the two runs round in it (fp64, the baseline itself, rounds nothing)."""
    runs: dict[torch.dtype, int] = {}
    for kind in kinds:
        if kind != _FP64:
            runs[kind] = runs.get(kind, 0) + 1
    return runs


@dataclass
class ModelComparison:
    """What :func:`compare_models` found. ``table`` is :func:`parity_kit.compare`'s table judged by the calibrated
    rule (:func:`parity_kit.comparison.floor.apply_floor`); ``own`` the :func:`parity_kit.local_vs_propagated`
    table behind its own errors; ``floor`` the calibrated floor."""

    table: pd.DataFrame
    ref_rec: Recording
    cand_rec: Recording
    floor: Floor
    own: pd.DataFrame
    tolerance: float

    def culprits(self, top: int | None = None) -> pd.DataFrame:
        """The innermost modules with own error above their floor, worst first (see
        :func:`parity_kit.comparison.floor.culprits`)."""
        return culprits(self.table, top)

    @property
    def verdict(self) -> dict[str, Any]:
        """:func:`parity_kit.comparison.floor.run_verdict` of the table: the verdict and its figures."""
        return run_verdict(self.table)

    def describe(self, label: str) -> str:
        """The verdict in one sentence, ``label`` naming the candidate run
        (:func:`parity_kit.comparison.floor.describe_verdict`)."""
        return describe_verdict(self.verdict, label)

    def figures(self, prefix: str = "") -> dict[str, Any]:
        """The verdict's numbers for a findings file (:func:`parity_kit.comparison.floor.verdict_figures`)."""
        return verdict_figures(self.verdict, prefix)


def _wider_side(ref_model: nn.Module, cand_model: nn.Module) -> tuple[nn.Module, str]:
    if narrower(model_dtype(ref_model), model_dtype(cand_model)):
        return cand_model, "candidate"
    return ref_model, "reference"


def _check_models(ref_model: Any, cand_model: Any) -> None:
    for role, m in (("reference", ref_model), ("candidate", cand_model)):
        if not isinstance(m, nn.Module):
            raise ParityKitError(f"compare_models needs the {role} model (an nn.Module), not {type(m).__name__}; "
                                 "with recordings only, use pk.compare (one-rounding floor)")


def compare_models(
    ref_model: nn.Module,
    cand_model: nn.Module,
    inputs: Any,
    *,
    modules: ModuleSpec = "*",
    mapping: Any = None,
    tolerance: float = 2.0,
    ref_rec: Recording | None = None,
    cand_rec: Recording | None = None,
    progress: Callable[[float, str], None] | None = None,
    show_progress: bool = True,
) -> ModelComparison:
    """Compare two models on ``inputs`` module by module and judge every difference by the calibrated floor.

    Steps: record the reference (with inputs) and the candidate (``ref_rec`` / ``cand_rec`` reuse recordings of
    these inputs); :func:`parity_kit.compare`; each module's own error by replaying the candidate's module on the
    reference inputs (:func:`parity_kit.local_vs_propagated`); :func:`calibrate_floor` on the wider run's model;
    :func:`parity_kit.comparison.floor.apply_floor`; and for each innermost culprit, both runs' modules
    recomputed in fp64 on the same inputs: an own error that stays above the floor means the module *computes
    differently* (a bug, or a deliberate change), one that falls within it a *precision-sensitive* module (both
    compute one function; the less precise run's arithmetic loses more than rounding at its boundaries
    explains). Models that take ``use_cache`` run without it. ``mapping`` maps reference to candidate module names (as in ``compare``).
    ``progress(fraction, step)`` is called between steps; otherwise a tqdm bar shows them (``show_progress``).
    """
    _check_models(ref_model, cand_model)
    tolerance = check_tolerance(tolerance)
    check_token_ids([ref_model, cand_model], inputs)
    steps = ["record reference", "record candidate", "compare", "own errors", "calibrate floor", "judge", "done"]
    bar = tqdm(total=len(steps) - 1, desc="compare_models") if progress is None and show_progress else None

    def step(i: int) -> None:
        if progress is not None:
            progress(i / (len(steps) - 1), steps[i])
        if bar is not None:
            bar.n = i
            bar.set_postfix_str(steps[i])
            bar.refresh()

    try:
        ref_inputs, cand_inputs = without_cache(ref_model, inputs), without_cache(cand_model, inputs)
        step(0)
        if ref_rec is None:
            ref_rec = _record_with_inputs(ref_model, ref_inputs, modules)
        step(1)
        if cand_rec is None:
            # with a mapping the candidate's names differ: record everything, the mapping picks
            with torch.no_grad(), record(cand_model, modules if mapping is None else "*", mode="tensors",
                                         memory_budget=None) as cand_rec:
                call_model(cand_model, prepare_inputs(cand_model, cand_inputs))
        step(2)
        table = compare(ref_rec, cand_rec, mapping, floor_tolerance=tolerance)
        step(3)
        replay_source = ref_rec if any(c.inputs for c in ref_rec.calls) else ref_model
        own = local_vs_propagated(replay_source, cand_model, cand_inputs, modules=list(ref_rec.names),
                                  mapping=mapping, floor_tolerance=tolerance)
        step(4)
        wider, side = _wider_side(ref_model, cand_model)
        names = list(ref_rec.names) if side == "reference" else _mapped_names(table)
        floor = calibrate_floor(wider, inputs, (model_dtype(ref_model), model_dtype(cand_model)), modules=names,
                                keyed_by=side)
        step(5)
        judged = apply_floor(table, floor, own, tolerance=tolerance)
        causes = _culprit_causes(judged, ref_model, cand_model, ref_inputs, cand_inputs, mapping, tolerance)
        judged = apply_floor(table, floor, own, tolerance=tolerance, causes=causes)
        step(6)
    finally:
        if bar is not None:
            bar.close()
    return ModelComparison(judged, ref_rec, cand_rec, floor, own, tolerance)


def _mapped_names(table: pd.DataFrame) -> list[str]:
    names = table.loc[table["status"] == "ok", "cand_module"].dropna()
    return list(dict.fromkeys(n.split(" [", 1)[0] for n in names))


def _culprit_causes(table: pd.DataFrame, ref_model: nn.Module, cand_model: nn.Module, ref_inputs: Any,
                    cand_inputs: Any, mapping: Any, tolerance: float) -> dict[str, str]:
    """Each innermost culprit's cause. Both runs' modules recompute in fp64 on the same inputs (the reference run
    with the culprits in fp64 is recorded, and each candidate module, in fp64 too, is replayed on its inputs):
    an own error that stays above the floor means the two compute different functions; one that falls within it
    means the excess came from the arithmetic of whichever run is less precise (precision-sensitive)."""
    found = culprits(table)
    if found.empty:
        return {}
    ref_names = list(found["module"])
    cand_names = list(dict.fromkeys(str(n).split(" [", 1)[0] for n in found["cand_module"]))
    with run_in_dtype(ref_model, ref_names, _FP64):
        exact_ref = _record_with_inputs(ref_model, ref_inputs, ref_names)
    with run_in_dtype(cand_model, cand_names, _FP64):
        replayed = local_vs_propagated(exact_ref, cand_model, cand_inputs, modules=ref_names, mapping=mapping)
    causes = {}
    for row in found.itertuples():
        match = replayed[(replayed["module"] == row.module) & (replayed["call"] == row.call)
                         & (replayed["tensor"] == row.tensor) & (replayed["status"] == "ok")]
        if match.empty:
            continue
        error = float(match["local_rel_rms"].iloc[0])
        causes[row.module] = PRECISION_SENSITIVE if error <= tolerance * row.own_floor else COMPUTES_DIFFERENTLY
    return causes
