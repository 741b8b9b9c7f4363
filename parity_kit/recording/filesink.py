"""Appending bytes to a file while the caller goes on: a ring of bounce buffers and a writer thread.

A recording streamed to disk produces hundreds of MB to many GB during a forward pass. Written from
the hooks through the page cache, each write held up the forward; held back and written in bulk at
the end, nothing overlapped it. On a virtual machine that hands freed memory back to its host,
page-cache pages touched again after a pause are also slow (``benchmarks/write_paths.py`` measures
both ways of writing).

So :class:`FileSink` copies the caller's bytes into a few reused, page-aligned buffers and returns;
a thread writes full buffers, with ``O_DIRECT`` where the OS and file system allow it: the page
cache does not fill with data the recording maps back lazily anyway, and the thread's wait on the
disk overlaps the forward (``benchmarks/capture_overhead.py``, ``tensors_disk``, measures the
result). Where ``O_DIRECT`` is refused (macOS, tmpfs on older kernels, some network file systems),
the same thread writes through the page cache.

An error in the writer thread (a full disk, say) is raised as the ``OSError`` it was, by the next
:meth:`FileSink.append` or by :meth:`FileSink.finish`.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading

import torch

__all__ = ["FileSink"]

_ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses: a multiple of the device's block size


class FileSink:
    """Write a new file at ``path`` sequentially, from a background thread.

    ``append`` copies bytes into the current buffer (``chunk`` bytes, ``depth`` of them in the ring)
    and returns; a full buffer goes to the writer thread. ``finish`` writes the rest, waits, cuts the
    file to the bytes appended and closes it. ``close`` (also after an error) stops the thread and
    closes the file without finishing it.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "bytes.bin"
    >>> sink = FileSink(path, chunk=8192)
    >>> sink.append(torch.arange(10000, dtype=torch.int32).view(torch.uint8))
    >>> sink.finish(), path.stat().st_size
    (40000, 40000)
    """

    def __init__(self, path: str | os.PathLike[str], chunk: int = 16 << 20, depth: int = 4,
                 direct: bool | None = None):
        if chunk <= 0 or chunk % _ALIGN or depth < 2:
            raise ValueError(f"chunk must be a positive multiple of {_ALIGN} and depth at least 2")
        self.path = os.fspath(path)
        self.direct = False
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        o_direct = getattr(os, "O_DIRECT", 0)
        self._fd = -1
        if o_direct and direct is not False:
            try:
                self._fd = os.open(self.path, flags | o_direct, 0o644)
                self.direct = True
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: this file system refuses O_DIRECT
                    raise
        if self._fd < 0:
            self._fd = os.open(self.path, flags, 0o644)
        # anonymous maps are page-aligned, as O_DIRECT needs; reused, so their pages stay resident
        self._maps = [mmap.mmap(-1, chunk) for _ in range(depth)]
        self._buffers = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(depth):
            self._free.put(i)
        self._full: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
        self._error: OSError | None = None
        self._current = self._free.get()
        self._filled = 0
        self._offset = 0  # file offset of the current buffer's first byte
        self._closed = self._abandoned = False
        self._thread = threading.Thread(target=self._drain, name="parity_kit-filesink", daemon=True)
        self._thread.start()

    @property
    def size(self) -> int:
        """Bytes appended so far."""
        return self._offset + self._filled

    def append(self, data: torch.Tensor | bytes) -> None:
        """Copy ``data`` (a CPU ``uint8`` tensor or bytes) into the file's next bytes."""
        self._raise_pending()
        src = torch.frombuffer(bytearray(data), dtype=torch.uint8) if isinstance(data, bytes) else data
        n, done = src.numel(), 0
        chunk = self._buffers[0].numel()
        while done < n:
            take = min(n - done, chunk - self._filled)
            self._buffers[self._current][self._filled:self._filled + take].copy_(src[done:done + take])
            self._filled += take
            done += take
            if self._filled == chunk:
                self._submit(chunk)

    def finish(self) -> int:
        """Write what is left, wait for the thread, cut the file to size, close it; returns its size."""
        size = self.size
        if self._filled:
            self._submit(-(-self._filled // _ALIGN) * _ALIGN)  # O_DIRECT writes whole blocks
        self._full.put(None)
        self._thread.join()
        self._raise_pending()
        try:
            os.ftruncate(self._fd, size)  # drops the padding of the last block
        finally:
            self.close()
        return size

    def close(self) -> None:
        """Stop the writer thread and close the file (idempotent); unwritten bytes are dropped."""
        if self._closed:
            return
        self._closed = True
        self._abandoned = True  # buffers still queued are not worth writing any more
        if self._thread.is_alive():
            self._full.put(None)
            self._thread.join()
        os.close(self._fd)
        self._buffers.clear()  # the tensors hold exports of the maps, which must go before the maps
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view is still alive somewhere (a traceback): unmapped when it goes
                pass

    def _submit(self, length: int) -> None:
        self._full.put((self._current, self._offset, length))
        self._offset += self._filled
        self._filled = 0
        self._current = self._free.get()  # waits while every buffer is still being written
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        while (job := self._full.get()) is not None:
            index, offset, length = job
            if self._error is None and not self._abandoned:
                try:
                    with memoryview(self._maps[index]) as whole, whole[:length] as view:
                        self._write_all(view, offset)
                except OSError as e:
                    self._error = e.with_traceback(None)  # its frames would pin the buffers' memory
            self._free.put(index)

    def _write_all(self, view: memoryview, offset: int) -> None:
        while len(view):
            try:
                written = self._write_at(view, offset)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self._leave_direct()  # the file system takes O_DIRECT opens but not the writes
                continue
            view, offset = view[written:], offset + written

    def _write_at(self, view: memoryview, offset: int) -> int:
        return os.pwrite(self._fd, view, offset)

    def _leave_direct(self) -> None:
        import fcntl

        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        self.direct = False
