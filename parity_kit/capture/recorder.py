"""Capture: forward hooks that turn a model run into a :class:`~parity_kit.recording.model.Recording`.

``record()`` hooks the selected modules, stores every call separately (once per decode step, twice
for a module used twice in one forward), and removes exactly the hooks it added when the block ends,
also when the forward or the memory budget raises.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import fnmatch
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.utils.hooks import RemovableHandle

from ..dtypes import DtypeLike, dtype_name, parse_dtype
from ..errors import ParityKitError
from ..recording.model import (TENSOR_FILE, Call, Recording, StatsBatch, TensorFileWriter, TensorStats, _replace_folder,
                        _tensor_key, _writable_target, _write_index, map_tensors)

ModuleSpec = str | Sequence[str] | type[nn.Module] | tuple[type[nn.Module], ...]

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MAX_DEPTH = 8
_AUTO_BATCH = 2**30


# ---------------------------------------------------------------------------------------- selection
def select_modules(model: nn.Module, modules: ModuleSpec = "*") -> list[tuple[str, nn.Module]]:
    """The ``(qualified name, module)`` pairs that ``modules`` selects, in ``named_modules()`` order.

    ``modules`` is a glob on qualified names (``fnmatch``; ``*`` also crosses dots), ``"re:<regex>"``
    (the regex must match the whole name), a list of names/globs (each must match something), or an
    ``nn.Module`` subclass / tuple of subclasses. The root module (name ``""``) is only selected by
    naming it exactly (``modules=[""]``). A pattern that matches nothing raises ParityKitError listing
    close names.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> [n for n, _ in select_modules(m, "*")], [n for n, _ in select_modules(m, nn.ReLU)]
    (['0', '1'], ['1'])
    """
    return _select(_named_modules(model), modules)


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``list(model.named_modules())``: the same pairs in the same order, without a generator per
    module (nested generators pass each name up through every level). A model where some module
    overrides ``named_modules`` gets its own answer."""
    standard = nn.Module.named_modules
    if type(model).named_modules is not standard:
        return list(model.named_modules())
    found: list[tuple[str, nn.Module]] = [("", model)]
    seen = {model}

    def walk(module: nn.Module, prefix: str) -> bool:
        for name, child in module._modules.items():
            if child is None or child in seen:
                continue
            if type(child).named_modules is not standard:
                return False
            seen.add(child)
            qualified = f"{prefix}.{name}" if prefix else name
            found.append((qualified, child))
            if child._modules and not walk(child, qualified):
                return False
        return True

    return found if walk(model, "") else list(model.named_modules())


def _select(named: list[tuple[str, nn.Module]], modules: ModuleSpec) -> list[tuple[str, nn.Module]]:
    if isinstance(modules, type) or (
        isinstance(modules, tuple) and modules and all(isinstance(m, type) for m in modules)
    ):
        classes = modules if isinstance(modules, tuple) else (modules,)
        if not all(issubclass(c, nn.Module) for c in classes):
            raise ParityKitError(f"modules={modules!r}: classes must be torch.nn.Module subclasses")
        found = [pair for pair in named if isinstance(pair[1], classes)]
        if not found:
            present = sorted({type(m).__name__ for _, m in named})
            raise ParityKitError(
                f"no module is an instance of {[c.__name__ for c in classes]}; classes in this model: {present}"
            )
        return found
    if modules == "*":  # the common case: every module but the root, without building a name set
        return [pair for pair in named if pair[0]]
    if isinstance(modules, str):
        patterns = [modules]
    elif isinstance(modules, Sequence) and all(isinstance(p, str) for p in modules):
        patterns = list(modules)
        if not patterns:
            raise ParityKitError("modules=[] selects nothing; pass '*' for every module or a list of names")
    else:
        raise ParityKitError(
            f"modules={modules!r} is not understood; pass a glob ('model.layers.*'), 're:<regex>', "
            "a list of names/globs, or an nn.Module subclass"
        )
    names = [n for n, _ in named]
    chosen: set[str] = set()
    for pattern in patterns:
        hits = _match(pattern, names)
        if not hits:
            raise ParityKitError(_no_match_message(pattern, names))
        chosen.update(hits)
    return [pair for pair in named if pair[0] in chosen]  # the same tuples: no allocation per module


