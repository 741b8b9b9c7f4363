"""A :class:`Recording`: the calls a capture produced, in completion order, with their metadata."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


from ..errors import ParityKitError
from .model import Call, Mode, TensorStats
from .storage import load_recording, save_recording


class Recording:
    """Captured calls of a model, in completion order; see :func:`parity_kit.record`.

    >>> import torch
    >>> rec = Recording("tensors", [Call("a", 0, 0, {"output": torch.ones(2)}),
    ...                             Call("a", 1, 1, {"output": torch.zeros(2)})])
    >>> rec.names, len(rec["a"]), rec["a"][1].output.tolist()
    (['a'], 2, [0.0, 0.0])
    """

    def __init__(self, mode: Mode, calls: list[Call] | None = None, metadata: dict[str, Any] | None = None):
        if mode not in ("tensors", "stats"):
            raise ParityKitError(f"unknown recording mode {mode!r}; use 'tensors' or 'stats'")
        self.mode: Mode = mode
        self._calls: list[Call] = list(calls or [])
        # Work that turns numbers already on the host into TensorStats and Calls, run on first access
        # to ``calls``: a stats capture ends without building a Python object per tensor.
        self._unbuilt: list[Callable[[], None]] = []
        # True while a ``record()`` block fills this recording: its calls are placeholders until the block ends
        self.in_block = False
        self.metadata: dict[str, Any] = dict(metadata or {})

    @property
    def calls(self) -> list[Call]:
        """The calls, in completion order (statistics left to build by ``record()`` are built first).

        Read after the ``with record(...)`` block: inside it, statistics and deferred copies are still
        placeholders, so reading raises ParityKitError.
        """
        if self.in_block:
            raise ParityKitError(
                "rec.calls (and len(rec), rec[name], rec.names) was read inside its `with record(...)` block; the "
                "recording is complete only when the block ends (statistics and copies are batched until then): "
                "read it after the block"
            )
        while self._unbuilt:
            self._unbuilt.pop(0)()
        return self._calls

    @calls.setter
    def calls(self, calls: list[Call]) -> None:
        self._calls, self._unbuilt = list(calls), []

    def __getstate__(self) -> dict[str, Any]:
        self.calls  # noqa: B018  # build what is left: the builders cannot be pickled or copied
        return {k: v for k, v in self.__dict__.items() if k != "_unbuilt"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._unbuilt = []
        self.in_block = False

    @property
    def names(self) -> list[str]:
        """Unique module names in order of first completion."""
        return list(dict.fromkeys(c.module for c in self.calls))

    def __getitem__(self, name: str) -> list[Call]:
        found = [c for c in self.calls if c.module == name]
        if not found:
            close = difflib.get_close_matches(name, self.names, n=5, cutoff=0.5)
            hint = f"; close names: {close}" if close else f"; recorded names start with {self.names[:5]}"
            raise ParityKitError(f"module {name!r} is not in this recording{hint}")
        return found

    def __contains__(self, name: object) -> bool:
        return any(c.module == name for c in self.calls)

    def __len__(self) -> int:
        return len(self.calls)

    def __iter__(self) -> Iterator[Call]:
        return iter(self.calls)

    def __repr__(self) -> str:
        return f"Recording(mode={self.mode!r}, calls={len(self.calls)}, modules={len(self.names)})"

    def nbytes(self) -> int:
        """Bytes held by the captured tensors (statistics count their per-token vectors)."""
        total = 0
        for call in self.calls:
            for v in call.tensors.values():
                t = v.per_token_rms if isinstance(v, TensorStats) else v
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the recording to folder ``path`` (``index.json`` + ``tensors.safetensors``), atomically.

        The folder is built next to ``path`` and renamed into place, so a reader never sees a half
        written recording. An existing recording at ``path`` is replaced; any other existing,
        non-empty folder is refused.

        >>> import tempfile, torch
        >>> rec = Recording("tensors", [Call("a", 0, 0, {"output": torch.ones(2, dtype=torch.bfloat16)})])
        >>> back = Recording.load(rec.save(tempfile.mkdtemp() + "/rec"))
        >>> back["a"][0].output.dtype
        torch.bfloat16
        """
        return save_recording(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recording:
        """Read a recording written by :meth:`save`; verifies the tensor file's size and each tensor's checksum.

        Raises ParityKitError for a path that is not a recording and for truncated or corrupted files.

        >>> Recording.load("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        parity_kit.errors.ParityKitError: /nonexistent is not a parity_kit recording ...
        """
        mode, calls, metadata = load_recording(path)
        return cls(mode, calls, metadata)
