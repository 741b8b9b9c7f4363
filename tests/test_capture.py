from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import parity_kit as pk
from parity_kit._util.sizes import parse_bytes
from parity_kit.errors import ParityKitError
from parity_kit.recording import TensorStats
from parity_kit.testing import hook_counts
from parity_kit.testing import tiny_llama as build_tiny_llama


class TwiceLinear(nn.Module):
    """Calls the same sub-module twice in one forward, and modifies its activation in place."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        h = self.proj(x)
        first = h.clone()
        h.mul_(0)  # in place: a capture that aliased h would now see zeros
        out = self.proj(first)
        return {"out": out, "skip": None, "pair": (first, out * 2)}


def test_llama_outputs_inputs_and_metadata(tiny_llama, input_ids):
    with pk.record(tiny_llama, "*", inputs=True) as rec:
        logits = tiny_llama(input_ids).logits
    assert rec.mode == "tensors"
    assert rec.names[0] == "model.embed_tokens" and rec.names[-1] == "lm_head"
    # completion order: children before their parent
    assert rec.names.index("model.layers.0.self_attn.q_proj") < rec.names.index("model.layers.0.self_attn")
    attn = rec["model.layers.0.self_attn"][0]
    assert "output.0" in attn.outputs and "input.hidden_states" in attn.inputs
    assert "input.position_embeddings.0" in attn.inputs  # nested kwargs tuple
    torch.testing.assert_close(rec["lm_head"][0].output, logits, rtol=0, atol=0)
    # the q_proj input is the normed hidden state produced by input_layernorm
    torch.testing.assert_close(rec["model.layers.0.self_attn.q_proj"][0].inputs["input.0"],
                               rec["model.layers.0.input_layernorm"][0].output, rtol=0, atol=0)
    meta = rec.metadata
    assert meta["model_class"] == "LlamaForCausalLM" and meta["dtype"] == "fp32" and meta["device"] == "cpu"
    assert meta["input_shapes"] == {"input.0": [1, 8]}
    assert "created" in meta and "environment" in meta
    assert [c.order for c in rec] == list(range(len(rec)))


def test_gpt2_and_bert_output_types(tiny_gpt2, tiny_bert, input_ids):
    with pk.record(tiny_gpt2, ["transformer", "transformer.h.*.attn", "lm_head"]) as rec:
        tiny_gpt2(input_ids)
    top = rec["transformer"][0]
    assert "output.last_hidden_state" in top.outputs  # a ModelOutput; the cache leaf is skipped
    assert all(isinstance(v, torch.Tensor) for v in top.tensors.values())
    assert rec["transformer.h.1.attn"][0].output.shape == (1, 8, 32)
    with pk.record(tiny_bert, ["encoder", "pooler"]) as rec:
        out = tiny_bert(input_ids)
    torch.testing.assert_close(rec["encoder"][0].tensors["output.last_hidden_state"], out.last_hidden_state)
    assert rec["pooler"][0].output.shape == (1, 32)


def test_module_called_twice_and_no_aliasing():
    torch.manual_seed(0)
    model = TwiceLinear()
    x = torch.randn(2, 4)
    with pk.record(model, [""], inputs=True) as rec_root, pk.record(model, "proj") as rec:
        out = model(x, scale=torch.ones(1))
    calls = rec["proj"]
    assert [c.index for c in calls] == [0, 1]
    expected_first = model.proj(x)
    torch.testing.assert_close(calls[0].output, expected_first)  # clone survived the in-place mul_
    assert calls[0].output.abs().sum() > 0
    root = rec_root[""][0]
    assert set(root.tensors) == {"output.out", "output.pair.0", "output.pair.1", "input.0", "input.scale"}
    torch.testing.assert_close(root.tensors["output.out"], out["out"])


def test_generate_records_every_decode_step(tiny_llama, input_ids):
    with pk.record(tiny_llama, ["model.layers.1.mlp", "lm_head"]) as rec:
        generated = tiny_llama.generate(input_ids, max_new_tokens=4, do_sample=False)
    steps = rec["model.layers.1.mlp"]
    assert generated.shape[1] == input_ids.shape[1] + 4
    assert [c.index for c in steps] == [0, 1, 2, 3]
    assert steps[0].output.shape[1] == input_ids.shape[1]  # prefill
    assert all(c.output.shape[1] == 1 for c in steps[1:])  # one token per step with the KV cache
    # greedy token of each step is the argmax of the recorded logits
    for i, call in enumerate(rec["lm_head"]):
        assert call.output[0, -1].argmax().item() == generated[0, input_ids.shape[1] + i].item()


def test_hooks_removed_after_exception_in_forward(tiny_llama, input_ids):
    before = hook_counts(tiny_llama)

    def boom(module, args, output):
        raise RuntimeError("injected failure")

    handle = tiny_llama.model.layers[1].mlp.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        with pk.record(tiny_llama, "*", inputs=True):
            tiny_llama(input_ids)
    handle.remove()
    assert hook_counts(tiny_llama) == before


@pytest.mark.parametrize("mode", ["tensors", "stats"])
def test_wrapped_forwards_record_like_hooks(tiny_llama, input_ids, mode):
    """Modules without hooks are captured by wrapping their forward; while a process-wide forward hook
    exists every module gets a forward hook instead. Both must record the same calls in the same
    order with the same values, see what a module's existing hook returns, skip other models run
    inside the block, keep forward's signature visible, and leave nothing behind."""
    import inspect

    from torch.nn.modules.module import register_module_forward_hook

    before = hook_counts(tiny_llama)
    attn = tiny_llama.model.layers[0].self_attn
    shift = tiny_llama.model.layers[0].mlp.register_forward_hook(lambda m, a, out: out + 1000.0)
    other = build_tiny_llama(seed=1)
    recordings, during = {}, {}
    try:
        for path in ("hooks", "wrapped"):
            bystander = register_module_forward_hook(lambda m, a, out: None) if path == "hooks" else None
            try:
                with pk.record(tiny_llama, "*", mode=mode, inputs=mode == "tensors") as rec:
                    during[path] = hook_counts(tiny_llama)
                    assert inspect.signature(attn.forward) == inspect.signature(type(attn).forward.__get__(attn))
                    tiny_llama(input_ids)
                    other(input_ids)  # not selected: must not appear
            finally:
                if bystander is not None:
                    bystander.remove()
            recordings[path] = rec
    finally:
        shift.remove()
    assert during["wrapped"]["model.layers.0.self_attn"][3] == 1 and during["hooks"]["model.layers.0.self_attn"][3] == 0
    assert during["wrapped"]["model.layers.0.mlp"][:1] == (2,)  # its own hook and ours after it, not wrapped
    assert hook_counts(tiny_llama) == before and hook_counts(other) == hook_counts(build_tiny_llama(seed=1))
    hooked, wrapped = recordings["hooks"], recordings["wrapped"]
    assert [(c.module, c.index, c.order) for c in wrapped.calls] == [(c.module, c.index, c.order) for c in hooked.calls]
    for a, b in zip(wrapped.calls, hooked.calls):
        assert a.tensors.keys() == b.tensors.keys()
        for leaf in a.tensors:
            x, y = a.tensors[leaf], b.tensors[leaf]
            if mode == "stats":
                assert (x.shape, x.min, x.max, x.rms) == (y.shape, y.min, y.max, y.rms)
            else:
                torch.testing.assert_close(x, y, atol=0, rtol=0)
    mlp_out = wrapped["model.layers.0.mlp"][0].output  # the existing hook's +1000 is seen
    assert (mlp_out.min if mode == "stats" else mlp_out.abs().min()) > 900


