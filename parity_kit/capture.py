"""Capture: forward hooks that turn a model run into a :class:`~parity_kit.recording.Recording`.

``record()`` hooks the selected modules, stores every call separately (once per decode step, twice
for a module used twice in one forward), and removes exactly the hooks it added when the block ends,
also when the forward or the memory budget raises.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import fnmatch
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from .dtypes import DtypeLike, dtype_name, parse_dtype
from .errors import ParityKitError
from .recording import Call, Recording, StatsBatch, TensorStats

ModuleSpec = str | Sequence[str] | type[nn.Module] | tuple[type[nn.Module], ...]

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MAX_DEPTH = 8
_AUTO_STATS_BATCH = 2**30


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
    named = list(model.named_modules())
    if isinstance(modules, type) or (
        isinstance(modules, tuple) and modules and all(isinstance(m, type) for m in modules)
    ):
        classes = modules if isinstance(modules, tuple) else (modules,)
        if not all(issubclass(c, nn.Module) for c in classes):
            raise ParityKitError(f"modules={modules!r}: classes must be torch.nn.Module subclasses")
        found = [(n, m) for n, m in named if isinstance(m, classes)]
        if not found:
            present = sorted({type(m).__name__ for _, m in named})
            raise ParityKitError(
                f"no module is an instance of {[c.__name__ for c in classes]}; classes in this model: {present}"
            )
        return found
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
    return [(n, m) for n, m in named if n in chosen]


def _match(pattern: str, names: list[str]) -> list[str]:
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
    """Placeholder for statistics whose reduction is deferred to a batch; filled when it resolves."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: TensorStats | None = None


