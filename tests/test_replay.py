from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import parity_kit as pk
from parity_kit.analyses.mixed_precision import run_in_dtype
from parity_kit.errors import ParityKitError
from parity_kit.testing import NaiveNorm, hook_counts
from parity_kit.testing import precision_sensitive_mlp as build_sensitive
from parity_kit.testing import tiny_llama as build_tiny_llama


@pytest.fixture
def pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    ref = build_sensitive()
    return ref, copy.deepcopy(ref).to(torch.bfloat16), torch.randn(64, 16, generator=torch.Generator().manual_seed(1))


def culprit_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, NaiveNorm)}


def test_local_error_is_exactly_zero_for_the_same_model_in_fp32(pair):
    ref, _, x = pair
    table = pk.local_vs_propagated(ref, copy.deepcopy(ref), x)
    assert len(table) == len([n for n, _ in ref.named_modules() if n])
    assert (table["local_rel_rms"] == 0).all() and (table["free_rel_rms"] == 0).all()
    assert (table["status"] == "ok").all() and (table["local_verdict"] == "within floor").all()


def test_local_error_points_at_the_culprit_while_free_run_error_propagates(pair):
    ref, low, x = pair
    table = pk.local_vs_propagated(ref, low, x).set_index("module")
    (culprit,) = culprit_names(low)
    assert table["local_rel_rms"].idxmax() == culprit
    assert table.loc[culprit, "local_verdict"].startswith("above floor")
    downstream = table.loc[[n for n in table.index if int(n) > int(culprit)]]
    # downstream modules compute fine (local near the floor) but show the inherited error in the free run
    assert (downstream["local_rel_rms"] < 5 * downstream["floor"]).all()
    assert (downstream["free_over_local"] > 10).all()
    assert (downstream["free_verdict"] != "within floor").all()
    assert set(table.columns) >= {"local_rel_rms", "free_rel_rms", "input_rel_rms", "floor", "local_verdict",
                                  "free_verdict", "free_over_local"}


def test_replay_matches_calling_the_module_on_rounded_reference_inputs(pair):
    ref, low, x = pair
    with pk.record(ref, "*", inputs=True) as rec, torch.no_grad():
        ref(x)
    name = "4"
    table = pk.local_vs_propagated(rec, low, x, modules=[name])
    ref_call = rec[name][0]
    with torch.no_grad():
        expected = low.get_submodule(name)(ref_call.inputs["input.0"].to(torch.bfloat16))
    assert table.loc[0, "local_rel_rms"] == pk.metrics.rel_rms(ref_call.output, expected)
    assert table.loc[0, "inputs_from_reference"] == "1/1"


def test_recording_and_model_references_agree(pair):
    ref, low, x = pair
    with pk.record(ref, "*", inputs=True) as rec, torch.no_grad():
        ref(x)
    from_model = pk.local_vs_propagated(ref, low, x, modules="1*")
    from_recording = pk.local_vs_propagated(rec, low, x, modules="1*")
    pd_cols = ["module", "local_rel_rms", "free_rel_rms"]
    assert from_model[pd_cols].equals(from_recording[pd_cols])
    assert sorted(from_model["module"]) == sorted(n for n, _ in ref.named_modules() if n.startswith("1"))


def test_keyword_inputs_are_replayed_and_hooks_of_run_in_dtype_stay_active():
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = NaiveNorm(8)

        def forward(self, *, hidden: torch.Tensor) -> torch.Tensor:
            return self.norm(hidden)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.inner = Inner()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(hidden=self.proj(x) + 40.0)

    torch.manual_seed(0)
    ref = Outer().eval()
    low = copy.deepcopy(ref).to(torch.bfloat16)
    x = torch.randn(16, 8) * 4
    plain = pk.local_vs_propagated(ref, low, x, modules=["inner"]).iloc[0]
    assert plain["inputs_from_reference"] == "1/1" and plain["local_rel_rms"] > 0.01
    with run_in_dtype(low, NaiveNorm, "fp32", master_weights=ref):
        fixed = pk.local_vs_propagated(ref, low, x, modules=["inner"]).iloc[0]
    assert fixed["local_rel_rms"] < plain["local_rel_rms"] / 10