def test_wrapper_replaced_inside_the_block_passes_through():
    """Something that wraps forward again inside the block (as accelerate's attach does) keeps its own
    wrapper; ours below it stops recording and no longer holds the recording."""
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(4, 4))
    with pk.record(model, "*") as rec:
        ours = model[0].forward
        model[0].forward = lambda x: ours(x) * 2
        model(torch.ones(1, 4))
    assert len(rec) == 1 and "forward" in model[0].__dict__
    alive = weakref.ref(rec)
    del rec
    gc.collect()
    out = model(torch.ones(1, 4))  # still works, through our inert wrapper
    assert alive() is None and out.shape == (1, 4)
    del model[0].forward
    assert hook_counts(model)["0"] == (0, 0, 0, 0)


def test_memory_budget_raises_and_removes_hooks(tiny_llama, input_ids):
    before = hook_counts(tiny_llama)
    with pytest.raises(ParityKitError, match=r"memory_budget .*captured .* so far, this tensor needs .*mode='stats'"):
        with pk.record(tiny_llama, "*", memory_budget="4KiB"):
            tiny_llama(input_ids)
    assert hook_counts(tiny_llama) == before
    with pk.record(tiny_llama, "*", memory_budget=None) as rec:
        tiny_llama(input_ids)
    assert rec.nbytes() > 4096


