"""Capture: forward hooks that turn a model run into a :class:`~parity_kit.Recording`.

``record()`` hooks the selected modules, stores every call separately (once per decode step, twice
for a module used twice in one forward), and removes exactly the hooks it added when the block ends,
also when the forward or the memory budget raises.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .._util.atomic import replace_folder
from .._util.environment import environment_capsule
from .._util.sizes import parse_bytes
from .._util.trees import leaves
from ..dtypes import DtypeLike, dtype_name, parse_dtype
from ..errors import ParityKitError
from ..recording import Recording
from ..recording.storage import TENSOR_FILE, TensorFileWriter, map_tensors, tensor_key, writable_target, write_index
from .capturer import Capturer, install_hooks
from .selection import ModuleSpec, named_modules, select_from

#: The unit of the automatic batch sizes: 1 GiB of outputs.
AUTO_BATCH = 2**30






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
    metadata["environment"] = environment_capsule()


def auto_stats_batch(device: str) -> int:
    """``stats_batch="auto"`` for a model on ``device``: 4 GiB, at most 1/32 of a GPU's memory.

    The outputs of a batch stay alive until its reduction has run, so the batch is memory the model
    would otherwise have reused; in return, fewer batches cost less host time (each one is a few
    launches and tables), and a forward of a 7B model at 512 tokens is one batch (the 7B-shaped outputs
    of ``benchmarks/row_stats_throughput.py`` are 2.46 GB).
    """
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return AUTO_BATCH
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return min(4 * AUTO_BATCH, max(AUTO_BATCH // 4, total // 32))


def _batch_bytes(value: int | str | None, knob: str, auto: int = AUTO_BATCH) -> tuple[int | None, bool]:
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
    few kernels and no host synchronisation inside the forward. A CPU output of at most 256 KiB
    (``capturer.SNAPSHOT_CPU_BYTES``: the decode-step case) joins the batch as a private copy, reduced with the
    others by NumPy at the block's end, so an in-place change by the model later does not reach it; a larger
    CPU output is reduced in its hook.
    The block ends with every statistic on the host and no output held; the :class:`TensorStats` are
    built when ``rec.calls`` is first read. An int or size string
    ("256MiB") sets the batch size and batches CPU tensors too; ``0`` or None reduces each tensor in
    its hook (one host synchronisation per tensor on CUDA). ``copy_batch`` does the same for the
    copies ``mode="tensors"`` keeps on the tensor's own device: "auto" batches CUDA tensors (one
    concatenation per group of like tensors instead of one copy each), ``0`` copies in the hook.
    Deferred work needs the output unchanged until its batch runs: a module output that the model
    modifies in place later is detected (version counter) and refused with an error that names the
    knob to set to 0. Results are complete when the block ends; reading ``rec.calls`` inside the block raises
    ParityKitError. A block that raises (the forward failed part-way) re-raises its exception and leaves
    ``rec.metadata["complete"]`` False (True otherwise), with the exception in ``metadata["interrupted"]``;
    :func:`parity_kit.compare` marks such a recording's rows "incomplete ...". Calls are stored in completion order,
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
    named = named_modules(model)
    selected = select_from(named, modules)
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
    stats_bytes, defer_cpu_stats = _batch_bytes(stats_batch, "stats_batch", auto_stats_batch(metadata["device"]))
    copy_bytes, defer_cpu_copies = _batch_bytes(copy_batch, "copy_batch")
    rec = Recording(mode, metadata=metadata)
    destination = writable_target(save_to) if save_to is not None else None
    folder = writer = None
    if destination is not None and mode == "tensors":
        folder = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
        writer = TensorFileWriter(folder / TENSOR_FILE)
    capturer = Capturer(rec, target, cast, parse_bytes(memory_budget), per_token, stats_bytes, copy_bytes,
                         defer_cpu_stats if mode == "stats" else defer_cpu_copies, writer, inputs)

    def root_shapes(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if rec.metadata["input_shapes"] is None:
            rec.metadata["input_shapes"] = {
                name: list(t.shape) for name, t in [*leaves(args, "input"), *leaves(kwargs, "input")]
            }

    handles = []
    failure: BaseException | None = None
    try:
        handles.append(model.register_forward_pre_hook(root_shapes, with_kwargs=True))
        handles.extend(install_hooks(capturer, selected, named, inputs))
        rec.in_block = True
        yield rec
    except BaseException as e:
        failure = e
        raise
    finally:
        rec.in_block = False
        _mark_completion(rec.metadata, failure)
        _end_block(capturer, rec, named, handles, failure is not None, destination, writer, folder)


def _mark_completion(metadata: dict[str, Any], failure: BaseException | None) -> None:
    """``complete`` in the metadata: False when the block raised (the forward stopped part-way, so later modules
    are missing and parents of the failing one never finished), with the exception in ``interrupted``."""
    metadata["complete"] = failure is None
    if failure is not None:
        metadata["interrupted"] = f"{type(failure).__name__}: {failure}"[:500]


def _end_block(capturer: Capturer, rec: Recording, named: list[tuple[str, nn.Module]], handles: list[Any],
               failed: bool, destination: Path | None, writer: TensorFileWriter | None, folder: Path | None) -> None:
    """What ``record()`` does when its block ends, normally or not: every hook removed, the batches resolved,
    the metadata completed and, with ``save_to=``, the folder published. After a failure in the block the
    block's own exception is the one reported; the partial recording stays as it is."""
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
    finally:
        if writer is not None:
            writer.close()
        if folder is not None and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)


def _publish_stream(rec: Recording, writer: TensorFileWriter, folder: Path, destination: Path) -> None:
    """Finish a streamed recording: header, index, then the folder renamed into place; map the tensors."""
    stored = {tensor_key(call, leaf): value for call in rec.calls for leaf, value in call.tensors.items()}
    writer.finish(stored)
    writer.close()
    mapped = map_tensors(folder / TENSOR_FILE, writer.data_offset(), stored)
    for call in rec.calls:
        for leaf in call.tensors:
            call.tensors[leaf] = mapped[tensor_key(call, leaf)]
    write_index(folder, rec, writer)
    replace_folder(folder, destination)
