"""Capture on accelerate-dispatched models (CPU here) and the CUDA fast paths (skipped without CUDA)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import parity_kit as pk
from parity_kit.capture.stats_batch import StatsBatch
from parity_kit.errors import ParityKitError
from parity_kit.recording import TensorStats
from parity_kit.testing import hook_counts, stats_close
from parity_kit.testing import tiny_llama as build_tiny_llama


def assert_stats_close(a: TensorStats, b: TensorStats) -> None:
    assert stats_close(a, b) == []

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tensors_equal(a: pk.Recording, b: pk.Recording) -> None:
    assert [(c.module, c.index, list(c.tensors)) for c in a] == [(c.module, c.index, list(c.tensors)) for c in b]
    for ca, cb in zip(a, b):
        for leaf, x in ca.tensors.items():
            y = cb.tensors[leaf]
            assert x.dtype == y.dtype and x.device == y.device
            assert torch.equal(x.cpu(), y.cpu()), (ca.module, leaf)


def test_hooks_coexist_with_accelerate_disk_offload(tmp_path, input_ids):
    from accelerate import dispatch_model

    plain = build_tiny_llama(layers=2)
    offloaded = build_tiny_llama(layers=2)
    # layer 1 and the head live on disk and are loaded by accelerate's hooks at each forward
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    offloaded = dispatch_model(offloaded, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    assert offloaded.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    with torch.no_grad(), pk.record(plain, "*") as ref:
        plain(input_ids)
    before = hook_counts(offloaded)
    accelerate_forward = offloaded.model.layers[1].forward  # accelerate's own wrapper, an instance attribute
    assert before["model.layers.1"][3] == 1
    with torch.no_grad(), pk.record(offloaded, "*") as got:
        offloaded(input_ids)
    _tensors_equal(got, ref)
    assert len(got["model.layers.1.mlp.down_proj"]) == 1
    table = pk.compare(ref, got)
    assert (table["status"] == "ok").all() and (table["max_abs"] == 0).all()
    # accelerate's own hooks and forward wrappers stay, ours are gone
    assert hasattr(offloaded.model.layers[1], "_hf_hook")
    assert offloaded.model.layers[1].__dict__["forward"] is accelerate_forward
    assert hook_counts(offloaded) == before


def test_random_dispatched_model_records(input_ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    from parity_kit.testing import random_dispatched

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model, plan = random_dispatched(model, {"cpu": "1GiB"}, dtype="fp32", std=0.5)
    assert not any(p.is_meta for p in model.parameters())
    assert 0.4 < float(model.model.layers[0].mlp.up_proj.weight.std()) < 0.6
    with torch.no_grad(), pk.record(model, "*", mode="stats") as rec:
        model(input_ids)
    assert rec["lm_head"][0].output.nan == 0 and rec["lm_head"][0].output.rms > 0


# ---------------------------------------------------------------------------------------- CUDA only
@cuda
def test_offload_to_pinned_host_memory_equals_plain_copy(input_ids):
    model = build_tiny_llama(dtype=torch.bfloat16).cuda()
    ids = input_ids.cuda()
    with torch.no_grad(), pk.record(model, "*", inputs=True, device="cpu") as rec:
        model(ids)
    with torch.no_grad(), pk.record(model, "*", inputs=True, device="cuda") as on_gpu:
        model(ids)
    for a, b in zip(rec, on_gpu):
        for leaf, x in a.tensors.items():
            assert x.device.type == "cpu" and x.is_pinned()
            assert torch.equal(x, b.tensors[leaf].cpu()), (a.module, leaf)
            assert x.dtype == b.tensors[leaf].dtype  # no silent down-cast
    cast = None
    with torch.no_grad(), pk.record(model, "model.layers.0.mlp", device="cpu", dtype="fp32") as cast:
        model(ids)
    assert cast.calls[0].output.dtype == torch.float32 and cast.calls[0].orig_dtypes == {"output": "bf16"}


def _sync_warnings(fn) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


@cuda
def test_no_host_synchronisation_inside_hooks():
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 8)).cuda().eval()
    x = torch.randn(16, 64, device="cuda")

    for mode, device in (("stats", "cpu"), ("tensors", "cpu"), ("tensors", "cuda")):
        with torch.no_grad(), pk.record(model, "*", mode=mode, device=device, memory_budget=None) as rec:
            torch.cuda.set_sync_debug_mode("error")  # any synchronising call in a hook raises
            try:
                model(x)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        assert len(rec) == 4
    llama = build_tiny_llama(dtype=torch.bfloat16).cuda()
    ids = torch.tensor([[1, 5, 9, 13]], device="cuda")

    def plain() -> None:
        with torch.no_grad():
            llama(ids)

    base = _sync_warnings(plain)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), pk.record(llama, "*", mode="stats") as rec:
            torch.cuda.set_sync_debug_mode("warn")
            try:
                llama(ids)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    inside = sum("synchroniz" in str(w.message) for w in caught)
    assert inside == base  # the model's own synchronisations only, none added by the hooks
    assert all(isinstance(v, TensorStats) for c in rec for v in c.tensors.values())


@cuda
def test_cuda_stats_equal_cpu_stats(input_ids):
    model = build_tiny_llama()
    with torch.no_grad(), pk.record(model, "*", mode="stats") as on_cpu:
        model(input_ids)
    model.cuda()
    with torch.no_grad(), pk.record(model, "*", mode="stats") as on_gpu:
        model(input_ids.cuda())
    for a, b in zip(on_gpu, on_cpu):
        for leaf, x in a.tensors.items():
            y = b.tensors[leaf]
            assert x.nan == y.nan and x.inf == y.inf
            assert x.rms == pytest.approx(y.rms, rel=1e-4, abs=1e-6)
            assert x.max == pytest.approx(y.max, rel=1e-4, abs=1e-6)


@cuda
def test_compare_on_gpu_equals_cpu(input_ids):
    ref_m, cand_m = build_tiny_llama().cuda(), build_tiny_llama(dtype=torch.bfloat16).cuda()
    ids = input_ids.cuda()
    with torch.no_grad(), pk.record(ref_m, "*", device="cuda") as ref:
        ref_m(ids)
    with torch.no_grad(), pk.record(cand_m, "*", device="cuda") as cand:
        cand_m(ids)
    on_gpu = pk.compare(ref, cand)
    cpu_ref = pk.Recording("tensors", [pk.Call(c.module, c.index, c.order, {k: v.cpu() for k, v in c.tensors.items()})
                                       for c in ref])
    cpu_cand = pk.Recording("tensors", [pk.Call(c.module, c.index, c.order, {k: v.cpu() for k, v in c.tensors.items()})
                                        for c in cand])
    on_cpu = pk.compare(cpu_ref, cpu_cand)
    streamed = pk.compare(cpu_ref, cpu_cand, device="cuda", chunk_bytes="4KiB")
    for table in (on_gpu, streamed):
        for col in ("max_abs", "mean_abs", "rel_rms", "cosine", "sqnr_db", "max_ulp", "floor"):
            torch.testing.assert_close(torch.tensor(table[col].to_numpy(float)),
                                       torch.tensor(on_cpu[col].to_numpy(float)), rtol=1e-12, atol=1e-300,
                                       equal_nan=True)


@cuda
def test_streaming_a_cuda_model_equals_capture_to_host(input_ids, tmp_path):
    model = build_tiny_llama(dtype=torch.bfloat16).cuda()
    ids = input_ids.cuda()
    with torch.no_grad(), pk.record(model, "*", inputs=True, device="cpu") as in_memory:
        model(ids)
    with torch.no_grad(), pk.record(model, "*", inputs=True, save_to=tmp_path / "rec") as streamed:
        model(ids)
    back = pk.Recording.load(tmp_path / "rec")
    for rec in (streamed, back):
        assert [(c.module, c.index, list(c.tensors)) for c in rec] == \
            [(c.module, c.index, list(c.tensors)) for c in in_memory]
        for a, b in zip(rec, in_memory):
            for leaf, x in a.tensors.items():
                assert x.dtype == b.tensors[leaf].dtype and torch.equal(x, b.tensors[leaf]), (a.module, leaf)


@cuda
def test_batched_gpu_copies_detect_in_place_changes():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x).mul_(0)

    model = InPlace().cuda()
    with pytest.raises(ParityKitError, match="modified in place.*copy_batch=0"):
        with torch.no_grad(), pk.record(model, "proj", device="cuda"):
            model(torch.ones(2, 4, device="cuda"))
    with torch.no_grad(), pk.record(model, "proj", device="cuda", copy_batch=0) as rec:
        model(torch.ones(2, 4, device="cuda"))
    assert rec["proj"][0].output.abs().sum() > 0


class _MixedOutputs(nn.Module):
    """Outputs of every kind a stats batch meets: fp32, bf16 and fp16 of several row lengths (one
    longer than a column block), fp64 and int64 (the torch path), a transpose (not contiguous), 1-D,
    0-d, and fp32 values whose squares overflow fp32 (the exact path)."""

    class _Apply(nn.Module):
        def __init__(self, fn) -> None:
            super().__init__()
            self.fn = fn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fn(x)

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(48, 200)
        self.act = nn.GELU()
        self.down = nn.Linear(200, 40).to(torch.bfloat16)
        self.head = nn.Linear(40, 1500).half()
        self.wide = nn.LayerNorm(1500).double()
        self.flip = self._Apply(lambda x: x.transpose(-1, -2))
        self.first = self._Apply(lambda x: x[0, 0])
        self.mean = self._Apply(lambda x: x.float().mean())
        self.huge = self._Apply(lambda x: x.float() * 1e20)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.act(self.up(x))
        h = self.down(h.bfloat16())
        y = self.head(h.half())
        return self.wide(y.double()), y.argmax(-1), self.flip(h), self.first(y), self.mean(h), self.huge(h)


def _assert_same_stats(got: pk.Recording, expected: pk.Recording) -> None:
    """Equal statistics up to the order of fp32 sums: min and max exact, mean and rms within 1e-5."""

    def same(a: float, b: float) -> bool:
        return (math.isnan(a) and math.isnan(b)) or a == b

    def layout(rec: pk.Recording) -> list:
        return [(c.module, c.index, list(c.tensors)) for c in rec]

    assert layout(got) == layout(expected)
    for a, b in zip(got, expected):
        for leaf, x in a.tensors.items():
            y = b.tensors[leaf]
            where = (a.module, leaf)
            assert (x.shape, x.dtype, x.nan, x.inf) == (y.shape, y.dtype, y.nan, y.inf), where
            assert same(x.min, y.min) and same(x.max, y.max) and same(x.absmax, y.absmax), where
            assert same(x.rms, y.rms) or x.rms == pytest.approx(y.rms, rel=1e-5), where
            assert same(x.mean, y.mean) or x.mean == pytest.approx(y.mean, rel=1e-5, abs=1e-5 * y.rms), where
            assert (x.per_token_rms is None) == (y.per_token_rms is None), where
            if x.per_token_rms is not None:
                assert x.per_token_rms.dtype == torch.float32 and x.per_token_rms.device.type == "cpu", where
                torch.testing.assert_close(x.per_token_rms, y.per_token_rms, rtol=1e-5, atol=1e-6, equal_nan=True,
                                           msg=str(where))


def _record_stats(model: nn.Module, x: torch.Tensor, **kwargs) -> pk.Recording:
    with torch.no_grad(), pk.record(model, "*", mode="stats", **kwargs) as rec:
        model(x)
    return rec


@cuda
def test_batched_cuda_stats_equal_in_hook_stats(monkeypatch, input_ids):
    mixed = _MixedOutputs().cuda().eval()
    llama = build_tiny_llama(dtype=torch.bfloat16).cuda()
    x = torch.randn(2, 9, 48, device="cuda")
    monkeypatch.setattr(StatsBatch, "_kernel_state", "unloaded")
    fused = {}
    for model, inputs in ((mixed, x), (llama, input_ids.cuda())):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="the row statistics kernel")  # a failure falls back, warning
            fused[model] = _record_stats(model, inputs)
        assert callable(StatsBatch._kernel_state), StatsBatch._kernel_state
        direct = _record_stats(model, inputs, stats_batch=0)
        _assert_same_stats(fused[model], direct)
        monkeypatch.setenv("PARITY_KIT_KERNEL", "0")  # batched, by torch
        _assert_same_stats(_record_stats(model, inputs), direct)
        monkeypatch.delenv("PARITY_KIT_KERNEL")
    huge = fused[mixed]["huge"][0].output
    assert math.isfinite(huge.rms) and huge.rms > 1e19  # squares past fp32: recomputed in fp64


@cuda
def test_batched_cuda_stats_recompute_non_finite_outputs_exactly(input_ids):
    model = build_tiny_llama(dtype=torch.bfloat16).cuda()
    ids = input_ids.cuda()
    target = "model.layers.0.mlp.down_proj"

    def inject(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[0, 1, 3] = float("nan")
        output[0, 2, :2] = float("inf")
        return output

    # registered before record()'s hooks, so those see the changed output
    handle = model.get_submodule(target).register_forward_hook(inject)
    try:
        batched = _record_stats(model, ids)
        direct = _record_stats(model, ids, stats_batch=0)
    finally:
        handle.remove()
    hit = batched[target][0].output
    assert (hit.nan, hit.inf) == (1, 2)
    assert math.isfinite(hit.max) and math.isfinite(hit.rms)  # over the finite values only
    assert hit.per_token_rms.shape == (ids.shape[1],) and bool(hit.per_token_rms.isfinite().all())
    assert sum(s.nan > 0 for c in batched for s in c.tensors.values()) > 1  # downstream outputs too
    _assert_same_stats(batched, direct)


@cuda
def test_stats_batch_of_one_dtype_on_one_gpu_takes_every_layout(monkeypatch):
    """A forward's outputs (one dtype, one GPU) reach the kernel as they are, with their addresses; a
    transpose among them (not dense) is copied first. Both agree with TensorStats.of."""

    from parity_kit.capture.row_kernels import tensor_statistics_triton

    seen = []

    def spy(tensors, per_token, layout):
        seen.append((list(tensors), layout))
        return tensor_statistics_triton(tensors, per_token, layout=layout)

    monkeypatch.setattr(StatsBatch, "_kernel_state", spy)
    g = torch.Generator("cuda").manual_seed(3)
    dense = [torch.randn(shape, device="cuda", generator=g).bfloat16() for shape in ((2, 9, 48), (7, 300), (5,), ())]
    for tensors in (dense, [*dense, dense[1].t()]):
        for per_token in (True, False):
            seen.clear()
            for t, got in zip(tensors, StatsBatch(tensors, per_token).result()):
                assert_stats_close(got, TensorStats.of(t, per_token))
            (given, (ptrs, rows, widths)), = seen
            assert all(a is b for a, b in zip(given[:4], dense))
            assert ptrs == [t.data_ptr() for t in given] and widths == [48, 300, 5, 1, 7][:len(given)]
            assert rows == [18, 7, 1, 1, 300][:len(given)]
            if len(tensors) == 5:
                assert given[4] is not tensors[4] and given[4].is_contiguous()
                assert torch.equal(given[4], tensors[4])


two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")


@two_gpus
def test_stats_across_two_gpus_equal_in_hook_stats(input_ids):
    """A model split over two GPUs: a batch holds outputs of both, reduced on their own devices."""

    g = torch.Generator("cuda:1").manual_seed(5)
    mixed = [torch.randn(3, 40, device="cuda:0"), torch.randn(2, 7, 33, device="cuda:1", generator=g).bfloat16(),
             torch.randn(5, device="cuda:1", generator=g), torch.randn(4, 40, device="cuda:0").half()]
    for t, got in zip(mixed, StatsBatch(mixed).result()):
        assert_stats_close(got, TensorStats.of(t))
    model = build_tiny_llama(dtype=torch.bfloat16)
    model.model.embed_tokens.cuda(0)
    for i, layer in enumerate(model.model.layers):
        layer.cuda(i % 2)
    model.model.norm.cuda(1)
    model.model.rotary_emb.cuda(0)
    model.lm_head.cuda(1)

    def run() -> None:  # moves the hidden states between the GPUs as the layers need them
        h = model.model.embed_tokens(input_ids.cuda(0))
        position_ids = torch.arange(h.shape[1], device="cuda:0")[None]
        cos, sin = model.model.rotary_emb(h, position_ids)
        for i, layer in enumerate(model.model.layers):
            device = f"cuda:{i % 2}"
            h = layer(h.to(device), position_embeddings=(cos.to(device), sin.to(device)))
            h = h[0] if isinstance(h, tuple) else h
        model.lm_head(model.model.norm(h.to("cuda:1")))

    recordings = []
    for batch in ("auto", 0):
        with torch.no_grad(), pk.record(model, "*", mode="stats", stats_batch=batch) as rec:
            run()
        recordings.append(rec)
    batched, direct = recordings
    assert {c.output.per_token_rms.device.type for c in batched} == {"cpu"}
    _assert_same_stats(batched, direct)