def test_budget_counts_cast_dtype():
    model = nn.Linear(4, 256)
    x = torch.randn(1, 4)
    with pk.record(model, [""], dtype="fp16", memory_budget=512):  # 256 fp16 values = 512 bytes: fits
        model(x)
    with pytest.raises(ParityKitError):
        with pk.record(model, [""], memory_budget=512):  # 256 fp32 values = 1024 bytes
            model(x)


def test_device_and_dtype_cast_keep_original_dtype(tiny_llama, input_ids):
    model = build_tiny_llama(dtype=torch.bfloat16)
    with pk.record(model, "model.layers.0.mlp", dtype="fp32") as rec:
        model(input_ids)
    call = rec["model.layers.0.mlp"][0]
    assert call.output.dtype == torch.float32
    assert call.orig_dtype("output") == "bf16"
    assert rec.metadata["dtype"] == "bf16"


def test_stats_mode(tiny_llama, input_ids):
    with pk.record(tiny_llama, "model.layers.*", mode="stats") as rec_s:
        tiny_llama(input_ids)
    with pk.record(tiny_llama, "model.layers.*", mode="tensors") as rec_t:
        tiny_llama(input_ids)
    assert rec_s.names == rec_t.names
    for cs, ct in zip(rec_s, rec_t):
        for leaf, t in ct.tensors.items():
            s = cs.tensors[leaf]
            assert isinstance(s, TensorStats) and s.shape == tuple(t.shape) and s.dtype == "fp32"
            t64 = t.double()
            assert s.min == pytest.approx(t64.min().item(), abs=1e-6)
            assert s.max == pytest.approx(t64.max().item(), abs=1e-6)
            assert s.mean == pytest.approx(t64.mean().item(), rel=1e-4, abs=1e-6)
            assert s.rms == pytest.approx(t64.square().mean().sqrt().item(), rel=1e-5)
            assert s.absmax == pytest.approx(t64.abs().max().item(), rel=1e-6)
            assert s.nan == 0 and s.inf == 0
            expected = t64.reshape(-1, t.shape[-1]).square().mean(-1).sqrt()
            torch.testing.assert_close(s.per_token_rms.double(), expected, rtol=1e-5, atol=1e-7)
    assert rec_s.nbytes() < rec_t.nbytes() / 10


def test_stats_ignore_nonfinite_values():
    t = torch.tensor([[1.0, float("nan"), -3.0], [float("inf"), 2.0, float("-inf")], [float("nan")] * 3])
    s = TensorStats.of(t)
    assert (s.nan, s.inf) == (4, 2)
    assert (s.min, s.max, s.absmax) == (-3.0, 2.0, 3.0)
    assert s.mean == pytest.approx(0.0)
    assert s.rms == pytest.approx(((1 + 9 + 4) / 3) ** 0.5)
    ptr = s.per_token_rms.tolist()
    assert ptr[0] == pytest.approx(5.0**0.5) and ptr[1] == pytest.approx(2.0) and ptr[2] != ptr[2]
    s16 = TensorStats.of(torch.tensor([65504.0, 65504.0], dtype=torch.float16))
    assert s16.rms == pytest.approx(65504.0, rel=1e-6) and s16.dtype == "fp16"  # no fp16 overflow
    huge = TensorStats.of(torch.tensor([1e30, -1e30]))  # squares overflow fp32: the fp64 path takes over
    assert huge.rms == pytest.approx(1e30, rel=1e-6) and huge.nan == huge.inf == 0


