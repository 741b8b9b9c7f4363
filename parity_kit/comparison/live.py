"""Lockstep capture-and-compare: compare two models module by module while they run, keeping only metrics.

Design (why this one): the reference and the candidate run concurrently, the reference in a worker
thread and the candidate in the calling thread. A reference hook puts a private copy of each output
into a bounded store (at most ``window`` leaves) and blocks while the store is full; a candidate hook
takes the matching reference leaf out of the store (waiting for the reference to produce it), queues
the fused metric reductions of the pair (:func:`parity_kit.comparison.metrics.pair_reductions`) and drops both
tensors. So at most ``window`` reference leaves are alive at any time, whatever the model size, and
only the per-pair metric vectors (15 numbers) accumulate; they are read back once at the end.

Running the two models layer by layer is impossible in general (any Python may sit between modules),
and storing the whole reference run (on CPU or disk) makes memory or disk grow with the model; the
handshake bounds both. The window absorbs small differences in completion order between the two
models (e.g. mapped architectures); a candidate that asks for a reference leaf already pushed out of
a full window raises ParityKitError asking for a larger ``window``.

Thread-local state (grad mode, autocast, the current CUDA device) does not cross threads: pass a
callable as ``inputs`` to set up what a model needs around its own call.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from .._util.calling import Inputs, call_model, check_token_ids
from .._util.trees import leaves
from ..capture import ModuleSpec, select_modules
from .pairs import COLUMNS, MappingLike, PairJob, PairReducer, compare_leaf, empty_row, leaf_filter
from ..dtypes import dtype_name
from ..errors import ParityKitError
from .mapping import MappingTarget, ModuleMapping
from ..recording import Call



class _Abort(Exception):
    """Raised inside the reference thread's hooks to stop its forward when the comparison ends early."""


