from __future__ import annotations

import json

import pytest
import torch

import parity_kit as pk
from parity_kit.errors import ParityKitError
from parity_kit.recording import Call, Recording, TensorStats
from parity_kit.testing import stats_close
from parity_kit.testing import tiny_llama as build_tiny_llama


def _assert_bit_exact(a: Recording, b: Recording) -> None:
    assert a.mode == b.mode and len(a) == len(b)
    for ca, cb in zip(a, b):
        assert (ca.module, ca.index, ca.order) == (cb.module, cb.index, cb.order)
        assert list(ca.tensors) == list(cb.tensors)
        for leaf in ca.tensors:
            x, y = ca.tensors[leaf], cb.tensors[leaf]
            assert ca.orig_dtype(leaf) == cb.orig_dtype(leaf)
            if isinstance(x, TensorStats):
                assert x._to_json() == y._to_json()
                assert (x.per_token_rms is None) == (y.per_token_rms is None)
                if x.per_token_rms is not None:
                    assert torch.equal(x.per_token_rms, y.per_token_rms)
            else:
                assert x.dtype == y.dtype and x.shape == y.shape
                # compare bit patterns, so NaN payloads and -0.0 count too
                assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_bit_exact(tmp_path, input_ids, dtype):
    model = build_tiny_llama(dtype=dtype)
    with pk.record(model, "*", inputs=True) as rec:
        model(input_ids)
    back = Recording.load(rec.save(tmp_path / "rec"))
    _assert_bit_exact(rec, back)
    assert back.metadata["model_class"] == "LlamaForCausalLM"
    assert back.metadata["input_shapes"] == {"input.0": [1, 8]}


def test_round_trip_special_values_and_cast(tmp_path):
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 6e-8, 1e-40])
    rec = Recording("tensors", [
        Call("a", 0, 0, {"output": special.to(torch.float16), "output.1": special.to(torch.bfloat16)}),
        Call("a", 1, 1, {"output": special.clone(), "input.ids": torch.arange(5)}, {"output": "bf16"}),
    ], {"note": "x"})
    back = Recording.load(rec.save(tmp_path / "r"))
    _assert_bit_exact(rec, back)
    assert back["a"][1].orig_dtype("output") == "bf16" and back["a"][1].orig_dtype("input.ids") == "int64"


def test_stats_recording_round_trip(tmp_path, tiny_llama, input_ids):
    with pk.record(tiny_llama, "model.layers.0.*", mode="stats", inputs=True) as rec:
        tiny_llama(input_ids)
    back = Recording.load(rec.save(tmp_path / "s"))
    _assert_bit_exact(rec, back)
    assert back.mode == "stats"


def test_save_replaces_recording_but_not_other_folders(tmp_path):
    rec1 = Recording("tensors", [Call("a", 0, 0, {"output": torch.ones(3)})])
    rec2 = Recording("tensors", [Call("b", 0, 0, {"output": torch.zeros(2)})])
    target = tmp_path / "rec"
    rec1.save(target)
    rec2.save(target)
    assert Recording.load(target).names == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec"]  # no temp folders left behind
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ParityKitError, match="not a parity_kit recording"):
        rec1.save(other)
    assert (other / "notes.txt").read_text() == "keep me"


def _saved(tmp_path):
    rec = Recording("tensors", [Call("a", 0, 0, {"output": torch.randn(64, 16)})])
    return rec.save(tmp_path / "rec")


def test_not_a_recording(tmp_path):
    with pytest.raises(ParityKitError, match="not a parity_kit recording"):
        Recording.load(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ParityKitError, match="not a parity_kit recording"):
        Recording.load(tmp_path)
    with pytest.raises(ParityKitError, match="not a parity_kit recording"):
        Recording.load(tmp_path / "missing")


def test_truncated_tensor_file(tmp_path):
    path = _saved(tmp_path)
    data = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ParityKitError, match="truncated or corrupted"):
        Recording.load(path)


