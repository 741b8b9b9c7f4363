"""The per-call work of a capture: what a forward hook or a wrapped ``forward`` does with each output.

A :class:`Capturer` collects one ``record()`` block's calls; :class:`ForwardWrap` is the wrapper put in a
module's ``forward`` slot (cheaper per call than a hook), :func:`install_hooks` chooses between the two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.utils.hooks import RemovableHandle

from .._util.sizes import format_bytes
from .._util.trees import leaves
from ..dtypes import dtype_name
from ..errors import ParityKitError
from ..recording import Call, Recording, TensorStats
from ..recording.storage import TensorFileWriter
from .stats_batch import StatsBatch

#: CUDA outputs streamed to disk (``record(save_to=...)``) are written once this many bytes of pinned host
#: copies wait.
PINNED_WRITE_BYTES = 2**30

#: With ``stats_batch="auto"``, a CPU output of at most this many bytes is copied into the batch (a private
#: copy, so an in-place change by the model later cannot reach it) and reduced with the others when the batch
#: runs; a larger one is reduced in its hook. A copy is one small op where the in-hook statistics are about ten,
#: two thread-count changes and a host read; past a few hundred KiB the copy itself costs more than they do.
SNAPSHOT_CPU_BYTES = 256 * 2**10


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


class Capturer:
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
        # stats_batch="auto": CPU outputs are not deferred by reference, but small ones are copied into the batch
        self.snapshot_cpu = self.stats_mode and stats_batch is not None and not defer_cpu
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
            elif self.snapshot_cpu and t.numel() and t.nbytes <= SNAPSHOT_CPU_BYTES and t.device.type == "cpu":
                # a private copy: nothing the model does to ``t`` later reaches it, so no version to check
                self.deferred.append((self.slot(tensors, leaf), (t.detach() if t.requires_grad else t).clone(), None,
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
                if self.unwritten_bytes >= PINNED_WRITE_BYTES:
                    self.write_pending()
            else:  # copied into the writer's buffers now; its thread writes them while the model runs
                tensors[leaf] = self.writer.write(t.detach().to(dtype=dtype))
            return
        if self.budget is not None and self.stored + need > self.budget:
            raise ParityKitError(
                f"memory_budget {format_bytes(self.budget)} exceeded while capturing {name!r} "
                f"leaf {leaf!r}: captured {format_bytes(self.stored)} so far, this tensor needs "
                f"{format_bytes(need)}; use mode='stats', save_to= (stream to disk), a narrower "
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
            for leaf, t in leaves(obj, prefix):
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
        takes its common case itself (:meth:`ForwardWrap.__call__`) and comes here for the others."""
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


class ForwardWrap:
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

    def __init__(self, module: nn.Module, name: str, capturer: Capturer) -> None:
        self.module, self.name = module, name
        self.capturer: Capturer | None = capturer
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
        if placeholders is None or type(output) is not torch.Tensor:
            capturer.output(self.name, output, index)
            return output
        if output.is_cuda or capturer.defer_cpu:
            if capturer.versions_unchecked:
                try:
                    version = output._version
                except RuntimeError:  # an inference tensor: no version counter, in-place changes go unseen
                    capturer.versions_unchecked = False
                    version = None
            else:
                version = None if output.is_inference() else output._version
            placeholders.append([self.name, index, output, version])
        elif capturer.snapshot_cpu and output.nbytes <= SNAPSHOT_CPU_BYTES and output.device.type == "cpu":
            # a small CPU output: a private copy joins the batch (see SNAPSHOT_CPU_BYTES), no version to check
            placeholders.append([self.name, index, (output.detach() if output.requires_grad else output).clone(), None])
        else:
            capturer.output(self.name, output, index)
            return output
        capturer.deferred_bytes += output.nbytes
        if capturer.deferred_bytes >= capturer.stats_batch:  # type: ignore[operator]
            capturer.flush_stats()
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


def install_hooks(capturer: Capturer, selected: list[tuple[str, nn.Module]], named: list[tuple[str, nn.Module]],
                   inputs: bool) -> list[RemovableHandle | ForwardWrap]:
    """Hook the selected modules; returns the handles to remove (``RemovableHandle``/``ForwardWrap``).

    A module without forward hooks of its own, while no process-wide forward hook is registered, gets
    its ``forward`` wrapped (:class:`ForwardWrap`): the recording sees exactly what a forward hook
    would, and torch keeps its fast call path (what per-module hooks that do nothing cost is
    ``noop_hooks`` in ``benchmarks/capture_overhead.py``). The others get a forward hook appended
    after their existing ones, so the recording sees what those hooks (a dtype cast, a perturbation)
    return. Inside ``nn.DataParallel`` replicas are made by
    copying modules, which would copy a wrapper bound to the original, so only hooks are used there.
    """
    handles: list[RemovableHandle | ForwardWrap] = []
    wrap = not torch_module._global_forward_hooks and not any([isinstance(m, nn.DataParallel) for _, m in named])
    for name, module in selected:
        if inputs:
            handles.append(module.register_forward_pre_hook(capturer.pre_hook(name), with_kwargs=True))
        if wrap and not module._forward_hooks:
            handles.append(ForwardWrap(module, name, capturer))
        else:
            handles.append(module.register_forward_hook(capturer.forward_hook(name)))
    return handles