def test_two_independent_models_with_a_name_mapping():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)).eval()

    class Renamed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.proj(x))

    cand = Renamed().eval()
    cand.load_state_dict({"proj.weight": ref[0].weight, "proj.bias": ref[0].bias,
                          "norm.weight": ref[1].weight, "norm.bias": ref[1].bias})
    x = torch.randn(4, 8)
    for mapping in ({"0": "proj", "1": "norm"}, lambda n: {"0": "proj", "1": "norm"}[n],
                    pk.ModuleMapping([("0", "proj"), ("1", "norm")])):
        table = pk.local_vs_propagated(ref, cand, x, mapping=mapping)
        assert table["cand_module"].tolist() == ["proj", "norm"]
        assert (table["local_rel_rms"] == 0).all()
    cand.to(torch.float16)
    table = pk.local_vs_propagated(ref, cand, x, mapping={"0": "proj", "1": "norm"})
    assert (table["local_rel_rms"] > 0).all() and (table["cand_dtype"] == "fp16").all()


def test_real_llama_bf16_rows_and_no_leaked_hooks(input_ids):
    ref = build_tiny_llama()
    low = build_tiny_llama(dtype=torch.bfloat16)
    hooks = hook_counts(low)
    table = pk.local_vs_propagated(ref, low, {"input_ids": input_ids, "use_cache": False},
                                   modules="model.layers.*.mlp")
    assert table["module"].tolist() == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert (table["local_rel_rms"] > 0).all() and (table["local_rel_rms"] < 0.05).all()
    assert hook_counts(low) == hooks


def test_bad_inputs(pair):
    ref, low, x = pair
    with pk.record(ref, "*") as rec, torch.no_grad():
        ref(x)
    with pytest.raises(ParityKitError, match="inputs=True"):
        pk.local_vs_propagated(rec, low, x)
    with pytest.raises(ParityKitError, match="counterpart"):
        pk.local_vs_propagated(ref, low, x, mapping={"0": "nope"})
    with pytest.raises(ParityKitError, match="model or a Recording"):
        pk.local_vs_propagated("ref", low, x)
    with pytest.raises(ParityKitError):
        pk.local_vs_propagated(ref, low, x, modules="no.such.module")
    hooks = hook_counts(low)
    with pytest.raises(RuntimeError):
        pk.local_vs_propagated(ref, low, torch.ones(3, 5))  # wrong width: the reference forward raises
    with pytest.raises(ParityKitError, match="shape"):
        pk.local_vs_propagated(ref, low, x, mapping={"0": "1"})  # a 16-wide input replayed into a 32-wide layer
    assert hook_counts(low) == hooks


def test_plots_take_a_real_local_vs_propagated_table(input_ids):
    from matplotlib.figure import Figure

    ref = build_tiny_llama()
    low = build_tiny_llama(dtype=torch.bfloat16)
    table = pk.local_vs_propagated(ref, low, {"input_ids": input_ids, "use_cache": False}, modules="model.layers.*")
    fig = pk.plots.local_vs_propagated_waterfall(table)
    assert isinstance(fig, Figure)
    growth = pk.plots.layer_error_growth(table, metric="free_rel_rms", kinds=["mlp", "self_attn"])
    assert [line.get_label() for line in growth.axes[0].get_lines() if not line.get_label().startswith("_")] == \
        ["mlp", "self_attn"]
    with pytest.raises(ParityKitError, match="not in the table"):
        pk.plots.layer_error_growth(table, metric="free_rel_rms", kinds=["nope"])
    with pytest.raises(ParityKitError):
        pk.plots.local_vs_propagated_waterfall(table, metric="cosine")


