"""The storage format of a recording: a folder with ``index.json`` and ``tensors.safetensors``.

``index.json`` holds the calls, their leaves, shapes, dtypes, statistics and metadata, the size of the tensor
file and a checksum per tensor; ``tensors.safetensors`` the tensors (and per-token statistics), written one at a
time by :class:`TensorFileWriter`. The round trip is bit-exact for every dtype safetensors stores (bf16 and fp16
included); a folder appears complete or not at all.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import hashlib

from .._util.atomic import make_parent, os_guarded, replace_folder
from ..dtypes import dtype_name
from ..errors import ParityKitError
from .filesink import FileSink
from .model import Call, Mode, TensorStats, torch_dtype

FORMAT_NAME = "parity_kit.recording"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TENSOR_FILE = "tensors.safetensors"


def save_recording(recording: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``recording`` (a :class:`~parity_kit.Recording`) to folder ``path``, atomically; see its ``save``."""
    target = writable_target(path)
    tmp = Path(os_guarded(target, tempfile.mkdtemp, prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tensors: dict[str, torch.Tensor] = {}
        for call in recording.calls:
            for leaf, value in call.tensors.items():
                t = value.per_token_rms if isinstance(value, TensorStats) else value
                if t is not None:
                    tensors[tensor_key(call, leaf)] = t
        with TensorFileWriter(tmp / TENSOR_FILE, header_reserve=_header_size(tensors)) as writer:
            stored = {key: writer.write(t) for key, t in tensors.items()}
            writer.finish(stored)
        write_index(tmp, recording, writer)
        os_guarded(target, replace_folder, tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_recording(path: str | os.PathLike[str]) -> tuple[Mode, list[Call], dict[str, Any]]:
    """``(mode, calls, metadata)`` of the recording in folder ``path``; see :meth:`parity_kit.Recording.load`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    index_path, tensor_path = folder / INDEX_FILE, folder / TENSOR_FILE
    if not index_path.is_file():
        raise ParityKitError(
            f"{folder} is not a parity_kit recording (no {INDEX_FILE}); pass the folder that "
            "Recording.save() wrote"
        )
    try:
        index = json.loads(index_path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ParityKitError(
            f"{index_path} is corrupted or truncated ({e}); re-create the recording"
        ) from None
    except OSError as e:
        raise ParityKitError(f"cannot read {index_path} ({e.strerror or e}); check the folder's permissions") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise ParityKitError(f"{index_path} is not a parity_kit recording index; pass a folder written by Recording.save()")
    if index.get("version") != FORMAT_VERSION:
        raise ParityKitError(
            f"{folder} has recording format version {index.get('version')}, this parity_kit reads "
            f"version {FORMAT_VERSION}; re-create it with this version"
        )
    stored_sum = index.get(INDEX_CHECKSUM)
    if stored_sum is not None and stored_sum != index_checksum(index):
        raise ParityKitError(
            f"{index_path} is corrupted: its content does not match its checksum (an edited or damaged "
            "index would load as different statistics or shapes); re-create the recording"
        )
    expected = index.get("tensor_file", {})
    if not tensor_path.is_file():
        raise ParityKitError(f"{folder} lacks {TENSOR_FILE}; the recording is incomplete, re-create it")
    size = tensor_path.stat().st_size
    if size != expected.get("bytes"):
        raise ParityKitError(
            f"{tensor_path} is truncated or corrupted ({size} bytes, index expects "
            f"{expected.get('bytes')} bytes); re-create the recording"
        )
    try:
        stored = load_file(tensor_path)
        bad = _checksum_mismatches(stored, expected)
        if bad:
            raise ParityKitError(
                f"{tensor_path} is truncated or corrupted: the checksum of {len(bad)} tensor(s) ({', '.join(bad[:3])}) does "
                "not match the index; re-create the recording"
            )
        calls = [_call_from_json(c, stored) for c in index["calls"]]
        return index["mode"], calls, index.get("metadata", {})
    except (SafetensorError, KeyError, TypeError, ValueError) as e:
        raise ParityKitError(f"{folder} is corrupted ({type(e).__name__}: {e}); re-create the recording") from None


def _call_from_json(entry: dict[str, Any], stored: dict[str, torch.Tensor]) -> Call:
    tensors: dict[str, torch.Tensor | TensorStats] = {}
    orig: dict[str, str] = {}
    for leaf, info in entry["leaves"].items():
        if info["kind"] == "stats":
            ptr = stored[info["per_token_rms"]] if "per_token_rms" in info else None
            tensors[leaf] = TensorStats(tuple(info["shape"]), info["dtype"], info["min"], info["max"],
                                        info["mean"], info["rms"], info["absmax"], info["nan"], info["inf"], ptr)
        else:
            tensor = stored[info["key"]]
            if list(tensor.shape) != info["shape"] or tensor.dtype != torch_dtype(info["dtype"]):
                raise ValueError(f"tensor {info['key']} does not match its index entry")
            tensors[leaf] = tensor
        if info["orig_dtype"] != info["dtype"]:
            orig[leaf] = info["orig_dtype"]
    return Call(entry["module"], entry["index"], entry["order"], tensors, orig)


def tensor_key(call: Call, leaf: str) -> str:
    return f"{call.order}:{leaf}"


def writable_target(path: str | os.PathLike[str]) -> Path:
    """``path`` as a folder a recording may be written to (new, empty, or an older recording)."""
    target = Path(path)
    if target.exists() and not (target / INDEX_FILE).exists() and (not target.is_dir() or any(target.iterdir())):
        raise ParityKitError(
            f"{target} exists and is not a parity_kit recording; pick a new path or delete it first"
        )
    make_parent(target)
    return target


def write_index(folder: Path, recording: Any, writer: TensorFileWriter) -> None:
    """``index.json`` of ``recording``, whose tensors ``writer`` stored under :func:`tensor_key` keys."""
    calls_json = []
    for call in recording.calls:
        leaves: dict[str, Any] = {}
        for leaf, value in call.tensors.items():
            key = tensor_key(call, leaf)
            if isinstance(value, TensorStats):
                entry = {"kind": "stats", **value._to_json()}
                if value.per_token_rms is not None:
                    entry["per_token_rms"] = key
            else:
                entry = {"kind": "tensor", "key": key, "shape": list(value.shape), "dtype": dtype_name(value.dtype)}
            entry["orig_dtype"] = call.orig_dtype(leaf)
            leaves[leaf] = entry
        calls_json.append({"module": call.module, "index": call.index, "order": call.order, "leaves": leaves})
    index = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "mode": recording.mode,
        "metadata": recording.metadata, "calls": calls_json,
        "tensor_file": {"name": TENSOR_FILE, "bytes": writer.size, "checksum": CHECKSUM_NAME,
                        "checksums": writer.checksums},
    }
    text = json.dumps(index, indent=1, default=str, allow_nan=True)
    index[INDEX_CHECKSUM] = index_checksum(json.loads(text))
    os_guarded(folder / INDEX_FILE, (folder / INDEX_FILE).write_text,
               json.dumps(index, indent=1, default=str, allow_nan=True), "utf-8")


INDEX_CHECKSUM = "index_sha256"


def index_checksum(index: dict[str, Any]) -> str:
    """SHA-256 of an index's content (everything but this checksum), as JSON with sorted keys.

    Statistics of ``mode="stats"`` live only in the index, so the index is checksummed like the tensors: a
    flipped digit would otherwise load as a different rms.

    >>> index_checksum({"a": 1.5}) == index_checksum({"a": 1.5, INDEX_CHECKSUM: "x"}) != index_checksum({"a": 1.6})
    True
    """
    body = {k: v for k, v in index.items() if k != INDEX_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=True).encode()).hexdigest()


# safetensors' names of the dtypes a recording can hold
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


@dataclass(frozen=True)
class StoredTensor:
    """Where :class:`TensorFileWriter` put a tensor: byte range in the data section, dtype, shape."""

    start: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class TensorFileWriter:
    """Writes a safetensors file one tensor at a time, the header last.

    safetensors puts a JSON header (its length first) before the data. The header's size is not
    known while tensors are still arriving, so ``header_reserve`` bytes are set aside up front; at
    :meth:`finish` the header is written there, padded with spaces (which the format allows). A
    header that outgrows its reserve makes :meth:`finish` rewrite the file once with a larger one.
    The bytes go through a :class:`~parity_kit.recording.filesink.FileSink`: :meth:`write` copies them into
    reused buffers and returns while a thread writes them out (with ``O_DIRECT`` where allowed), so
    the tensor may change afterwards and the disk works while the model runs. Each tensor's checksum
    (:func:`tensor_checksum`) is computed as it is written. A failed write (a full disk, say) raises
    ParityKitError. Used as a context manager, the file is closed in any case;
    the caller removes a file whose writing failed.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "t.safetensors"
    >>> with TensorFileWriter(path) as w:
    ...     w.finish({"x": w.write(torch.arange(3.0))})
    >>> from safetensors.torch import load_file
    >>> load_file(path)["x"].tolist()
    [0.0, 1.0, 2.0]
    """

    def __init__(self, path: str | os.PathLike[str], header_reserve: int = 1 << 16):
        self.path = Path(path)
        self.reserve = -(-max(header_reserve, 64) // 8) * 8  # keeps the data section 8-byte aligned
        self.size = 0
        self.checksums: dict[str, int] = {}
        self._written: list[tuple[int, int]] = []
        self._checksum_of: dict[int, int] = {}  # start offset -> checksum (non-empty tensors)
        self._data = 0
        self._sink = self._guarded(FileSink, self.path)
        self._guarded(self._sink.append, bytes(8 + self.reserve))

    def __enter__(self) -> TensorFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sink.close()

    def _guarded(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as e:
            detail = e.strerror or f"{type(e).__name__}: {e}"
            raise ParityKitError(
                f"writing {self.path} failed ({detail}); free disk space or record to another folder"
            ) from e

    def write(self, tensor: torch.Tensor) -> StoredTensor:
        """Append ``tensor``'s bytes (moved to the CPU if needed); returns where they went."""
        t = tensor.detach()
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise ParityKitError(
                f"a {t.dtype} tensor cannot be stored in a recording (safetensors has no such dtype); "
                "capture it with mode='stats' or leave its module out of modules="
            )
        data = _bytes_of(t)
        start = self._data
        if data.numel():
            self._checksum_of[start] = tensor_checksum(data)
            self._guarded(self._sink.append, data)
        self._data += data.numel()
        self._written.append((start, self._data))
        return StoredTensor(start, self._data, t.dtype, tuple(t.shape))

    def finish(self, stored: dict[str, StoredTensor]) -> None:
        """Write the header naming every stored tensor (each written tensor must appear once)."""
        if sorted((s.start, s.end) for s in stored.values()) != sorted(self._written):
            raise ParityKitError("internal error: the header must name every tensor written, once")
        header = {key: {"dtype": _SAFETENSORS_DTYPES[s.dtype], "shape": list(s.shape),
                        "data_offsets": [s.start, s.end]} for key, s in stored.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        # an empty tensor shares its start offset with the tensor after it: its checksum is the empty sum
        self.checksums = {key: self._checksum_of.get(s.start, 0) if s.end > s.start else 0
                          for key, s in stored.items()}
        self._guarded(self._sink.finish)
        if len(blob) <= self.reserve:
            self._guarded(self._write_header, struct.pack("<Q", self.reserve) + blob + b" " * (self.reserve - len(blob)))
        else:
            self._guarded(self._rewrite_with_header, blob)
        self.size = self.path.stat().st_size

    def _write_header(self, header: bytes) -> None:
        with open(self.path, "r+b") as f:
            f.write(header)

    def _rewrite_with_header(self, blob: bytes) -> None:
        blob += b" " * (-len(blob) % 8)
        bigger = self.path.with_name(self.path.name + ".grow")
        with open(self.path, "rb") as old, open(bigger, "wb") as new:
            new.write(struct.pack("<Q", len(blob)) + blob)
            old.seek(8 + self.reserve)
            shutil.copyfileobj(old, new, 1 << 24)
        os.replace(bigger, self.path)
        self.reserve = len(blob)

    def data_offset(self) -> int:
        """Byte position of the data section in the file (valid after :meth:`finish`)."""
        return 8 + self.reserve


def _header_size(tensors: dict[str, torch.Tensor]) -> int:
    """Generous size of the safetensors header naming ``tensors`` (so that it is written only once)."""
    return 64 + sum(96 + len(key) + 21 * t.dim() for key, t in tensors.items())


def map_tensors(path: Path, data_offset: int, stored: dict[str, StoredTensor]) -> dict[str, torch.Tensor]:
    """Tensors backed by a copy-on-write memory map of a file :class:`TensorFileWriter` wrote.

    Pages are read from the file when touched; writing to a returned tensor changes this process's
    copy only, never the file.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return {}
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for key, s in stored.items():
        n = math.prod(s.shape)
        if n == 0:
            out[key] = torch.empty(s.shape, dtype=s.dtype)
        else:
            out[key] = torch.frombuffer(buffer, dtype=s.dtype, count=n, offset=data_offset + s.start).view(s.shape)
    return out


CHECKSUM_NAME = "sum64"
_WORD_BYTES = 8


def tensor_checksum(tensor: torch.Tensor) -> int:
    """Checksum of a tensor's bytes: their little-endian 64-bit words summed modulo 2**64, plus the tail.

    It catches flipped bits, truncation and overwritten or zeroed blocks, and runs at memory speed
    on all of torch's threads (about 20 GB/s on 2 cores, where zlib's CRC-32 ran at 2.5-4 GB/s and,
    in a recording streamed to disk, cost more than the write). It does not catch words swapped
    with each other, and it guards against accidents, not tampering.

    >>> tensor_checksum(torch.zeros(3)), tensor_checksum(torch.tensor([1], dtype=torch.int64))
    (0, 1)
    """
    data = _bytes_of(tensor)
    whole = data.numel() - data.numel() % _WORD_BYTES
    total = 0
    if whole:
        words = data[:whole]
        if words.storage_offset() % _WORD_BYTES:
            words = words.clone()
        total = int(words.view(torch.int64).sum())  # wraps modulo 2**64
    for i, byte in enumerate(data[whole:].tolist()):
        total += byte << (8 * i)
    return total % 2**64


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 CPU tensor (an empty tensor of any strides has none).

    torch calls a tensor of size-1 dimensions contiguous whatever their strides (a slice ``x[::2]`` of two
    values), but viewing it as bytes needs a unit stride.

    >>> _bytes_of(torch.zeros(2, dtype=torch.float64)[::2]).shape
    torch.Size([8])
    """
    t = tensor.detach().cpu()
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    flat = t.contiguous().reshape(-1)
    if flat.stride(0) != 1:  # one element, with a stride other than 1
        flat = flat.as_strided((1,), (1,))
    return flat.view(torch.uint8)


def _checksum_mismatches(stored: dict[str, torch.Tensor], expected: dict[str, Any]) -> list[str]:
    """Keys whose checksum differs from the index (``sum64``, or the CRC-32 of earlier recordings)."""
    if expected.get("checksum") == CHECKSUM_NAME:
        sums = expected.get("checksums", {})
        return [key for key, t in stored.items() if tensor_checksum(t) != sums.get(key)]
    crcs = expected.get("crc32", {})
    return [key for key, t in stored.items()
            if zlib.crc32(_bytes_of(t).numpy()) != crcs.get(key)]


