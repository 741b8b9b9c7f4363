"""record(save_to=...): tensors written while the forward runs, the folder published atomically."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import parity_kit as pk
from parity_kit.errors import ParityKitError
from parity_kit.recording import TensorStats
from parity_kit.recording.storage import INDEX_FILE, TENSOR_FILE, TensorFileWriter
from parity_kit.testing import hook_counts


def _same(a: pk.Recording, b: pk.Recording) -> None:
    assert [(c.module, c.index, c.order, list(c.tensors), c.orig_dtypes) for c in a] == \
        [(c.module, c.index, c.order, list(c.tensors), c.orig_dtypes) for c in b]
    for ca, cb in zip(a, b):
        for leaf, x in ca.tensors.items():
            y = cb.tensors[leaf]
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), (ca.module, leaf)


def test_streamed_recording_equals_record_then_save(tiny_llama, input_ids, tmp_path):
    with pk.record(tiny_llama, "*", inputs=True) as in_memory:
        tiny_llama(input_ids)
    with pk.record(tiny_llama, "*", inputs=True, save_to=tmp_path / "rec") as streamed:
        assert not (tmp_path / "rec").exists()  # nothing published before the block ends
        tiny_llama(input_ids)
    _same(streamed, in_memory)
    _same(pk.Recording.load(tmp_path / "rec"), in_memory)
    assert streamed.metadata["model_class"] == "LlamaForCausalLM"
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == [INDEX_FILE, TENSOR_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["rec"]  # no temporary folder left
    # a plain safetensors file: other tools can read it
    stored = load_file(tmp_path / "rec" / TENSOR_FILE)
    assert torch.equal(stored[f"{streamed['lm_head'][0].order}:output"], in_memory["lm_head"][0].output)


def test_streamed_tensors_are_private_copies_of_the_file(tiny_llama, input_ids, tmp_path):
    with pk.record(tiny_llama, "lm_head", save_to=tmp_path / "rec") as rec:
        logits = tiny_llama(input_ids).logits
    got = rec["lm_head"][0].output
    assert torch.equal(got, logits)
    got.zero_()  # copy-on-write memory map: the file keeps the captured values
    assert torch.equal(pk.Recording.load(tmp_path / "rec")["lm_head"][0].output, logits)


def test_streaming_keeps_what_the_module_returned_despite_later_in_place_changes(tmp_path):
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.proj(x)
            expected.append(h.clone())
            return h.mul_(0)

    expected: list[torch.Tensor] = []
    model = InPlace()
    # the hook hands the bytes to the writer's buffers at once, so zeroing the output later is harmless
    for copy_batch in ("auto", 0):
        with pk.record(model, "proj", save_to=tmp_path / "rec", copy_batch=copy_batch) as rec:
            model(torch.ones(2, 4))
        assert torch.equal(rec["proj"][0].output, expected[-1]) and expected[-1].abs().sum() > 0


def test_cast_and_replace_an_older_recording(tiny_llama, input_ids, tmp_path):
    with pk.record(tiny_llama, "model.layers.0.*", save_to=tmp_path / "rec"):
        tiny_llama(input_ids)
    with pk.record(tiny_llama.to(torch.bfloat16), "model.layers.0.mlp", dtype="fp32",
                   save_to=tmp_path / "rec") as rec:
        tiny_llama(input_ids)
    back = pk.Recording.load(tmp_path / "rec")
    assert back.names == ["model.layers.0.mlp"]
    assert back.calls[0].output.dtype == torch.float32 and back.calls[0].orig_dtypes == {"output": "bf16"}
    _same(back, rec)


def test_stats_mode_saves_at_the_end(tiny_llama, input_ids, tmp_path):
    with pk.record(tiny_llama, "*", mode="stats", save_to=tmp_path / "stats") as rec:
        tiny_llama(input_ids)
    back = pk.Recording.load(tmp_path / "stats")
    assert back.mode == "stats" and len(back) == len(rec)
    assert isinstance(back.calls[-1].output, TensorStats)
    assert back.calls[-1].output.rms == rec.calls[-1].output.rms


def test_failed_block_publishes_nothing_and_removes_hooks(tiny_llama, input_ids, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with pk.record(tiny_llama, "*", save_to=tmp_path / "rec"):
            tiny_llama(input_ids)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    assert all(n == (0, 0, 0, 0) for n in hook_counts(tiny_llama).values())


def test_bad_destinations_are_refused_before_hooking(tiny_llama, input_ids, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ParityKitError, match="not a parity_kit recording"):
        with pk.record(tiny_llama, "*", save_to=tmp_path / "notes"):
            tiny_llama(input_ids)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert all(n == (0, 0, 0, 0) for n in hook_counts(tiny_llama).values())
    if torch.cuda.is_available():
        with pytest.raises(ParityKitError, match="device='cpu'"):
            with pk.record(tiny_llama, "*", device="cuda", save_to=tmp_path / "x"):
                pass


def test_a_dtype_safetensors_cannot_store_is_a_clear_error(tmp_path):
    model = nn.Identity()
    with pytest.raises(ParityKitError, match="complex64.*cannot be stored"):
        with pk.record(model, [""], save_to=tmp_path / "rec"):
            model(torch.ones(3, dtype=torch.complex64))
    assert list(tmp_path.iterdir()) == []


def test_writer_grows_a_header_that_outgrows_its_reserve(tmp_path):
    tensors = {f"{i}:output.{i}": torch.full((i % 3 + 1, 2), float(i)) for i in range(300)}
    path = tmp_path / "t.safetensors"
    with TensorFileWriter(path, header_reserve=64) as writer:
        stored = {key: writer.write(t) for key, t in tensors.items()}
        writer.finish(stored)
    assert writer.reserve > 64 and writer.size == path.stat().st_size
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert length == writer.reserve and json.loads(path.read_bytes()[8:8 + length])
    back = load_file(path)
    assert all(torch.equal(back[k], t) for k, t in tensors.items())


def test_writer_refuses_a_header_that_omits_a_tensor(tmp_path):
    with TensorFileWriter(tmp_path / "t.safetensors") as writer:
        a, _ = writer.write(torch.ones(2)), writer.write(torch.zeros(3))
        with pytest.raises(ParityKitError, match="every tensor"):
            writer.finish({"a": a})


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(tiny_llama, input_ids, tmp_path, monkeypatch):
    import errno
    import os

    from parity_kit.recording.filesink import FileSink

    def full_disk(self, view, offset):  # injected fault: the device is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(FileSink, "_write_at", full_disk)
    with pytest.raises(ParityKitError, match="No space left on device.*free disk space"):
        with pk.record(tiny_llama, "*", save_to=tmp_path / "rec"):
            tiny_llama(input_ids)
    assert list(tmp_path.iterdir()) == []
    assert all(n == (0, 0, 0, 0) for n in hook_counts(tiny_llama).values())
