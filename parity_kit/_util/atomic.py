"""Atomic file and folder writing: a reader never sees a half-written file or folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ParityKitError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temporary file next to ``path``; on success rename it over ``path``, on error delete it.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_write(p) as f:
    ...     _ = f.write("hello")
    >>> p.read_text()
    'hello'
    """
    target = Path(path)
    make_parent(target)
    fd, tmp = os_guarded(target, tempfile.mkstemp, prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    _as_plain_file(fd)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_path(path: str | os.PathLike[str]) -> contextlib.AbstractContextManager[Path]:
    """Like :func:`atomic_write` but yields a temporary *path* for libraries that write files themselves."""
    return _atomic_path(Path(path))


@contextlib.contextmanager
def _atomic_path(target: Path) -> Iterator[Path]:
    make_parent(target)
    fd, tmp = os_guarded(target, tempfile.mkstemp, prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    _as_plain_file(fd)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def make_parent(target: Path) -> None:
    """Create the folder ``target`` goes in; ParityKitError when a file is in the way or it cannot be written.

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "a-file"
    >>> _ = f.write_text("x")
    >>> make_parent(f / "sub" / "out.json")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    parity_kit.errors.ParityKitError: cannot write .../a-file/sub/out.json: .../a-file is a file, not a folder; ...
    """
    for folder in target.parents:
        if folder.exists():
            if not folder.is_dir():
                raise ParityKitError(
                    f"cannot write {target}: {folder} is a file, not a folder; pick a path below a folder"
                )
            break
    os_guarded(target, target.parent.mkdir, parents=True, exist_ok=True)


def os_guarded(target: Path, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, with a failure of the file system (permissions, a full disk) as ParityKitError."""
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        detail = e.strerror or f"{type(e).__name__}: {e}"
        raise ParityKitError(
            f"cannot write {target} ({detail}); pick a folder you can write to, or free disk space"
        ) from e


def _as_plain_file(fd: int) -> None:
    # mkstemp creates 0600 files; the renamed result should get the permissions of any new file
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


def replace_folder(new: Path, target: Path) -> None:
    """Rename folder ``new`` to ``target``; an existing target is moved aside first and removed after (and put
    back if the rename fails), so a reader finds the old folder or the new one, never a mixture."""
    if not target.exists():
        os.replace(new, target)
        return
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