class _Capturer:
    """The hook callbacks of one ``record()`` block; writes into ``recording``.

    Hooks never wait for the device: statistics of CUDA tensors are reduced in batches
    (:class:`StatsBatch`) and tensors bound for host memory are copied on a side stream; ``finish()``
    waits once, when the block ends.
    """

    def __init__(self, recording: Recording, device: torch.device, dtype: torch.dtype | None,
                 budget: int | None, per_token: bool, stats_batch: int | None, defer_cpu: bool):
        self.rec, self.device, self.dtype, self.budget, self.per_token = recording, device, dtype, budget, per_token
        self.stored = 0
        self.counts: dict[str, int] = {}
        # inputs are captured before forward runs (the model may modify them in place) and kept
        # until the matching output hook; a stack per module handles re-entrant calls
        self.pending: dict[str, list[tuple[dict, dict]]] = {}
        self.stats_batch, self.defer_cpu = stats_batch, defer_cpu
        self.deferred: list[tuple[_Slot, torch.Tensor, int | None, str]] = []
        self.deferred_bytes = 0
        self.inflight: list[tuple[StatsBatch, list[_Slot]]] = []
        self.copy_streams: dict[torch.device, torch.cuda.Stream] = {}

    # ------------------------------------------------------------------ statistics
    def defer(self, t: torch.Tensor) -> bool:
        return self.stats_batch is not None and (t.is_cuda or self.defer_cpu) and t.numel() > 0

    def defer_stats(self, t: torch.Tensor, label: str) -> _Slot:
        slot = _Slot()
        # an inference-mode tensor has no version counter, so in-place changes cannot be detected
        version = None if t.is_inference() else t._version
        self.deferred.append((slot, t.detach(), version, label))
        self.deferred_bytes += t.numel() * t.element_size()
        if self.deferred_bytes >= self.stats_batch:
            self.flush()
        return slot

    def flush(self) -> None:
        """Queue the reduction of the deferred tensors; resolve the batch before it (double buffering)."""
        if self.deferred:
            slots, tensors, versions, labels = (list(x) for x in zip(*self.deferred))
            self.inflight.append((StatsBatch(tensors, self.per_token, versions, labels), slots))
            self.deferred, self.deferred_bytes = [], 0
        while len(self.inflight) > 1:
            self.resolve_oldest()

    def resolve_oldest(self) -> None:
        batch, slots = self.inflight.pop(0)
        for slot, stats in zip(slots, batch.result()):
            slot.value = stats

    # ------------------------------------------------------------------ tensors
    def offload(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Copy a CUDA tensor into pinned host memory on a side stream, without waiting for it."""
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
        # the caching allocator must not hand ``private`` out again before the side stream read it
        private.record_stream(stream)
        return host

    def finish(self) -> None:
        """Wait for queued copies and reductions and put the statistics into the recording's calls."""
        for stream in self.copy_streams.values():
            stream.synchronize()
        self.flush()
        while self.inflight:
            self.resolve_oldest()
        if self.rec.mode == "stats":
            for call in self.rec.calls:
                for leaf, value in call.tensors.items():
                    if isinstance(value, _Slot):
                        call.tensors[leaf] = value.value

    def grab(self, leaves: Iterator[tuple[str, torch.Tensor]], name: str) -> tuple[dict, dict]:
        tensors: dict[str, Any] = {}
        orig: dict[str, str] = {}
        for leaf, t in leaves:
            if self.rec.mode == "stats":
                if self.defer(t):
                    tensors[leaf] = self.defer_stats(t, f"module {name!r} leaf {leaf!r}")
                else:
                    tensors[leaf] = TensorStats.of(t, self.per_token)
                continue
            # only an explicit dtype= casts, and only floating tensors: never a silent down-cast
            dtype = self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype
            need = t.numel() * (torch.finfo(dtype).bits // 8 if dtype.is_floating_point else t.element_size())
            if self.budget is not None and self.stored + need > self.budget:
                raise ParityKitError(
                    f"memory_budget {_format_bytes(self.budget)} exceeded while capturing {name!r} "
                    f"leaf {leaf!r}: captured {_format_bytes(self.stored)} so far, this tensor needs "
                    f"{_format_bytes(need)}; use mode='stats', a narrower modules= pattern, device='cpu', "
                    "or raise memory_budget"
                )
            if t.is_cuda and self.device.type == "cpu":
                tensors[leaf] = self.offload(t, dtype)
            else:
                # copy=True: never alias a tensor the model may later modify in place
                tensors[leaf] = t.detach().to(device=self.device, dtype=dtype, copy=True)
            self.stored += need
            if dtype != t.dtype:
                orig[leaf] = dtype_name(t.dtype)
        return tensors, orig

    def pre_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            a = self.grab(_leaves(args, "input"), name)
            k = self.grab(_leaves(kwargs, "input"), name)
            self.pending.setdefault(name, []).append(({**a[0], **k[0]}, {**a[1], **k[1]}))
        return hook

    def forward_hook(self, name: str, with_inputs: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            tensors, orig = self.grab(_leaves(output, "output"), name)
            if with_inputs and self.pending.get(name):
                in_tensors, in_orig = self.pending[name].pop()
                tensors, orig = {**tensors, **in_tensors}, {**orig, **in_orig}
            index = self.counts.get(name, 0)
            self.counts[name] = index + 1
            self.rec.calls.append(Call(name, index, len(self.rec.calls), tensors, orig))
        return hook


def _model_metadata(model: nn.Module) -> dict[str, Any]:
    params = list(model.parameters())
    dtypes = sorted({dtype_name(p.dtype) for p in params})
    meta: dict[str, Any] = {
        "model_class": type(model).__name__,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "device": str(params[0].device) if params else "cpu",
        "input_shapes": None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta["environment"] = _environment()
    return meta


def _environment() -> dict[str, Any] | None:
    try:
        from .report import environment_capsule
    except ImportError:  # report.py is optional for capture
        return None
    return environment_capsule()


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
) -> Iterator[Recording]:
    """Record every call of the selected modules while the block runs.

    ``mode="tensors"`` keeps detached copies of every tensor leaf of the outputs (and of the inputs
    with ``inputs=True``), moved to ``device`` and, for floating tensors, cast to ``dtype`` only when
    ``dtype`` is given (the original dtype is remembered per leaf). ``memory_budget`` caps the bytes
    kept, counted as each copy is scheduled; crossing it raises ParityKitError. CUDA tensors bound for
    ``device="cpu"`` go into pinned host memory through a side stream, so the forward does not wait for
    the transfers; the block's end waits for them once.

    ``mode="stats"`` keeps only :class:`TensorStats` per leaf (``per_token`` adds the per-row rms, at
    no extra cost in the batched path). With ``stats_batch="auto"`` the statistics of CUDA tensors are
    reduced in batches: a hook only keeps a reference to the output, and once the referenced outputs
    reach 1 GiB (or the block ends) they are reduced together with a few kernels and no host
    synchronisation inside the forward; CPU tensors are reduced in their hook. An int or size string
    ("256MiB") sets the batch size and batches CPU tensors too; ``0`` or None reduces each tensor in
    its hook (one host synchronisation per tensor on CUDA; use it for models that modify module
    outputs in place, which the batched path detects and refuses). Statistics are complete when the
    block ends. Calls are stored in completion order, so a parent module follows its children.

    >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    >>> with record(m, "*", mode="stats") as rec:
    ...     _ = m(torch.ones(3, 4))
    >>> rec.names, rec["1"][0].output.shape
    (['0', '1'], (3, 4))
    """
    if mode not in ("tensors", "stats"):
        raise ParityKitError(f"mode={mode!r} is not a capture mode; use 'tensors' or 'stats'")
    selected = select_modules(model, modules)
    cast = parse_dtype(dtype) if dtype is not None else None
    if cast is not None and not cast.is_floating_point:
        raise ParityKitError(f"dtype={dtype!r}: capture casts only to floating dtypes (fp64/fp32/fp16/bf16)")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ParityKitError(f"device={str(target)!r} but CUDA is not available here; use device='cpu'")
    if stats_batch == "auto":
        batch_bytes, defer_cpu = _AUTO_STATS_BATCH, False
    else:
        try:
            batch_bytes = parse_bytes(stats_batch) or None
        except ParityKitError:
            raise ParityKitError(
                f"stats_batch={stats_batch!r} is not understood; use 'auto', bytes (int), '256MiB', or 0"
            ) from None
        defer_cpu = True
    rec = Recording(mode, metadata=_model_metadata(model))
    capturer = _Capturer(rec, target, cast, parse_bytes(memory_budget), per_token, batch_bytes, defer_cpu)

    def root_shapes(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if rec.metadata["input_shapes"] is None:
            rec.metadata["input_shapes"] = {
                name: list(t.shape) for name, t in [*_leaves(args, "input"), *_leaves(kwargs, "input")]
            }

    handles = []
    failed = False
    try:
        handles.append(model.register_forward_pre_hook(root_shapes, with_kwargs=True))
        for name, module in selected:
            if inputs:
                handles.append(module.register_forward_pre_hook(capturer.pre_hook(name), with_kwargs=True))
            handles.append(module.register_forward_hook(capturer.forward_hook(name, inputs), with_kwargs=True))
        yield rec
    except BaseException:
        failed = True
        raise
    finally:
        for handle in handles:
            handle.remove()
        capturer.pending.clear()
        try:
            capturer.finish()
        except Exception:
            if not failed:
                raise
            # the block's own exception is the one to report; the partial recording stays as it is