def test_select_modules_patterns(tiny_llama):
    names = lambda spec: [n for n, _ in pk.select_modules(tiny_llama, spec)]  # noqa: E731
    assert "" not in names("*")
    assert names("model.layers.*.mlp") == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert names(r"re:model\.layers\.\d+\.self_attn\.[qk]_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    assert names(["lm_head", "model.norm"]) == ["model.norm", "lm_head"]
    assert names([""]) == [""]
    assert names(nn.Linear)[0] == "model.layers.0.self_attn.q_proj" and len(names(nn.Linear)) == 15
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    assert len(names((LlamaRMSNorm, nn.Embedding))) == 6


def test_pattern_without_match_suggests_close_names(tiny_llama):
    with pytest.raises(ParityKitError, match=r"matched no module; close names: .*model\.layers\.0\.mlp"):
        pk.select_modules(tiny_llama, "model.layer.0.mlpp")
    with pytest.raises(ParityKitError, match="lm_head"):
        with pk.record(tiny_llama, ["lm_head", "lm_heads"]):
            pass
    with pytest.raises(ParityKitError, match="classes in this model"):
        pk.select_modules(tiny_llama, nn.Conv1d)
    with pytest.raises(ParityKitError, match="not a valid regular expression"):
        pk.select_modules(tiny_llama, "re:(")


def test_bad_arguments():
    model = nn.Linear(2, 2)
    with pytest.raises(ParityKitError, match="mode="):
        with pk.record(model, [""], mode="tensor"):
            pass
    with pytest.raises(ParityKitError, match="memory_budget"):
        parse_bytes("lots")
    if not torch.cuda.is_available():
        with pytest.raises(ParityKitError, match="CUDA is not available"):
            with pk.record(model, [""], device="cuda"):
                pass
    assert parse_bytes("500MB") == 500 * 10**6 and parse_bytes("4GiB") == 4 * 2**30 and parse_bytes(7) == 7


def _stats_equal(a: pk.Recording, b: pk.Recording) -> None:
    assert [(c.module, c.index, c.order, list(c.tensors)) for c in a] == \
        [(c.module, c.index, c.order, list(c.tensors)) for c in b]
    for ca, cb in zip(a, b):
        for leaf, x in ca.tensors.items():
            y = cb.tensors[leaf]
            assert isinstance(x, TensorStats) and isinstance(y, TensorStats)
            assert (x.shape, x.dtype, x.nan, x.inf) == (y.shape, y.dtype, y.nan, y.inf)
            for f in ("min", "max", "mean", "rms", "absmax"):
                assert getattr(x, f) == pytest.approx(getattr(y, f), rel=1e-5, abs=1e-6)
            torch.testing.assert_close(x.per_token_rms, y.per_token_rms, rtol=1e-5, atol=1e-7)


def test_batched_stats_equal_per_hook_stats(tiny_llama, input_ids):
    # 1 KiB batches: many flushes inside the forward, each resolving the batch before it
    with pk.record(tiny_llama, "*", mode="stats", inputs=True, stats_batch="1KiB") as batched:
        tiny_llama(input_ids)
    with pk.record(tiny_llama, "*", mode="stats", inputs=True, stats_batch=0) as direct:
        tiny_llama(input_ids)
    _stats_equal(batched, direct)
    assert all(isinstance(v, TensorStats) for c in batched for v in c.tensors.values())


def test_stats_are_built_on_first_read_and_the_outputs_released(tiny_llama, input_ids):
    """A batched stats capture ends with its numbers on the host and no module output held; the
    TensorStats are built when the calls are first read (also by pickling or copying)."""
    import copy
    import gc
    import pickle
    import weakref

    held = []

    def keep(module, args, out):
        if isinstance(out, torch.Tensor):
            held.append(weakref.ref(out))

    with pk.record(tiny_llama, "*", mode="stats", stats_batch=0) as direct:
        tiny_llama(input_ids)
    handle = tiny_llama.model.norm.register_forward_hook(keep)
    try:
        with pk.record(tiny_llama, "*", mode="stats", stats_batch="1GiB") as rec:
            tiny_llama(input_ids)
    finally:
        handle.remove()
    gc.collect()
    assert held and all(ref() is None for ref in held)  # the recording did not keep the output
    assert rec._unbuilt and any(type(entry) is list for entry in rec._calls)  # placeholders
    twin = pickle.loads(pickle.dumps(rec))
    assert not rec._unbuilt and all(type(c) is pk.Call for c in rec._calls)
    for other in (rec, twin, copy.deepcopy(rec)):
        _stats_equal(other, direct)


def test_batched_stats_of_inference_tensors(tiny_llama, input_ids):
    """Outputs made under inference_mode have no version counter: the first one found switches the
    block to asking each output, and the statistics are those of the in-hook path."""
    with torch.inference_mode(), pk.record(tiny_llama, "*", mode="stats", stats_batch=0) as direct:
        tiny_llama(input_ids)
    with pk.record(tiny_llama, "*", mode="stats", stats_batch="1GiB") as rec:
        with torch.no_grad():
            tiny_llama(input_ids)
        with torch.inference_mode():
            tiny_llama(input_ids)
    half = len(direct)
    assert len(rec) == 2 * half
    per_forward = collections.Counter(c.module for c in direct)
    second = [pk.Call(c.module, c.index + per_forward[c.module], c.order + half, c.tensors) for c in direct]
    _stats_equal(rec, pk.Recording("stats", [*direct.calls, *second]))


class SometimesPair(nn.Module):
    """Returns a tensor, then a (tensor, tensor) pair, then a tensor again."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        y = self.proj(x)
        return (y, -y) if self.calls % 2 == 0 else y


def test_batched_stats_number_calls_across_output_kinds():
    """A wrapped module whose output is sometimes one tensor (a placeholder) and sometimes a pair (the
    general path) keeps one count of its calls."""
    model = nn.Sequential(SometimesPair())
    x = torch.randn(3, 4)
    recordings = []
    for batch in ("1GiB", 0):
        model[0].calls = 0
        with pk.record(model, "*", mode="stats", stats_batch=batch) as rec:
            model[0](x), model[0](x), model[0](x)
        recordings.append(rec)
    batched, direct = recordings
    assert [(c.module, c.index, list(c.tensors)) for c in batched] == [
        ("0.proj", 0, ["output"]), ("0", 0, ["output"]), ("0.proj", 1, ["output"]), ("0", 1, ["output.0", "output.1"]),
        ("0.proj", 2, ["output"]), ("0", 2, ["output"])]
    _stats_equal(batched, direct)


def test_auto_stats_copy_small_cpu_outputs_into_the_batch(tiny_llama, input_ids):
    """stats_batch="auto" on CPU: an output of at most SNAPSHOT_CPU_BYTES joins the batch as a private copy (so a
    later in-place change cannot reach it), a larger one is reduced in its hook; the statistics are those of the
    in-hook path either way."""
    from parity_kit.capture import capturer

    with pk.record(tiny_llama, "*", mode="stats", stats_batch=0) as in_hooks:
        tiny_llama(input_ids)
    with pk.record(tiny_llama, "*", mode="stats") as rec:
        tiny_llama(input_ids)
    assert rec._unbuilt and any(type(entry) is list for entry in rec._calls)  # placeholders: batched
    _stats_equal(rec, in_hooks)
    model = TwiceLinear()  # modifies its sub-module's output in place after the call
    x = torch.randn(2, 4)
    with pk.record(model, "*", mode="stats", stats_batch=0) as direct:
        model(x)
    with pk.record(model, "*", mode="stats") as rec:
        model(x)
    _stats_equal(rec, direct)
    assert rec["proj"][0].output.max == direct["proj"][0].output.max != 0.0
    original = capturer.SNAPSHOT_CPU_BYTES
    try:
        capturer.SNAPSHOT_CPU_BYTES = 0  # every output is larger: all reduced in their hooks
        with pk.record(tiny_llama, "*", mode="stats") as rec:
            tiny_llama(input_ids)
    finally:
        capturer.SNAPSHOT_CPU_BYTES = original
    assert not rec._unbuilt
    _stats_equal(rec, in_hooks)


def test_batched_stats_detect_outputs_modified_in_place():
    model = TwiceLinear()
    with pytest.raises(ParityKitError, match="modified in place.*stats_batch=0"):
        with pk.record(model, "proj", mode="stats", stats_batch="1GiB"):
            model(torch.ones(2, 4))
    assert all(n == (0, 0, 0, 0) for n in hook_counts(model).values())
    with pk.record(model, "proj", mode="stats", stats_batch=0) as rec:  # the in-hook path handles it
        model(torch.ones(2, 4))
    assert len(rec) == 2
    with pytest.raises(ParityKitError, match="stats_batch"):
        with pk.record(model, "proj", mode="stats", stats_batch="some"):
            pass


def test_capture_never_down_casts_without_dtype():
    model = nn.Sequential(nn.Linear(4, 4).double(), nn.Linear(4, 4).double().half().double())
    with pk.record(model, "*") as rec:
        model(torch.ones(2, 4, dtype=torch.float64))
    assert all(c.output.dtype == torch.float64 and not c.orig_dtypes for c in rec)


def test_batched_copies_equal_copies_in_the_hook(tiny_llama, input_ids):
    # copy_batch on CPU tensors exercises the path CUDA tensors take by default; 4 KiB batches flush
    # many times inside the forward
    for batch in ("4KiB", "1GiB"):
        with pk.record(tiny_llama, "*", inputs=True, copy_batch=batch) as batched:
            logits = tiny_llama(input_ids).logits
        with pk.record(tiny_llama, "*", inputs=True, copy_batch=0) as direct:
            tiny_llama(input_ids)
        assert [(c.module, c.index, list(c.tensors)) for c in batched] == \
            [(c.module, c.index, list(c.tensors)) for c in direct]
        for a, b in zip(batched, direct):
            for leaf, x in a.tensors.items():
                assert torch.equal(x, b.tensors[leaf]) and x.shape == b.tensors[leaf].shape, (a.module, leaf)
        logits.zero_()  # the caller's tensor, not the recording's copy
        assert batched["lm_head"][0].output.abs().sum() > 0


def test_batched_copies_detect_outputs_modified_in_place():
    model = TwiceLinear()
    with pytest.raises(ParityKitError, match="modified in place.*copy_batch=0"):
        with pk.record(model, "proj", copy_batch="1GiB"):
            model(torch.ones(2, 4))
    assert all(n == (0, 0, 0, 0) for n in hook_counts(model).values())
    with pk.record(model, "proj", copy_batch=0) as rec:
        model(torch.ones(2, 4))
    assert rec["proj"][0].output.abs().sum() > 0  # the value before h.mul_(0)
    with pytest.raises(ParityKitError, match="copy_batch"):
        with pk.record(model, "proj", copy_batch="lots"):
            pass


def test_auto_stats_batch_depends_on_the_device():
    from parity_kit.capture import recorder as capture

    assert capture.auto_stats_batch("cpu") == capture.AUTO_BATCH
    assert capture.auto_stats_batch("meta") == capture.AUTO_BATCH
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        got = capture.auto_stats_batch("cuda:0")
        assert capture.AUTO_BATCH // 4 <= got <= 4 * capture.AUTO_BATCH
        assert got <= total // 32 or got == capture.AUTO_BATCH // 4


def test_module_walk_equals_named_modules():
    from parity_kit.capture import named_modules

    shared = nn.Linear(2, 2)
    inner = nn.Sequential(shared, nn.ReLU(), nn.Sequential(nn.Tanh(), shared))
    model = nn.Sequential(inner, shared, nn.Identity())
    model.add_module("gap", None)  # a None child is skipped, as named_modules does
    model.add_module("again", inner)  # a module reached twice is listed once, under its first name
    assert named_modules(model) == list(model.named_modules())
    assert [n for n, _ in named_modules(model)] == ["", "0", "0.0", "0.1", "0.2", "0.2.0", "2"]

    class Flat(nn.Module):  # overrides named_modules: its own answer is the one used
        def __init__(self) -> None:
            super().__init__()
            self.hidden = nn.Linear(2, 2)

        def named_modules(self, *args, **kwargs):
            yield "", self

    flat = Flat()
    nested = nn.Sequential(nn.ReLU(), flat)
    assert named_modules(flat) == [("", flat)]
    assert named_modules(nested) == list(nested.named_modules())
    assert all(m is not flat.hidden for _, m in named_modules(nested))
