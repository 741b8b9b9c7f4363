"""FileSink: bytes appended from the caller's thread land in the file, in order, whatever the path."""

import errno
import os
import threading

import pytest
import torch

from parity_kit.recording.filesink import FileSink

CHUNK = 8192


def _pieces(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 4095, 4096, 4097, 3 * CHUNK + 5, 0, 17, 2 * CHUNK, 123]
    return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]


@pytest.mark.parametrize("direct", [None, False])
def test_appended_bytes_land_in_order_across_buffers(tmp_path, direct):
    pieces = _pieces(0)
    sink = FileSink(tmp_path / "f.bin", chunk=CHUNK, depth=2, direct=direct)
    if direct is False:
        assert not sink.direct
    for piece in pieces:
        sink.append(piece)
    sink.append(b"tail")
    expected = b"".join(p.numpy().tobytes() for p in pieces) + b"tail"
    assert sink.size == len(expected)
    assert sink.finish() == len(expected)
    assert (tmp_path / "f.bin").read_bytes() == expected  # the last block's padding is cut off


def test_the_callers_tensor_may_change_after_append(tmp_path):
    data = torch.arange(3 * CHUNK, dtype=torch.uint8)
    sink = FileSink(tmp_path / "f.bin", chunk=CHUNK, depth=2)
    sink.append(data)
    expected = data.numpy().tobytes()
    data.zero_()  # copied at append: the file keeps what was appended
    sink.finish()
    assert (tmp_path / "f.bin").read_bytes() == expected


def test_a_write_error_surfaces_at_the_next_append_or_at_finish(tmp_path, monkeypatch):
    calls = []

    def full_after_first(self, view, offset):
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.pwrite(self._fd, view, offset)

    monkeypatch.setattr(FileSink, "_write_at", full_after_first)
    sink = FileSink(tmp_path / "f.bin", chunk=CHUNK, depth=2)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(64):  # the writer thread's error reaches one of these appends, or finish
            sink.append(torch.zeros(CHUNK, dtype=torch.uint8))
        sink.finish()
    sink.close()
    sink.close()  # idempotent
    assert not any(t.name == "parity_kit-filesink" for t in threading.enumerate())


def test_a_file_system_that_refuses_direct_writes_falls_back(tmp_path, monkeypatch):
    refused = []

    def refuse_direct(self, view, offset):
        if self.direct:
            refused.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return os.pwrite(self._fd, view, offset)

    monkeypatch.setattr(FileSink, "_write_at", refuse_direct)
    sink = FileSink(tmp_path / "f.bin", chunk=CHUNK, depth=2)
    if not sink.direct:
        pytest.skip("this file system does not take O_DIRECT opens")
    data = torch.randint(0, 256, (5 * CHUNK + 3,), dtype=torch.uint8)
    sink.append(data)
    sink.finish()
    assert refused and not sink.direct
    assert (tmp_path / "f.bin").read_bytes() == data.numpy().tobytes()


def test_bad_buffer_geometry_is_refused(tmp_path):
    with pytest.raises(ValueError, match="multiple of 4096"):
        FileSink(tmp_path / "f.bin", chunk=1000)
    assert not (tmp_path / "f.bin").exists()