class _Positional(nn.Module):
    """Takes its input by position and returns a tensor (like InternLM2's attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, hidden: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.inner(hidden) * scale


class _Keyword(_Positional):
    """The same computation, called by keyword and returning a tuple (like Llama's attention)."""

    def forward(self, hidden: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return self.inner(hidden) * scale, None


class _Caller(nn.Module):
    def __init__(self, block: nn.Module, by_keyword: bool) -> None:
        super().__init__()
        self.block, self.by_keyword = block, by_keyword

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.full((1,), 2.0, dtype=x.dtype)
        out = self.block(hidden=x, scale=scale) if self.by_keyword else self.block(x, scale)
        return out[0] if isinstance(out, tuple) else out


def test_positional_and_keyword_inputs_are_matched_between_implementations():
    torch.manual_seed(0)
    ref = _Caller(_Positional(), by_keyword=False).eval()
    cand = _Caller(_Keyword(), by_keyword=True).eval()
    cand.block.inner.load_state_dict(ref.block.inner.state_dict())
    x = torch.randn(3, 4)
    with pk.record(ref, "*", inputs=True) as rec, torch.no_grad():
        ref(x + 0.5)  # the reference saw other inputs: a replay that ignored them would show an error
    table = pk.local_vs_propagated(rec, cand, x, modules=["block"]).set_index("module")
    assert table.loc["block", "inputs_from_reference"] == "2/2" and table.loc["block", "status"] == "ok"
    assert table.loc["block", "local_rel_rms"] == 0.0 and table.loc["block", "free_rel_rms"] > 0.1


def test_a_call_whose_floating_inputs_cannot_come_from_the_reference_has_no_own_error():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 4)).eval()
    cand = copy.deepcopy(ref)
    with pk.record(ref, "*", inputs=True) as rec, torch.no_grad():
        ref(torch.randn(2, 4))
    for call in rec.calls:  # the reference kept its inputs under a name the candidate never uses
        call.tensors["input.other"] = call.tensors.pop("input.0")
    table = pk.local_vs_propagated(rec, cand, torch.randn(2, 4))
    assert table.loc[0, "status"] == "inputs not replayable" and table.loc[0, "inputs_from_reference"] == "0/1"
    assert math.isnan(table.loc[0, "local_rel_rms"]) and table.loc[0, "free_rel_rms"] > 0


class _MaskedAttention(nn.Module):
    """Scores masked by a mask given either as booleans (True: attend, like InternLM2's) or additively
    (0 / -inf, like Llama's eager attention): two encodings of one argument."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.proj(hidden)
        scores = hidden @ hidden.transpose(-1, -2)  # [T, T]
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
        return scores.softmax(-1) @ hidden


class _MaskCaller(nn.Module):
    def __init__(self, boolean: bool) -> None:
        super().__init__()
        self.attn, self.boolean = _MaskedAttention(), boolean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        causal = torch.ones(x.shape[0], x.shape[0], dtype=torch.bool).tril()
        mask = causal if self.boolean else torch.zeros(causal.shape, dtype=x.dtype).masked_fill(~causal, -math.inf)
        return self.attn(x, mask)


def test_a_mask_in_another_encoding_is_not_cast_into_the_replay():
    # casting the reference's boolean mask to the candidate's float would turn "attend" into +1.0 and "masked"
    # into 0.0: a large own error in a module that computes exactly like the reference
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ref = _MaskCaller(boolean=True)
    with pk.record(ref, "*", inputs=True) as rec, torch.no_grad():
        ref(x)
    cand = _MaskCaller(boolean=False)
    cand.load_state_dict(ref.state_dict())
    table = pk.local_vs_propagated(rec, cand, x, modules=["attn"]).set_index("module")
    assert table.loc["attn", "status"] == "ok" and table.loc["attn", "inputs_from_reference"] == "1/2"
    assert table.loc["attn", "local_rel_rms"] < 1e-6