def test_corrupted_tensor_file_same_size(tmp_path):
    path = _saved(tmp_path)
    data = bytearray((path / "tensors.safetensors").read_bytes())
    data[-7] ^= 0xFF
    (path / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(ParityKitError, match="truncated or corrupted"):
        Recording.load(path)


def test_truncated_or_inconsistent_index(tmp_path):
    path = _saved(tmp_path)
    text = (path / "index.json").read_text()
    (path / "index.json").write_text(text[: len(text) // 2])
    with pytest.raises(ParityKitError, match="corrupted or truncated"):
        Recording.load(path)
    index = json.loads(text)
    index["calls"][0]["leaves"]["output"]["shape"] = [1, 2]
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ParityKitError, match="corrupted"):
        Recording.load(path)


def test_missing_tensor_file(tmp_path):
    path = _saved(tmp_path)
    (path / "tensors.safetensors").unlink()
    with pytest.raises(ParityKitError, match="incomplete"):
        Recording.load(path)


def test_lookup_errors_and_output():
    rec = Recording("tensors", [Call("model.layers.0.mlp", 0, 0, {"input.0": torch.ones(1)})])
    with pytest.raises(ParityKitError, match="close names"):
        rec["model.layers.0.mlpp"]
    with pytest.raises(ParityKitError, match="no tensor output"):
        rec["model.layers.0.mlp"][0].output
    with pytest.raises(ParityKitError, match="mode"):
        Recording("fast")


def _assert_stats_close(a: TensorStats, b: TensorStats) -> None:
    assert stats_close(a, b) == []


def test_stats_batch_equals_one_by_one():
    from parity_kit.capture.stats_batch import StatsBatch

    g = torch.Generator().manual_seed(0)
    with_nan = torch.randn(3, 5, generator=g)
    with_nan[1, 2], with_nan[2, 0], with_nan[0, 4] = float("nan"), float("inf"), float("-inf")
    tensors = [
        torch.randn(2, 3, 8, generator=g),                       # same group as the next one
        torch.randn(4, 8, generator=g) * 100,
        torch.randn(5, 8, generator=g).bfloat16(),               # other dtype, same width
        torch.randn(6, generator=g).half(),
        torch.randn(3, 4, generator=g).double(),
        torch.tensor(2.5),                                       # 0-d
        torch.empty(0, 8),                                       # empty
        torch.arange(12).reshape(3, 4),                          # integer
        with_nan,
        torch.full((2, 3), 3e38),                                # squares overflow fp32
        torch.full((2, 3), float("nan")),                        # nothing finite
    ]
    for per_token in (True, False):
        batched = StatsBatch(tensors, per_token).result()
        assert len(batched) == len(tensors)
        for t, got in zip(tensors, batched):
            _assert_stats_close(got, TensorStats.of(t, per_token))


def test_stats_batch_on_host_in_chunks_equals_one_by_one(monkeypatch):
    """CPU tensors NumPy reads are reduced in runs of at most _HOST_CHUNK elements: cut anywhere, the same
    statistics (a tensor larger than a run stands alone in its own)."""
    from parity_kit.capture import stats_batch

    monkeypatch.setattr(stats_batch, "_HOST_CHUNK", 16)
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(3, 4, generator=g), torch.randn(40, generator=g), torch.randn(1, 2, 3, generator=g),
               torch.randn(5, generator=g).double(), torch.tensor(-1.5), torch.randn(2, 7, generator=g).half()]
    assert stats_batch._chunks([0, 1, 2], [12, 40, 6], 16) == [[0], [1], [2]]
    for per_token in (True, False):
        for t, got in zip(tensors, stats_batch.StatsBatch(tensors, per_token).result()):
            _assert_stats_close(got, TensorStats.of(t, per_token))


def test_stats_batch_refuses_tensor_modified_in_place():
    from parity_kit.capture.stats_batch import StatsBatch

    t = torch.ones(2, 3)
    version = t._version
    t.add_(1)
    with pytest.raises(ParityKitError, match="modified in place.*stats_batch=0"):
        StatsBatch([t], versions=[version], labels=["module 'm' leaf 'output'"])


def test_checksum_sees_single_bit_flips_tails_and_unaligned_bytes():
    from parity_kit.recording.storage import tensor_checksum

    data = torch.arange(1, 27, dtype=torch.uint8)  # 3 words and a 2-byte tail
    base = tensor_checksum(data)
    for i in range(data.numel()):
        for bit in (0, 7):
            flipped = data.clone()
            flipped[i] ^= 1 << bit
            assert tensor_checksum(flipped) != base, (i, bit)
    assert tensor_checksum(data[1:]) == tensor_checksum(data[1:].clone())  # unaligned storage offset
    assert tensor_checksum(torch.tensor([2**63 - 1, 1], dtype=torch.int64)) == 2**63  # wraps, never negative


def test_recordings_checksummed_with_crc32_still_load(tmp_path):
    import zlib

    rec = Recording("tensors", [Call("a", 0, 0, {"output": torch.randn(64, 3)})])
    folder = rec.save(tmp_path / "rec")
    index = json.loads((folder / "index.json").read_text())
    tensor_file = index["tensor_file"]
    tensor_file.pop("checksum"), tensor_file.pop("checksums")
    index.pop("index_sha256")  # recordings of that time had no index checksum either
    tensor_file["crc32"] = {"0:output": zlib.crc32(rec.calls[0].output.numpy().tobytes())}
    (folder / "index.json").write_text(json.dumps(index))
    assert torch.equal(Recording.load(folder)["a"][0].output, rec.calls[0].output)
    tensor_file["crc32"]["0:output"] ^= 1
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(ParityKitError, match="checksum of 1 tensor"):
        Recording.load(folder)
