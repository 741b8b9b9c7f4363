"""The execution floor: run-to-run noise and batch variance measured per module, and judged against."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

import parity_kit as pk
from parity_kit.comparison.execution import ExecutionFloor, apply_execution_floor, execution_verdict
from parity_kit.errors import ParityKitError
from parity_kit.testing import hook_counts, tiny_llama

IDS = torch.tensor([[5, 9, 2, 7, 11, 3, 8]])
NOISY = "model.layers.0.mlp"


def _add_noise(model: torch.nn.Module, relative: float, seed: int = 0) -> None:
    """Planted nondeterminism: the MLP of layer 0 adds fresh noise of relative size ``relative`` on every call."""
    generator = torch.Generator().manual_seed(seed)

    def hook(module, args, output):
        noise = torch.randn(output.shape, generator=generator, dtype=output.dtype)
        return output + relative * output.pow(2).mean().sqrt() * noise

    model.get_submodule(NOISY).register_forward_hook(hook)


def _run(model):
    with pk.record(model) as rec:
        model(IDS)
    return rec


def test_a_deterministic_fp32_model_has_no_run_to_run_noise_and_its_batch_variance_is_reported():
    model = tiny_llama(layers=2)
    before = hook_counts(model)
    floor = pk.execution_floor(model, IDS, progress=False)
    assert hook_counts(model) == before
    table = floor.to_frame()
    assert len(table) > 20 and (table["run_to_run"] == 0).all()
    # Whether CPU kernels are batch-invariant in fp32 depends on the thread count: at most a few ULPs here,
    # measured for every module either way.
    assert table["batch"].notna().all() and 0 <= table["batch"].max() < 1e-5
    assert "slot 3 of 4, left padding" in floor.contexts and "slot 0 of 2, right padding" in floor.contexts
    assert floor.skipped == ("TF32 and deterministic-algorithm toggles: CUDA only",)


def test_planted_nondeterminism_reads_within_run_to_run_noise_and_a_real_bug_does_not():
    model = tiny_llama(layers=2)
    _add_noise(model, 1e-3)
    floor = pk.execution_floor(model, IDS, progress=False)
    reference = _run(model)
    again = pk.compare(reference, _run(model), execution_floor=floor)
    noisy = again[again["module"] == NOISY].iloc[0]
    assert noisy["rel_rms"] > 10 * noisy["floor"]  # far above one fp32 rounding
    assert noisy["verdict"] == "within run-to-run noise"
    assert not again["verdict"].str.startswith("above").any()
    assert pk.first_divergence(again, threshold=1e-5, skip_execution_noise=True) is None
    assert pk.first_divergence(again, threshold=1e-5)["module"] == NOISY

    buggy = copy.deepcopy(model)  # the deep copy keeps the noise hook
    with torch.no_grad():
        buggy.get_submodule("model.layers.1.mlp.down_proj").weight.mul_(1.05)
    judged = pk.compare(reference, _run(buggy), execution_floor=floor)
    bug = judged[judged["module"] == "model.layers.1.mlp.down_proj"].iloc[0]
    assert bug["verdict"].startswith("above every floor ×")
    first = pk.first_divergence(judged, threshold=1e-5, skip_execution_noise=True)
    assert first["module"] == "model.layers.1.mlp.down_proj"


def test_planted_batch_dependence_reads_within_batch_variance():
    """A kernel whose reduction order depends on the batch (simulated: layer 0's MLP perturbs its output by a
    fixed pattern whenever it runs on more than one row)."""
    model = tiny_llama(layers=2)
    pattern = torch.Generator().manual_seed(1)

    def hook(module, args, output):
        if output.shape[0] == 1:
            return output
        bump = torch.randn(output.shape[1:], generator=torch.Generator().manual_seed(output.shape[0]))
        return output * (1 + 1e-3 * bump)

    model.get_submodule(NOISY).register_forward_hook(hook)
    floor = pk.execution_floor(model, IDS, batch_sizes=(2, 4), padding=("right",), progress=False)
    assert floor.floors["batch"][(NOISY, 0, "output")] > 1e-4 and floor.floors["run_to_run"][(NOISY, 0, "output")] == 0
    batch = {"input_ids": torch.cat([IDS, torch.randint(3, 64, (1, IDS.shape[1]), generator=pattern)])}
    with pk.record(model) as batched:
        model(**batch)
    row = pk.Recording("tensors", [pk.Call(c.module, c.index, c.order, {k: t[:1] for k, t in c.tensors.items()
                                                                          if t.ndim >= 2 and t.shape[0] == 2})
                                   for c in batched.calls])
    judged = pk.compare(_run(model), row, execution_floor=floor)
    assert judged.loc[judged["module"] == NOISY, "verdict"].item() == "within batch variance"
    assert not judged["verdict"].str.startswith("above").any()


def test_batch_variance_in_bf16_is_a_floor_the_same_run_in_a_batch_stays_within():
    model = tiny_llama(layers=2, dtype=torch.bfloat16)
    floor = pk.execution_floor(model, IDS, batch_sizes=(3,), padding=("left",), progress=False)
    assert set(floor.floors) == {"run_to_run", "batch"} and len(floor.contexts) == 2 + 2
    table = apply_execution_floor(pk.compare(_run(model), _run(model)), floor)
    assert {"run_to_run_floor", "batch_floor", "execution_floor"} <= set(table.columns)
    assert (table["verdict"] == "within rounding floor").all()  # two identical runs


def test_a_recurrent_model_gets_unpadded_batches():
    model, _ = pk.models.load("tiny-rwkv7")
    floor = pk.execution_floor(model.eval(), IDS, repeats=2, batch_sizes=(2,), progress=False)
    assert floor.contexts == ("alone, repeat 1", "slot 0 of 2, unpadded", "slot 1 of 2, unpadded")
    assert any("takes no padding mask" in s for s in floor.skipped)
    assert len(floor.floors["batch"]) > 50 and max(floor.floors["batch"].values()) < 1e-4


def test_verdicts_add_the_floors_in_order():
    assert execution_verdict(1e-3, 1e-3, {}) == "within rounding floor"
    assert execution_verdict(5e-3, 1e-3, {"run_to_run": 3e-3}) == "within run-to-run noise"
    assert execution_verdict(5e-3, 1e-3, {"run_to_run": 0.0, "batch": 3e-3}) == "within batch variance"
    assert execution_verdict(5e-3, 1e-3, {"kernel_settings": 3e-3}) == "within kernel-setting variance"
    assert execution_verdict(1.0, 1e-3, {"batch": 3e-3}) == "above every floor ×320"
    assert execution_verdict(float("nan"), 1e-3, {"batch": 3e-3}) == "not finite"


def test_rows_the_floor_did_not_measure_keep_their_verdict():
    floor = ExecutionFloor("fp32", "cpu", {"batch": {("a", 0, "output"): 1e-3}})
    t = pd.DataFrame({"module": ["a", "b"], "cand_module": ["a [label]", "b"], "call": 0, "tensor": "output.0",
                      "status": "ok", "rel_rms": [1e-3, 1.0], "floor": [1e-7, 1e-7], "verdict": ["x", "kept"]})
    judged = apply_execution_floor(t, floor)
    assert judged["verdict"].tolist() == ["within batch variance", "kept"]  # output.0 aliases output
    assert judged["batch_floor"].iloc[0] == 1e-3 and pd.isna(judged["execution_floor"].iloc[1])


def test_the_plot_shows_each_floor_and_the_observed_error():
    model = tiny_llama(layers=1)
    floor = pk.execution_floor(model, IDS, repeats=2, batch_sizes=(2,), progress=False)
    fig = pk.plots.execution_floors(pk.compare(_run(model), _run(model), execution_floor=floor))
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["rounding floor ×2", "run-to-run ×2", "batch variance ×2"]


@pytest.mark.parametrize("kwargs, message", [
    ({"repeats": 0}, "repeats=0"),
    ({"batch_sizes": (1,)}, "at least 2 rows"),
    ({"padding": ("middle",)}, "padding \\['middle'\\]"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ParityKitError, match=message):
        pk.execution_floor(tiny_llama(layers=1), IDS, progress=False, **kwargs)


def test_bad_inputs_and_tables_are_refused():
    model = tiny_llama(layers=1)
    with pytest.raises(ParityKitError, match="one prompt of token ids"):
        pk.execution_floor(model, torch.ones(2, 3, dtype=torch.long), progress=False)
    with pytest.raises(ParityKitError, match="sources \\['noise'\\] are unknown"):
        ExecutionFloor("fp32", "cpu", {"noise": {}})
    with pytest.raises(ParityKitError, match="must be an ExecutionFloor"):
        apply_execution_floor(pd.DataFrame(), {"batch": {}})
    with pytest.raises(ParityKitError, match="needs a table judged against an execution floor"):
        pk.first_divergence(pd.DataFrame({"module": ["a"], "rel_rms": [1.0], "status": "ok"}),
                            skip_execution_noise=True)