class _Lockstep:
    """Shared state of one ``compare_live`` run; every field is guarded by ``cond``."""

    def __init__(self, mm: ModuleMapping, ref_names: list[str], cand_names: set[str], keep: Callable[[str], bool],
                 window: int, reducer: PairReducer, tolerance: float, timeout: float):
        self.mm, self.keep, self.window, self.reducer = mm, keep, window, reducer
        self.tolerance, self.timeout = tolerance, timeout
        self.cand_names = cand_names
        self.cond = threading.Condition()
        # key (ref module, call index, leaf) -> [ref Call holding the leaf, targets still to consume]
        self.store: OrderedDict[tuple[str, int, str], list[Any]] = OrderedDict()
        self.evicted: set[tuple[str, int, str]] = set()
        self.peak = 0
        self.ref_done = self.cand_done = False
        self.error: BaseException | None = None
        self.rows: list[tuple[tuple, dict[str, Any]]] = []  # (sort key, row)
        self.ref_counts: dict[str, int] = {}
        self.cand_counts: dict[str, int] = {}
        self.ref_order = 0
        self.cand_order = 0
        self.inverse: dict[str, list[tuple[str, int, MappingTarget]]] = {}
        for name in ref_names:
            for t_index, target in enumerate(mm.targets(name)):
                if target.cand in cand_names:
                    self.inverse.setdefault(target.cand, []).append((name, t_index, target))

    # ------------------------------------------------------------------ reference side (worker thread)
    def ref_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            with self.cond:
                if self.error is not None:
                    raise _Abort()
                index = self.ref_counts.get(name, 0)
                self.ref_counts[name] = index + 1
                order = self.ref_order
                self.ref_order += 1
            targets = self.mm.targets(name)
            for leaf_pos, (leaf, t) in enumerate((lf, t) for lf, t in leaves(output, "output") if self.keep(lf)):
                live = [i for i, tg in enumerate(targets) if tg.cand in self.cand_names]
                call = Call(name, index, order, {leaf: t.detach().clone() if live else t})
                with self.cond:
                    if not targets:
                        self.rows.append(((order, leaf_pos, 0), empty_row(order, name, None, index, leaf,
                                                                     "missing in candidate", tuple(t.shape),
                                                                     dtype_name(t.dtype))))
                    for i, tg in enumerate(targets):
                        if i not in live:
                            self.rows.append(((order, leaf_pos, i), empty_row(
                                order, name, tg.cand if tg.label is None else f"{tg.cand} [{tg.label}]", index,
                                leaf, "missing in candidate", tuple(t.shape), dtype_name(t.dtype))))
                    if not live:
                        continue
                    while len(self.store) >= self.window and not self.cand_done and self.error is None:
                        self.cond.wait(self.timeout)
                    if self.error is not None:
                        raise _Abort()
                    if self.cand_done:  # nothing will consume it any more
                        self._unconsumed(call, leaf, leaf_pos, live)
                        continue
                    self.store[(name, index, leaf)] = [call, leaf_pos, set(live)]
                    self.peak = max(self.peak, len(self.store))
                    self.cond.notify_all()
        return hook

    def _unconsumed(self, call: Call, leaf: str, leaf_pos: int, target_indices: Sequence[int]) -> None:
        targets = self.mm.targets(call.module)
        t = call.tensors[leaf]
        for i in sorted(target_indices):
            tg = targets[i]
            name = tg.cand if tg.label is None else f"{tg.cand} [{tg.label}]"
            self.rows.append(((call.order, leaf_pos, i), empty_row(call.order, call.module, name, call.index, leaf,
                                                              "missing in candidate", tuple(t.shape),
                                                              dtype_name(t.dtype))))

    # ------------------------------------------------------------------ candidate side (calling thread)
    def cand_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            index = self.cand_counts.get(name, 0)
            self.cand_counts[name] = index + 1
            order = self.cand_order
            self.cand_order += 1
            for leaf_pos, (leaf, t) in enumerate((lf, t) for lf, t in leaves(output, "output") if self.keep(lf)):
                sources = self.inverse.get(name, [])
                if not sources:
                    self._missing_in_reference(name, index, leaf, t, order, leaf_pos)
                    continue
                for ref_name, t_index, target in sources:
                    entry = self._take(ref_name, index, leaf, t_index)
                    if entry is None:
                        self._missing_in_reference(name, index, leaf, t, order, leaf_pos)
                        continue
                    call, ref_leaf_pos = entry
                    jobs: list[PairJob] = []
                    cand_call = Call(name, index, order, {leaf: t})
                    row = compare_leaf(call, leaf, call.tensors[leaf], target, {(name, index): cand_call},
                                        set(), self.tolerance, jobs)
                    for job in jobs:
                        self.reducer.add(job)
                    with self.cond:
                        self.rows.append(((call.order, ref_leaf_pos, t_index), row))
        return hook

    def _missing_in_reference(self, name: str, index: int, leaf: str, t: torch.Tensor, order: int,
                              leaf_pos: int) -> None:
        with self.cond:
            self.rows.append(((math.inf, order, leaf_pos), empty_row(None, name, name, index, leaf, "missing in reference",
                                                                tuple(t.shape), None, dtype_name(t.dtype))))

    def _take(self, ref_name: str, index: int, leaf: str, t_index: int) -> tuple[Call, int] | None:
        """The reference leaf for one target, waiting for the reference thread to produce it."""
        key = (ref_name, index, leaf)
        with self.cond:
            while key not in self.store:
                if key in self.evicted:
                    raise ParityKitError(
                        f"the candidate asked for {ref_name!r} call {index} leaf {leaf!r} after it left the "
                        f"window of {self.window} stored reference outputs (the two models complete modules "
                        "in orders that differ by more than the window); pass a larger window="
                    )
                if self.error is not None:
                    raise _Abort()
                if self.ref_done:
                    return None
                if len(self.store) >= self.window:
                    # the reference is blocked on a full store and we need something it has not made
                    # yet: the oldest stored leaf cannot be the one we are waiting for, so let it go
                    old_key, (call, leaf_pos, remaining) = self.store.popitem(last=False)
                    self.evicted.add(old_key)
                    self._unconsumed(call, old_key[2], leaf_pos, remaining)
                    self.cond.notify_all()
                    continue
                if not self.cond.wait(self.timeout):
                    raise ParityKitError(
                        f"compare_live waited {self.timeout:.0f} s for the reference to produce {ref_name!r} "
                        f"call {index}; raise timeout= if the reference model is that slow"
                    )
            call, leaf_pos, remaining = self.store[key]
            remaining.discard(t_index)
            if not remaining:
                del self.store[key]
                self.cond.notify_all()
            return call, leaf_pos