def _match(pattern: str, names: list[str]) -> list[str]:
    if pattern == "*":  # the common case, without a glob match per module
        return [n for n in names if n]
    if pattern in names:
        return [pattern]
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as e:
            raise ParityKitError(f"modules={pattern!r} is not a valid regular expression: {e}") from None
        return [n for n in names if n and regex.fullmatch(n)]
    return [n for n in names if n and fnmatch.fnmatchcase(n, pattern)]


def _no_match_message(pattern: str, names: list[str]) -> str:
    probe = pattern[3:] if pattern.startswith("re:") else pattern
    probe = re.sub(r"[*?\[\]\\^$+(){}|]", "", probe)
    close = difflib.get_close_matches(probe, [n for n in names if n], n=5, cutoff=0.4)
    if not close:
        last = probe.rsplit(".", 1)[-1]
        close = [n for n in names if n and last and last in n][:5]
    hint = f"close names: {close}" if close else f"first names in the model: {[n for n in names if n][:8]}"
    return (f"modules pattern {pattern!r} matched no module; {hint}. "
            "Globs use fnmatch ('*' crosses dots), 're:' patterns must match the whole name")


# ---------------------------------------------------------------------------------------- capture
def parse_bytes(budget: int | str | None) -> int | None:
    """Bytes in ``budget`` (an int, a string like "4GiB" / "500MB", or None for no limit).

    >>> parse_bytes("1.5KiB"), parse_bytes(None)
    (1536, None)
    """
    if budget is None or (isinstance(budget, int) and not isinstance(budget, bool)):
        return budget
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", budget.lower())
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2) or "b"])
    raise ParityKitError(f"memory_budget={budget!r} is not understood; use bytes (int), '4GiB', '500MB' or None")