def compare_live(
    ref_model: nn.Module,
    cand_model: nn.Module,
    inputs: Inputs,
    *,
    cand_inputs: Inputs | None = None,
    modules: ModuleSpec = "*",
    cand_modules: ModuleSpec | None = None,
    mapping: MappingLike = None,
    tensors: str | Sequence[str] = "outputs",
    window: int = 16,
    device: str | torch.device | None = None,
    floor_tolerance: float = 2.0,
    timeout: float = 600.0,
) -> pd.DataFrame:
    """Run ``ref_model`` and ``cand_model`` side by side and compare their modules' outputs on the fly.

    Returns the same table as :func:`parity_kit.compare` of two full tensors-mode recordings (same
    columns, rows and numbers), but holds at most ``window`` reference output leaves at a time, so
    memory does not grow with the model (see the module docstring for the design). ``inputs`` is a
    tensor (passed positionally), a dict (keyword arguments), a tuple/list (positional arguments) or a
    callable ``run(model)``; ``cand_inputs`` defaults to ``inputs``. ``modules`` selects reference
    modules, ``cand_modules`` candidate modules (default: the same pattern); ``mapping`` as in
    ``compare``. Only output leaves are compared. The table's ``attrs["peak_stored"]`` is the largest
    number of reference leaves held at once.

    >>> a = nn.Sequential(nn.Linear(4, 4), nn.ReLU()); b = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    >>> t = compare_live(a, b, torch.ones(2, 4))
    >>> t["module"].tolist(), t["status"].tolist()
    (['0', '1'], ['ok', 'ok'])
    """
    if ref_model is cand_model:
        raise ParityKitError("compare_live needs two model objects; to compare one model under two settings, "
                             "record each run with pk.record and use pk.compare")
    if not isinstance(window, int) or window < 1:
        raise ParityKitError(f"window={window!r}: pass a positive number of reference outputs to hold")
    check_token_ids([ref_model], inputs)
    check_token_ids([cand_model], inputs if cand_inputs is None else cand_inputs, "cand_inputs")
    keep = leaf_filter(tensors)
    if tensors == "all" or (not isinstance(tensors, str) and any(not (t == "output" or t.startswith("output."))
                                                                  for t in tensors)):
        raise ParityKitError("compare_live compares module outputs only; use tensors='outputs' or output leaf "
                             "names (capture inputs with pk.record(inputs=True) and pk.compare)")
    target_device = torch.device(device) if device is not None else None
    if target_device is not None and target_device.type == "cuda" and not torch.cuda.is_available():
        raise ParityKitError(f"device={str(target_device)!r} but CUDA is not available here; use device=None")
    ref_sel = select_modules(ref_model, modules)
    cand_sel = select_modules(cand_model, modules if cand_modules is None else cand_modules)
    reducer = PairReducer(target_device, None, floor_tolerance)
    state = _Lockstep(ModuleMapping.coerce(mapping), [n for n, _ in ref_sel], {n for n, _ in cand_sel}, keep,
                      window, reducer, floor_tolerance, timeout)

    _run_in_lockstep(ref_model, cand_model, inputs, cand_inputs, ref_sel, cand_sel, state)
    for key in list(state.store):  # produced by the reference, never asked for by the candidate
        call, leaf_pos, remaining = state.store.pop(key)
        state._unconsumed(call, key[2], leaf_pos, remaining)
    reducer.finish()
    rows = [row for _, row in sorted(state.rows, key=lambda kr: kr[0])]
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["order"] = table["order"].astype("Int64")
    table["nonfinite"] = table["nonfinite"].astype("int64")
    table.attrs["peak_stored"] = state.peak
    return table


def _run(model: nn.Module, inputs: Inputs) -> Any:
    with torch.no_grad():
        return call_model(model, inputs)


def _run_in_lockstep(ref_model: nn.Module, cand_model: nn.Module, inputs: Inputs, cand_inputs: Inputs | None,
                     ref_sel: list[tuple[str, nn.Module]], cand_sel: list[tuple[str, nn.Module]],
                     state: _Lockstep) -> None:
    """The reference in a worker thread, the candidate in this one, their hooks handing outputs over through
    ``state``; every hook is removed and the worker joined whatever happens, a model's exception re-raised."""
    def run_reference() -> None:
        try:
            _run(ref_model, inputs)
        except _Abort:
            pass
        except BaseException as e:  # reported in the calling thread
            with state.cond:
                state.error = e
        finally:
            with state.cond:
                state.ref_done = True
                state.cond.notify_all()

    handles = []
    worker = threading.Thread(target=run_reference, name="parity_kit-reference", daemon=True)
    try:
        for name, module in ref_sel:
            handles.append(module.register_forward_hook(state.ref_hook(name), with_kwargs=True))
        for name, module in cand_sel:
            handles.append(module.register_forward_hook(state.cand_hook(name), with_kwargs=True))
        worker.start()
        try:
            _run(cand_model, inputs if cand_inputs is None else cand_inputs)
        except _Abort:
            pass
        except BaseException as e:
            with state.cond:
                state.error = state.error or e
                state.cond.notify_all()
        with state.cond:
            state.cand_done = True
            state.cond.notify_all()
        worker.join()
    finally:
        with state.cond:
            state.cand_done = True
            if state.error is None and worker.is_alive():
                state.error = ParityKitError("compare_live was interrupted")
            state.cond.notify_all()
        if worker.is_alive():
            worker.join()
        for handle in handles:
            handle.remove()
    if state.error is not None:
        if isinstance(state.error, ParityKitError):
            raise state.error
        raise ParityKitError(f"a model raised during compare_live: {type(state.error).__name__}: "
                             f"{state.error}") from state.error