def _format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _leaves(obj: Any, prefix: str, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensor leaves of a module's inputs/outputs with stable names; non-tensor leaves are skipped."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif depth >= _MAX_DEPTH:
        return
    elif isinstance(obj, Mapping):  # dicts and transformers ModelOutput (an OrderedDict)
        for key, value in obj.items():
            yield from _leaves(value, f"{prefix}.{key}", depth + 1)
    elif isinstance(obj, (tuple, list)):
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{prefix}.{i}", depth + 1)


class _Slot:
    """Where a deferred result goes: leaf ``leaf`` of one call's tensor dict, filled when its batch resolves."""

    __slots__ = ("tensors", "leaf")

    def __init__(self, tensors: dict[str, Any], leaf: str) -> None:
        self.tensors, self.leaf = tensors, leaf

    def fill(self, value: Any) -> None:
        self.tensors[self.leaf] = value


class _Labels(Sequence[str]):
    """Names of a batch's tensors for an error message, formatted only when one is raised: (module, leaf)
    pairs, then the placeholders' modules (their leaf is "output")."""

    __slots__ = ("pairs", "placeholders")

    def __init__(self, pairs: list[tuple[str, str]], placeholders: list[list]) -> None:
        self.pairs, self.placeholders = pairs, placeholders

    def __getitem__(self, i: int) -> str:  # type: ignore[override]  # no slices: an index from StatsBatch
        n = len(self.pairs)
        module, leaf = self.pairs[i] if i < n else (self.placeholders[i - n][0], "output")
        return f"module {module!r} leaf {leaf!r}"

    def __len__(self) -> int:
        return len(self.pairs) + len(self.placeholders)


class _Capturer:
    """The hook callbacks of one ``record()`` block; writes into ``recording``.

    Hooks never wait for the device. A hook on a CUDA tensor only keeps a reference (and the tensor's
    version counter): statistics are reduced in batches (:class:`StatsBatch`), copies kept on the
    device are made in batches (one concatenation per group of like tensors), copies bound for host
    memory go through pinned buffers on a side stream. ``finish()`` waits once, when the block ends.
    With a ``writer`` (``record(save_to=...)``), CPU tensors are handed to it in their hook and CUDA
    tensors, as pinned host copies, every 1 GiB and at the end.
    """

    def __init__(self, recording: Recording, device: torch.device, dtype: torch.dtype | None,
                 budget: int | None, per_token: bool, stats_batch: int | None, copy_batch: int | None,
                 defer_cpu: bool, writer: TensorFileWriter | None, inputs: bool):
        self.rec, self.device, self.dtype, self.budget, self.per_token = recording, device, dtype, budget, per_token
        self.calls: list[Any] = recording._calls  # Calls, and placeholders until their batch is built
        self.stats_mode = recording.mode == "stats"
        self.stored = 0
        self.counts: dict[str, int] = {}  # calls so far per hooked module (a wrapper counts its own)
        # inputs are captured before forward runs (the model may modify them in place) and kept
        # until the matching output hook; a stack per module handles re-entrant calls
        self.pending: dict[str, list[tuple[dict, dict, list[_Slot]]]] = {}
        self.new_slots: list[_Slot] = []  # slots made since the last pre-hook began (inputs')
        self.track_slots = inputs
        self.stats_batch, self.copy_batch, self.defer_cpu = stats_batch, copy_batch, defer_cpu
        self.writer = writer
        # Stats of outputs that are one deferrable tensor take the cheapest path: a wrapped forward appends
        # a placeholder list [module, index, tensor, version] to the recording's calls, and the Call is
        # made when its batch resolves. Positions before ``scanned`` hold no placeholder not yet batched.
        self.lean = self.stats_mode and stats_batch is not None and not inputs
        self.scanned = 0
        # Until the first inference tensor shows up, an output's version counter is read without asking
        # whether it has one (an inference tensor raises); afterwards each output is asked first.
        self.versions_unchecked = True
        # deferred work: slot, tensor, version counter to check (None: cannot be checked), (module, leaf)
        self.deferred: list[tuple[_Slot, torch.Tensor, int | None, tuple[str, str]]] = []
        self.deferred_bytes = 0
        self.inflight: list[tuple[StatsBatch, list[_Slot | int]]] = []  # targets: slots, placeholder positions
        self.settled: list[tuple[StatsBatch, list[_Slot | int]]] = []  # waited for, statistics not built yet
        self.copies: list[tuple[_Slot, torch.Tensor, int, tuple[str, str]]] = []
        self.copies_bytes = 0
        # pinned host copies of CUDA tensors waiting for the writer: slot, tensor, copy-done event
        self.unwritten: list[tuple[_Slot, torch.Tensor, Any]] = []
        self.unwritten_bytes = 0
        self.copy_streams: dict[torch.device, torch.cuda.Stream] = {}

    # ------------------------------------------------------------------ one leaf
    def take(self, t: torch.Tensor, tensors: dict[str, Any], orig: dict[str, str], leaf: str, name: str) -> None:
        """Put leaf ``leaf`` of module ``name`` into ``tensors``: now, or through a slot filled later."""
        if self.stats_mode:
            if self.stats_batch is not None and (t.is_cuda or self.defer_cpu) and t.numel():
                # an inference-mode tensor has no version counter, so in-place changes cannot be detected
                version = None if t.is_inference() else t._version
                self.deferred.append((self.slot(tensors, leaf), t.detach() if t.requires_grad else t, version,
                                      (name, leaf)))
                self.deferred_bytes += t.numel() * t.element_size()
                if self.deferred_bytes >= self.stats_batch:
                    self.flush_stats()
            else:
                tensors[leaf] = TensorStats.of(t, self.per_token)
            return
        # only an explicit dtype= casts, and only floating tensors: never a silent down-cast
        dtype = self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype
        if dtype != t.dtype:
            orig[leaf] = dtype_name(t.dtype)
        need = t.numel() * dtype.itemsize
        if self.writer is not None:
            if t.is_cuda:  # pinned host copies, written once 1 GiB waits or the block ends
                host, copied = self.offload(t, dtype)
                self.unwritten.append((self.slot(tensors, leaf), host, copied))
                self.unwritten_bytes += need
                if self.unwritten_bytes >= _AUTO_BATCH:
                    self.write_pending()
            else:  # copied into the writer's buffers now; its thread writes them while the model runs
                tensors[leaf] = self.writer.write(t.detach().to(dtype=dtype))
            return
        if self.budget is not None and self.stored + need > self.budget:
            raise ParityKitError(
                f"memory_budget {_format_bytes(self.budget)} exceeded while capturing {name!r} "
                f"leaf {leaf!r}: captured {_format_bytes(self.stored)} so far, this tensor needs "
                f"{_format_bytes(need)}; use mode='stats', save_to= (stream to disk), a narrower "
                "modules= pattern, device='cpu', or raise memory_budget"
            )
        self.stored += need
        if t.is_cuda and self.device.type == "cpu":
            tensors[leaf] = self.offload(t, dtype)[0]
        elif (self.copy_batch is not None and dtype == t.dtype and t.device == self.device and t.dim()
              and (t.is_cuda or self.defer_cpu) and not t.is_inference()):
            self.copies.append((self.slot(tensors, leaf), t.detach() if t.requires_grad else t, t._version,
                                (name, leaf)))
            self.copies_bytes += need
            if self.copies_bytes >= self.copy_batch:
                self.flush_copies()
        else:
            # copy=True: never alias a tensor the model may later modify in place
            tensors[leaf] = t.detach().to(device=self.device, dtype=dtype, copy=True)

    def slot(self, tensors: dict[str, Any], leaf: str) -> _Slot:
        tensors[leaf] = None
        made = _Slot(tensors, leaf)
        if self.track_slots:
            self.new_slots.append(made)
        return made

    # ------------------------------------------------------------------ deferred work
    def flush_stats(self) -> None:
        """Queue the reduction of the deferred tensors; resolve the batch before it (double buffering)."""
        calls = self.calls
        targets: list[_Slot | int] = []
        tensors: list[torch.Tensor] = []
        versions: list[int | None] = []
        labels: list[tuple[str, str]] = []
        for slot, t, version, label in self.deferred:
            targets.append(slot)
            tensors.append(t)
            versions.append(version)
            labels.append(label)
        # placeholders: [module, index, tensor, version] lists among the Calls
        positions = [i for i, entry in enumerate(calls[self.scanned:], self.scanned) if type(entry) is list]
        placeholders: list[list] = [calls[i] for i in positions]
        targets += positions
        tensors += [entry[2] for entry in placeholders]
        versions += [entry[3] for entry in placeholders]
        if tensors:
            batch = StatsBatch(tensors, self.per_token, versions, _Labels(labels, placeholders))
            self.inflight.append((batch, targets))
            for entry in placeholders:
                entry[2] = None  # the batch holds the tensor now, and lets it go when settled
            self.deferred, self.deferred_bytes, self.scanned = [], 0, len(calls)
        while len(self.inflight) > 1:
            self.resolve_oldest()

    def resolve_oldest(self) -> None:
        """Wait for the oldest batch and let its tensors go; its statistics are built with the others."""
        batch, targets = self.inflight.pop(0)
        batch.settle()
        self.settled.append((batch, targets))

    def build_stats(self) -> None:
        """Turn the settled batches' numbers into TensorStats: placeholders become Calls, slots are filled."""
        calls = self.calls
        settled, self.settled = self.settled, []
        for batch, targets in settled:
            for target, stats in zip(targets, batch.result()):
                if type(target) is int:
                    entry = calls[target]
                    calls[target] = Call(entry[0], entry[1], target, {"output": stats}, {})  # type: ignore[index]
                else:
                    target.fill(stats)

    def settle_placeholders(self) -> None:
        """Turn placeholders left by a failed block into Calls without statistics (``None``)."""
        calls = self.calls
        for position, entry in enumerate(calls):
            if type(entry) is list:
                calls[position] = Call(entry[0], entry[1], position, {"output": None}, {})

    def flush_copies(self) -> None:
        """Copy the deferred tensors: one concatenation per (device, dtype, trailing shape) group."""
        copies, self.copies, self.copies_bytes = self.copies, [], 0
        groups: dict[tuple, list[int]] = {}
        for i, (_, t, version, label) in enumerate(copies):
            if t._version != version:
                name, leaf = label
                raise ParityKitError(
                    f"module {name!r} leaf {leaf!r} was modified in place after its module returned it, so its "
                    "copy could not be deferred (the values it returned are gone); pass copy_batch=0 to "
                    "record() to take it inside the hook"
                )
            groups.setdefault((t.device, t.dtype, t.shape[1:]), []).append(i)
        for members in groups.values():
            tensors = [copies[i][1] for i in members]
            # [sum of first dims, *trailing] -> one view per tensor, in the same storage
            if len(tensors) == 1:
                parts = [tensors[0].clone()]
            else:
                parts = torch.cat(tensors).split([t.shape[0] for t in tensors])
            for i, part in zip(members, parts):
                copies[i][0].fill(part)

    def offload(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Copy a CUDA tensor into pinned host memory on a side stream, without waiting for it.

        Returns the host tensor and an event that completes when the copy has landed."""
        # a private device copy first: the model may overwrite ``t`` in place before the side stream
        # gets to it, and the copy is cheap next to the transfer
        private = t.detach().to(dtype=dtype, copy=True)
        stream = self.copy_streams.get(t.device)
        if stream is None:
            stream = self.copy_streams[t.device] = torch.cuda.Stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        host = torch.empty(private.shape, dtype=dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(private, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        # the caching allocator must not hand ``private`` out again before the side stream read it
        private.record_stream(stream)
        return host, copied

    def write_pending(self) -> None:
        """Hand the pinned host copies to the writer, each once its transfer has landed."""
        unwritten, self.unwritten, self.unwritten_bytes = self.unwritten, [], 0
        for slot, t, copied in unwritten:
            copied.synchronize()
            slot.fill(self.writer.write(t))

    def finish(self, failed: bool) -> None:
        """Wait for queued copies and reductions. Afterwards every copy is in place and every statistic is
        on the host; the TensorStats are built when the recording's calls are first read (right away
        when the block ``failed``, for whatever was computed)."""
        done = False
        try:
            for stream in self.copy_streams.values():
                stream.synchronize()
            self.flush_stats()
            while self.inflight:
                self.resolve_oldest()
            self.flush_copies()
            if self.writer is not None:
                self.write_pending()
            done = True
        finally:
            if done and not failed:
                if self.settled:
                    self.rec._unbuilt.append(self.build_stats)
            else:
                try:
                    self.build_stats()
                except Exception:  # noqa: S110  # the error being raised is the one to report
                    pass
                self.settle_placeholders()

    # ------------------------------------------------------------------ hooks
    def grab(self, obj: Any, prefix: str, name: str) -> tuple[dict, dict]:
        tensors: dict[str, Any] = {}
        orig: dict[str, str] = {}
        if isinstance(obj, torch.Tensor):  # most modules return one tensor: skip the tree walk
            self.take(obj, tensors, orig, prefix, name)
        else:
            for leaf, t in _leaves(obj, prefix):
                self.take(t, tensors, orig, leaf, name)
        return tensors, orig

    def pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.new_slots = []
            tensors, orig = self.grab(args, "input", name)
            kw_tensors, kw_orig = self.grab(kwargs, "input", name)
            tensors.update(kw_tensors)
            orig.update(kw_orig)
            for made in self.new_slots:
                made.tensors = tensors
            self.pending.setdefault(name, []).append((tensors, orig, self.new_slots))
            self.new_slots = []
        return hook

    def output(self, name: str, output: Any, index: int | None = None) -> None:
        """Record one call of module ``name``, which returned ``output`` (the forward hooks' body); ``index``
        is the call's number among the module's calls, counted here when not given. A wrapped forward
        takes its common case itself (:meth:`_ForwardWrap.__call__`) and comes here for the others."""
        tensors, orig = self.grab(output, "output", name)
        if self.track_slots and self.pending.get(name):
            in_tensors, in_orig, in_slots = self.pending[name].pop()
            tensors.update(in_tensors)
            orig.update(in_orig)
            for made in in_slots:  # deferred input leaves now belong to the call's dict
                made.tensors = tensors
        calls = self.calls
        if index is None:
            index = self.counts.get(name, 0)
            self.counts[name] = index + 1
        calls.append(Call(name, index, len(calls), tensors, orig))

    def forward_hook(self, name: str):
        output = self.output

        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            output(name, out)
        return hook


class _ForwardWrap:
    """Stands in for a selected module's ``forward`` and records what it returns; ``remove()`` puts back
    what was there (the class's method, or an instance attribute such as accelerate's).

    Cheaper than a forward hook: a module without hooks keeps torch's fast call path, while with any
    hook every call of every module goes through torch's hook machinery. In stats mode the common
    output, one deferrable tensor, is recorded right here as a placeholder: this runs once per module
    call, and each attribute read or call inside a forward costs the forward that much. One object per
    module, without closures: entering a block allocates little, so it does not set off garbage
    collections (a closure with its cells and a bound method per module did).
    """

    __slots__ = ("module", "name", "function", "previous", "capturer", "placeholders", "count")

    def __init__(self, module: nn.Module, name: str, capturer: _Capturer) -> None:
        self.module, self.name = module, name
        self.capturer: _Capturer | None = capturer
        # the recording's calls when its stats take the placeholder path, else None
        self.placeholders: list[Any] | None = capturer.calls if capturer.lean else None
        self.count = 0  # calls of this module so far: the index of the next one
        self.previous = module.__dict__.get("forward", _NOT_SET)
        self.function = type(module).forward
        # straight into the instance dict: what Module.__setattr__ would do, without its checks
        module.__dict__["forward"] = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        previous = self.previous
        output = self.function(self.module, *args, **kwargs) if previous is _NOT_SET else previous(*args, **kwargs)
        capturer = self.capturer
        if capturer is None:
            return output
        index = self.count
        self.count = index + 1
        placeholders = self.placeholders
        if placeholders is not None and type(output) is torch.Tensor and (output.is_cuda or capturer.defer_cpu):
            if capturer.versions_unchecked:
                try:
                    version = output._version
                except RuntimeError:  # an inference tensor: no version counter, in-place changes go unseen
                    capturer.versions_unchecked = False
                    version = None
            else:
                version = None if output.is_inference() else output._version
            placeholders.append([self.name, index, output, version])
            capturer.deferred_bytes += output.nbytes
            if capturer.deferred_bytes >= capturer.stats_batch:  # type: ignore[operator]
                capturer.flush_stats()
        else:
            capturer.output(self.name, output, index)
        return output

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        """What this stands in for, so ``inspect.signature(module.forward)`` sees the real signature."""
        return self.function.__get__(self.module) if self.previous is _NOT_SET else self.previous

    def remove(self) -> None:
        self.capturer = self.placeholders = None  # left in place (see below), it passes calls through
        attributes = self.module.__dict__
        if attributes.get("forward") is not self:
            return  # replaced since (another wrapper on top, or removed by its owner)
        if self.previous is _NOT_SET:
            del attributes["forward"]
        else:
            attributes["forward"] = self.previous


_NOT_SET = object()


def _install_hooks(capturer: _Capturer, selected: list[tuple[str, nn.Module]], named: list[tuple[str, nn.Module]],
                   inputs: bool) -> list[RemovableHandle | _ForwardWrap]:
    """Hook the selected modules; returns the handles to remove (``RemovableHandle``/``_ForwardWrap``).

    A module without forward hooks of its own, while no process-wide forward hook is registered, gets
    its ``forward`` wrapped (:class:`_ForwardWrap`): the recording sees exactly what a forward hook
    would, and torch keeps its fast call path (what per-module hooks that do nothing cost is
    ``noop_hooks`` in ``benchmarks/capture_overhead.py``). The others get a forward hook appended
    after their existing ones, so the recording sees what those hooks (a dtype cast, a perturbation)
    return. Inside ``nn.DataParallel`` replicas are made by
    copying modules, which would copy a wrapper bound to the original, so only hooks are used there.
    """
    handles: list[RemovableHandle | _ForwardWrap] = []
    wrap = not _torch_module._global_forward_hooks and not any([isinstance(m, nn.DataParallel) for _, m in named])
    for name, module in selected:
        if inputs:
            handles.append(module.register_forward_pre_hook(capturer.pre_hook(name), with_kwargs=True))
        if wrap and not module._forward_hooks:
            handles.append(_ForwardWrap(module, name, capturer))
        else:
            handles.append(module.register_forward_hook(capturer.forward_hook(name)))
    return handles


def _model_metadata(model: nn.Module, named: list[tuple[str, nn.Module]]) -> dict[str, Any]:
    """What ``record()`` knows of the model when the block starts; :func:`_complete_metadata` adds the
    parameters' dtypes and the environment when it ends (while the GPU finishes, not before the forward)."""
    first = next((p for _, m in named for p in m._parameters.values() if p is not None), None)
    return {
        "model_class": type(model).__name__,
        "dtype": None,
        "device": str(first.device) if first is not None else "cpu",
        "input_shapes": None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": None,
    }


def _complete_metadata(metadata: dict[str, Any], named: list[tuple[str, nn.Module]]) -> None:
    dtypes = sorted({dtype_name(d) for d in {p.dtype for _, m in named for p in m._parameters.values() if p is not None}})
    metadata["dtype"] = dtypes[0] if len(dtypes) == 1 else dtypes
    metadata["environment"] = _environment()


def _environment() -> dict[str, Any] | None:
    try:
        from ..present.report import environment_capsule
    except ImportError:  # report.py is optional for capture
        return None
    return environment_capsule()


def _auto_stats_batch(device: str) -> int:
    """``stats_batch="auto"`` for a model on ``device``: 4 GiB, at most 1/32 of a GPU's memory.

    The outputs of a batch stay alive until its reduction has run, so the batch is memory the model
    would otherwise have reused; in return, fewer batches cost less host time (each one is a few
    launches and tables), and a forward of a 7B model at 512 tokens is one batch (the 7B-shaped outputs
    of ``benchmarks/row_stats_throughput.py`` are 2.46 GB).
    """
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return _AUTO_BATCH
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return min(4 * _AUTO_BATCH, max(_AUTO_BATCH // 4, total // 32))


def _batch_bytes(value: int | str | None, knob: str, auto: int = _AUTO_BATCH) -> tuple[int | None, bool]:
    """(batch size in bytes or None for "in the hook", whether CPU tensors are batched too)."""
    if value == "auto":
        return auto, False
    try:
        return parse_bytes(value) or None, True
    except ParityKitError:
        raise ParityKitError(
            f"{knob}={value!r} is not understood; use 'auto', bytes (int), '256MiB', or 0"
        ) from None


@contextmanager
def record(
    model: nn.Module,
    modules: ModuleSpec = "*",
    mode: Literal["tensors", "stats"] = "tensors",
    *,
    inputs: bool = False,
    device: str | torch.device = "cpu",
    dtype: DtypeLike | None = None,
    memory_budget: int | str | None = "4GiB",
    per_token: bool = True,
    stats_batch: int | str | None = "auto",
    copy_batch: int | str | None = "auto",
    save_to: str | os.PathLike[str] | None = None,
) -> Iterator[Recording]:
    """Record every call of the selected modules while the block runs.

    ``mode="tensors"`` keeps detached copies of every tensor leaf of the outputs (and of the inputs
    with ``inputs=True``), moved to ``device`` and, for floating tensors, cast to ``dtype`` only when
    ``dtype`` is given (the original dtype is remembered per leaf). ``memory_budget`` caps the bytes
    kept, counted as each copy is scheduled; crossing it raises ParityKitError. CUDA tensors bound for
    ``device="cpu"`` go into pinned host memory through a side stream, so the forward does not wait for
    the transfers; the block's end waits for them once. CUDA tensors kept on their own device are
    copied in batches (``copy_batch``, below).

    ``save_to=path`` streams the recording to disk instead, so memory stays bounded whatever the
    model size and ``memory_budget`` does not apply. A CPU output is copied in its hook into a few
    reused buffers that a writer thread puts in the folder's tensor file while the model runs
    (:class:`~parity_kit.recording.filesink.FileSink`, with ``O_DIRECT`` where the file system takes it); CUDA
    outputs go through pinned host copies, written whenever 1 GiB waits and at the end. The folder appears
    atomically when the block ends (nothing at ``path`` if the block raises) and the Recording's
    tensors are then memory-mapped from it. With ``mode="stats"`` the statistics are saved there.

    ``mode="stats"`` keeps only :class:`TensorStats` per leaf (``per_token`` adds the per-row rms, at
    no extra cost in the batched path). With ``stats_batch="auto"`` the statistics of CUDA tensors are
    reduced in batches: a hook only keeps a reference to the output, and once the referenced outputs
    reach 4 GiB (at most 1/32 of the GPU's memory; or the block ends) they are reduced together with a
    few kernels and no host synchronisation inside the forward; CPU tensors are reduced in their hook.
    The block ends with every statistic on the host and no output held; the :class:`TensorStats` are
    built when ``rec.calls`` is first read. An int or size string
    ("256MiB") sets the batch size and batches CPU tensors too; ``0`` or None reduces each tensor in
    its hook (one host synchronisation per tensor on CUDA). ``copy_batch`` does the same for the
    copies ``mode="tensors"`` keeps on the tensor's own device: "auto" batches CUDA tensors (one
    concatenation per group of like tensors instead of one copy each), ``0`` copies in the hook.
    Deferred work needs the output unchanged until its batch runs: a module output that the model
    modifies in place later is detected (version counter) and refused with an error that names the
    knob to set to 0. Results are complete when the block ends. Calls are stored in completion order,
    so a parent module follows its children.

    The recording sees each output as the module's forward hooks that exist when the block starts
    returned it; hooks registered inside the block run after the capture. A selected module without
    forward hooks (while no process-wide forward hook exists) is captured by wrapping its ``forward``
    for the block, which costs far less per call than a hook; ``module.forward`` is then an instance
    attribute until the block ends, and a direct ``module.forward(...)`` call is recorded too.

    >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    >>> with record(m, "*", mode="stats") as rec:
    ...     _ = m(torch.ones(3, 4))
    >>> rec.names, rec["1"][0].output.shape
    (['0', '1'], (3, 4))
    """
    if mode not in ("tensors", "stats"):
        raise ParityKitError(f"mode={mode!r} is not a capture mode; use 'tensors' or 'stats'")
    named = _named_modules(model)
    selected = _select(named, modules)
    cast = parse_dtype(dtype) if dtype is not None else None
    if cast is not None and not cast.is_floating_point:
        raise ParityKitError(f"dtype={dtype!r}: capture casts only to floating dtypes (fp64/fp32/fp16/bf16)")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ParityKitError(f"device={str(target)!r} but CUDA is not available here; use device='cpu'")
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    if save_to is not None and target.type != "cpu":
        raise ParityKitError(f"save_to= streams tensors through host memory; pass device='cpu' (not {str(target)!r})")
    metadata = _model_metadata(model, named)
    stats_bytes, defer_cpu_stats = _batch_bytes(stats_batch, "stats_batch", _auto_stats_batch(metadata["device"]))
    copy_bytes, defer_cpu_copies = _batch_bytes(copy_batch, "copy_batch")
    rec = Recording(mode, metadata=metadata)
    destination = _writable_target(save_to) if save_to is not None else None
    folder = writer = None
    if destination is not None and mode == "tensors":
        folder = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
        writer = TensorFileWriter(folder / TENSOR_FILE)
    capturer = _Capturer(rec, target, cast, parse_bytes(memory_budget), per_token, stats_bytes, copy_bytes,
                         defer_cpu_stats if mode == "stats" else defer_cpu_copies, writer, inputs)

    def root_shapes(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if rec.metadata["input_shapes"] is None:
            rec.metadata["input_shapes"] = {
                name: list(t.shape) for name, t in [*_leaves(args, "input"), *_leaves(kwargs, "input")]
            }

    handles = []
    failed = False
    try:
        handles.append(model.register_forward_pre_hook(root_shapes, with_kwargs=True))
        handles.extend(_install_hooks(capturer, selected, named, inputs))
        yield rec
    except BaseException:
        failed = True
        raise
    finally:
        if not failed:
            try:  # queue the last reductions first: the GPU runs them while the host tidies up below
                capturer.flush_stats()
            except Exception:  # noqa: S110  # finish() flushes again and raises it, after the clean-up
                pass
        for handle in handles:
            handle.remove()
        capturer.pending.clear()
        _complete_metadata(rec.metadata, named)
        try:
            capturer.finish(failed)
            if not failed and destination is not None:
                if writer is not None:
                    _publish_stream(rec, writer, folder, destination)
                else:
                    rec.save(destination)
        except Exception:
            if not failed:
                raise
            # the block's own exception is the one to report; the partial recording stays as it is
        finally:
            if writer is not None:
                writer.close()
            if folder is not None and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)


def _publish_stream(rec: Recording, writer: TensorFileWriter, folder: Path, destination: Path) -> None:
    """Finish a streamed recording: header, index, then the folder renamed into place; map the tensors."""
    stored = {_tensor_key(call, leaf): value for call in rec.calls for leaf, value in call.tensors.items()}
    writer.finish(stored)
    writer.close()
    mapped = map_tensors(folder / TENSOR_FILE, writer.data_offset(), stored)
    for call in rec.calls:
        for leaf in call.tensors:
            call.tensors[leaf] = mapped[_tensor_key(call, leaf)]
    _write_index(folder, rec, writer)
    _replace_folder(folder, destination)
