from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

import parity_kit as pk
from parity_kit.analyses.evaluation import LastWordResult
from parity_kit.analyses.mixed_precision import run_in_dtype
from parity_kit.analyses.precision import BisectionResult
from parity_kit.errors import ParityKitError
from parity_kit.stories.groupnorm import (
    ClassSweepSummary,
    LocalErrorSummary,
    GroupNormVerdict,
    conclude_groupnorm_precision,
    first_above_floor_text,
    groupnorm_fix_variants,
    held_out_input_ids,
    join_sweeps,
    judge_groupnorm_precision,
    kinds_present,
    logits_error_table,
    measure_variants,
    modules_ending_with,
    primary_outputs,
    summarise_class_sweep,
    summarise_local_errors,
)
from parity_kit.testing import NaiveNorm, hook_counts, precision_sensitive_mlp
from parity_kit.testing import tiny_llama as build_tiny_llama


def build_sensitive(culprits: tuple[int, ...] = (3,), blocks: int = 6, d: int = 32) -> nn.Sequential:
    return precision_sensitive_mlp(culprits, blocks, d)


def culprit_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, NaiveNorm)}


def snapshot(model: nn.Module) -> dict[str, tuple[int, torch.dtype, bytes]]:
    """Identity, dtype and raw bytes of every parameter and buffer."""
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        out[name] = (id(t), t.dtype, t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return out


@pytest.fixture
def pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    ref = build_sensitive()
    return ref, copy.deepcopy(ref).to(torch.bfloat16), torch.randn(64, 16, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------ run_in_dtype
def test_run_in_dtype_computes_in_dtype_and_restores_bit_exactly(pair):
    ref, low, x = pair
    low.register_buffer("scale", torch.tensor([0.1, 0.2], dtype=torch.bfloat16))
    before, hooks = snapshot(low), hook_counts(low)
    with run_in_dtype(low, NaiveNorm, "fp32") as names:
        inside = [low.get_submodule(n).weight.dtype for n in names]
        y = low(x.to(torch.bfloat16))
        assert hook_counts(low) != hooks
    assert names == sorted(culprit_names(low), key=int)
    assert inside == [torch.float32]
    assert y.dtype == torch.bfloat16  # cast back to the surrounding dtype
    assert snapshot(low) == before and hook_counts(low) == hooks


def test_run_in_dtype_restores_after_exception_in_block_and_in_forward(pair):
    _, low, x = pair
    before, hooks = snapshot(low), hook_counts(low)
    with pytest.raises(RuntimeError, match="boom"), run_in_dtype(low, "*", "fp32"):
        raise RuntimeError("boom")
    assert snapshot(low) == before and hook_counts(low) == hooks
    with pytest.raises(RuntimeError), run_in_dtype(low, nn.LayerNorm, "fp32"):
        low(torch.ones(3, 5, dtype=torch.bfloat16))  # wrong width: the first Linear raises
    assert snapshot(low) == before and hook_counts(low) == hooks


def test_run_in_dtype_changes_the_result_and_master_weights_make_it_exact(pair):
    ref, low, x = pair
    name = sorted(culprit_names(low))[0]
    h = torch.randn(8, 32) * 0.5 + 40
    plain = low[int(name)](h.to(torch.bfloat16))
    with run_in_dtype(low, [name], "fp32", master_weights=ref):
        fixed = low[int(name)](h.to(torch.bfloat16))
    # with the fp32 master weights the module is exactly the fp32 module on the bf16-rounded input
    expected = ref[int(name)](h.to(torch.bfloat16).float()).to(torch.bfloat16)
    assert torch.equal(fixed, expected)
    assert not torch.equal(plain, fixed)


def test_master_weights_differ_from_upcast_weights():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 8)).eval()
    low = copy.deepcopy(ref).to(torch.bfloat16)
    with run_in_dtype(low, "0", "fp32"):
        upcast = low[0].weight.detach().clone()
    with run_in_dtype(low, "0", "fp32", master_weights=ref.state_dict()):
        master = low[0].weight.detach().clone()
    assert torch.equal(master, ref[0].weight) and not torch.equal(upcast, ref[0].weight)


def test_run_in_dtype_lower_dtype_and_kwargs_and_nested_selection():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(8)

        def forward(self, x: torch.Tensor, *, bias: torch.Tensor) -> torch.Tensor:
            return self.norm(x + bias)

    torch.manual_seed(0)
    block = Block().eval()
    x, bias = torch.randn(4, 8), torch.randn(8)
    plain = block(x, bias=bias)
    seen: list[torch.dtype] = []
    handle = block.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    with run_in_dtype(block, ["", "norm"], "bf16") as names:  # the root and its child: the root wins
        low = block(x, bias=bias)
    handle.remove()
    assert names == [""]
    assert seen == [torch.bfloat16]  # the keyword input was cast too, before the addition
    assert low.dtype == torch.float32 and not torch.equal(low, plain)
    assert torch.equal(block(x, bias=bias), plain)


def test_run_in_dtype_bad_inputs(pair):
    ref, low, _ = pair
    before, hooks = snapshot(low), hook_counts(low)
    with pytest.raises(ParityKitError, match="no entry for parameter"), \
            run_in_dtype(low, NaiveNorm, "fp32", master_weights={"0.weight": ref[0].weight}):
        pass
    with pytest.raises(ParityKitError, match="master_weights must be"), run_in_dtype(low, NaiveNorm, "fp32",
                                                                                      master_weights=[1]):
        pass
    with pytest.raises(ParityKitError, match="unknown dtype"), run_in_dtype(low, NaiveNorm, "fp12"):
        pass
    with pytest.raises(ParityKitError), run_in_dtype(low, "no.such.*", "fp32"):
        pass
    assert snapshot(low) == before and hook_counts(low) == hooks


def test_run_in_dtype_on_real_llama_restores_everything(input_ids):
    model = build_tiny_llama(dtype=torch.bfloat16)
    before, hooks = snapshot(model), hook_counts(model)
    plain = model(input_ids).logits
    with run_in_dtype(model, "model.layers.*.mlp", "fp32") as names:
        mixed = model(input_ids).logits
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert mixed.dtype == torch.bfloat16 and not torch.equal(mixed, plain)
    assert snapshot(model) == before and hook_counts(model) == hooks
    assert torch.equal(model(input_ids).logits, plain)


# ------------------------------------------------------------------------------------------ sweep
def test_sweep_by_class_finds_the_sensitive_class(pair):
    ref, low, x = pair
    table = pk.sweep_by_class(low, ref, x, master_model=ref, progress=False)
    classes = table[table["kind"] == "class"]
    assert classes.iloc[0]["class"] == "NaiveNorm"
    assert classes.iloc[0]["error_removed_fraction"] > 0.5
    assert classes.iloc[1:]["error_removed_fraction"].max() < 0.1
    assert set(classes["class"]) == {"Linear", "LayerNorm", "NaiveNorm", "GELU"}
    assert table.attrs["passes"] == len(classes) + 3
    context = table[table["kind"] == "context"].set_index("class")
    nothing = context.loc["nothing in fp32 (all bf16)"]
    assert nothing["error_removed_fraction"] == 0 and nothing["verdict"].startswith("above floor")
    whole = context.loc["whole model in fp32"]
    assert whole["error"] < nothing["error"] / 10
    assert set(table.columns) >= {"class", "n_modules", "param_fraction", "error", "error_removed_fraction",
                                  "floor", "floor_ratio", "verdict"}
    assert classes.set_index("class").loc["NaiveNorm", "n_modules"] == 1


def test_sweep_accepts_reference_logits_and_explicit_classes(pair):
    ref, low, x = pair
    with torch.no_grad():
        logits = ref(x)
    a = pk.sweep_by_class(low, logits, x, classes=[NaiveNorm, nn.Linear], progress=False)
    b = pk.sweep_by_class(low, ref, x, classes=[NaiveNorm, nn.Linear], progress=False)
    assert a["error"].tolist() == b["error"].tolist()
    assert list(a[a["kind"] == "class"]["class"]) == ["NaiveNorm", "Linear"]
    with pytest.raises(ParityKitError, match="no instance"):
        pk.sweep_by_class(low, ref, x, classes=[nn.GroupNorm], progress=False)
    with pytest.raises(ParityKitError, match="nothing to sweep"):
        pk.sweep_by_class(ref, ref, x, progress=False)


# ------------------------------------------------------------------------------------------ bisection
def pass_bound(k: int, n: int) -> int:
    """The bound documented in bisect_precision: 2 + 2k⌈log2 N⌉ + 2k."""
    return 2 + 2 * k * math.ceil(math.log2(n)) + 2 * k


def leaf_count(model: nn.Module) -> int:
    return sum(1 for _, m in model.named_modules() if next(m.children(), None) is None)


def test_bisection_finds_the_single_culprit_within_the_pass_bound(pair):
    ref, low, x = pair
    result = pk.bisect_precision(low, ref, x, target=0.3, master_model=ref, progress=False)
    assert isinstance(result, BisectionResult)
    assert result.chosen == sorted(culprit_names(low))
    n = leaf_count(low)
    assert result.n_candidates == n
    assert result.passes <= pass_bound(1, n) == result.pass_bound
    assert result.error_chosen <= result.target_error < result.error_low
    curve = result.curve
    assert curve["step"].tolist() == [0, 1]
    assert curve.iloc[0]["error"] == result.error_low and curve.iloc[-1]["meets_target"]
    assert 0 < curve.iloc[-1]["param_fraction"] < 0.01
    assert curve.iloc[-1]["linear_flop_fraction"] == 0.0  # a norm: no Linear FLOPs kept in fp32
    assert "verdict" in curve.columns


def test_bisection_finds_two_planted_culprits():
    ref = build_sensitive(culprits=(1, 4))
    low = copy.deepcopy(ref).to(torch.bfloat16)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    names = sorted(culprit_names(low))
    with torch.no_grad():
        logits = ref(x)

    def error_with(selected: list[str]) -> float:
        with run_in_dtype(low, selected, "fp32", master_weights=ref), torch.no_grad():
            return pk.metrics.rel_rms(logits, low(x.to(torch.bfloat16)))

    one_fixed = max(error_with([names[0]]), error_with([names[1]]))
    both_fixed = error_with(names)
    assert both_fixed < one_fixed  # the model really needs both
    result = pk.bisect_precision(low, logits, x, target_abs=(one_fixed + both_fixed) / 2, master_model=ref,
                                 progress=False)
    assert sorted(result.chosen) == names
    assert result.passes <= pass_bound(2, leaf_count(low))
    assert result.curve["error"].is_monotonic_decreasing
    assert result.curve["param_fraction"].is_monotonic_increasing


def test_bisection_target_removed_is_a_fraction_of_the_removable_error(pair):
    ref, low, x = pair
    result = pk.bisect_precision(low, ref, x, target_removed=0.9, master_model=ref, progress=False)
    expected = result.error_low - 0.9 * (result.error_low - result.error_all_high)
    assert result.target_error == pytest.approx(expected, rel=1e-12)
    assert result.error_chosen <= result.target_error
    assert result.chosen == sorted(culprit_names(low))


def test_bisection_with_a_loose_target_keeps_nothing(pair):
    ref, low, x = pair
    result = pk.bisect_precision(low, ref, x, target_abs=10.0, progress=False)
    assert result.chosen == [] and result.passes == 2


def test_bisection_on_real_llama_meets_its_target(input_ids):
    ref = build_tiny_llama()
    low = build_tiny_llama(dtype=torch.bfloat16)
    result = pk.bisect_precision(low, ref, input_ids, candidates=[r"re:model\.layers\.\d+", "model.norm", "lm_head"], target=0.8,
                                 master_model=ref, progress=False)
    assert result.error_chosen <= result.target_error
    assert result.passes <= result.pass_bound
    assert result.n_candidates == 4
    assert set(result.chosen) <= {"model.layers.0", "model.layers.1", "model.norm", "lm_head"}


def test_bisection_bad_inputs(pair):
    ref, low, x = pair
    with pytest.raises(ParityKitError, match=r"below what keeping all .* achieves"):
        pk.bisect_precision(low, ref, x, target_abs=1e-9, progress=False)
    with pytest.raises(ParityKitError, match="close names|matched no"):
        pk.bisect_precision(low, ref, x, candidates="encoder.*", progress=False)
    with pytest.raises(ParityKitError, match="nothing to bisect: every parameter is already fp32"):
        pk.bisect_precision(ref, ref, x, progress=False)
    with pytest.raises(ParityKitError, match="fraction in"):
        pk.bisect_precision(low, ref, x, target=1.5, progress=False)
    with pytest.raises(ParityKitError, match="target_removed=0 must be a fraction"):
        pk.bisect_precision(low, ref, x, target_removed=0, progress=False)
    with pytest.raises(ParityKitError, match="not an error metric"):
        pk.bisect_precision(low, ref, x, metric="cosine", progress=False)
    with pytest.raises(ParityKitError, match="compute nothing"):
        pk.bisect_precision(nn.Sequential(nn.Linear(4, 4), nn.Dropout()).to(torch.bfloat16), torch.zeros(2, 4),
                            torch.ones(2, 4), candidates="1", progress=False)
    with pytest.raises(ParityKitError, match="shape"):
        pk.bisect_precision(low, torch.zeros(3, 3), x, progress=False)


def test_plots_take_real_sweep_and_bisection_results(pair):
    from matplotlib.figure import Figure

    ref, low, x = pair
    table = pk.sweep_by_class(low, ref, x, master_model=ref, progress=False)
    result = pk.bisect_precision(low, ref, x, target=0.3, master_model=ref, progress=False)
    fig = pk.plots.class_sweep(table)
    assert isinstance(fig, Figure)
    bars = fig.axes[0].patches
    assert len(bars) == (table["kind"] == "class").sum() + 2  # + every-class and whole-model context bars
    assert isinstance(pk.plots.bisection_curve(result), Figure)
    with pytest.raises(ParityKitError):
        pk.plots.class_sweep(table.drop(columns=["n_modules"]))
    with pytest.raises(ParityKitError):
        pk.plots.bisection_curve(table)



# ------------------------------------------------------------------------------------------ story 02 helpers
class RecordingTokenizer:
    """Characters as token ids; remembers the text it was given."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert not add_special_tokens  # the BOS token comes from held_out_input_ids, never from the tokenizer
        self.texts.append(text)
        return {"input_ids": [ord(c) for c in text]}


def test_held_out_input_ids_takes_the_last_documents_after_the_evaluated_ones():
    items = [SimpleNamespace(context=f"doc{i} ", target=str(i)) for i in range(10)]  # 6 characters each
    tok = RecordingTokenizer()
    ids = held_out_input_ids(items, tok, skip=3, seq_len=200)
    assert ids[0] == 0 and "".join(map(chr, ids[1:])) == tok.texts[-1]
    assert tok.texts[-1] == " ".join(f"doc{i} {i}" for i in range(9, 2, -1))  # newest first, none of the first 3
    # 8 × 2 = 16 characters: the walk stops at the third document (18 characters), the ids at 2 tokens
    assert held_out_input_ids(items, tok, skip=0, seq_len=2) == [0, ord("d")]
    assert tok.texts[-1] == "doc9 9 doc8 8 doc7 7"
    assert held_out_input_ids(items, tok, skip=0, seq_len=4, bos_id=5)[0] == 5
    with pytest.raises(ParityKitError, match="lower n_items"):
        held_out_input_ids(items, tok, skip=10, seq_len=64)
    with pytest.raises(ParityKitError, match="seq_len >= 2"):
        held_out_input_ids(items, tok, skip=0, seq_len=1)


def test_logits_error_table_judges_each_run_against_its_floor():
    ref = torch.randn(4, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noisy = (ref + 0.05 * torch.randn(4, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    table = logits_error_table({"fp64": ref, "fp32": ref.float(), "bf16": noisy.bfloat16()}, dtype="bf16",
                               reference_dtype="fp32")
    assert table[["run", "reference"]].values.tolist() == [["bf16", "fp32"], ["bf16", "fp64"], ["fp32", "fp64"]]
    assert table.loc[0, "rel_rms"] == pytest.approx(pk.metrics.rel_rms(ref.float(), noisy.bfloat16()))
    assert table.loc[0, "floor"] == pytest.approx(pk.metrics.representability_floor(ref.float(), torch.bfloat16))
    assert table.loc[0, "floor_ratio"] == pytest.approx(table.loc[0, "rel_rms"] / table.loc[0, "floor"])
    assert table.loc[0, "verdict"].startswith("above floor")  # 5% noise is far above bf16 rounding
    assert table.loc[2, "verdict"] == "within floor" and table.loc[2, "rel_rms"] < 1e-7
    rounded = logits_error_table({"fp64": ref, "fp32": ref.float(), "bf16": ref.bfloat16()}, dtype="bf16",
                                 reference_dtype="fp32")
    assert rounded.loc[0, "verdict"] == "within floor"
    with pytest.raises(ParityKitError, match=r"no run named \['fp64'\]"):
        logits_error_table({"fp32": ref.float(), "bf16": ref.bfloat16()}, dtype="bf16", reference_dtype="fp32")


def layer_rows() -> pd.DataFrame:
    modules = ["model.layers.0.attn.wkv", "model.layers.0.attn.g_norm", "model.layers.0.attn.g_norm",
               "model.layers.0.attn", "model.layers.0", "model.norm"]
    return pd.DataFrame({
        "order": range(6), "module": modules, "tensor": ["output", "output", "output.1", "output.0", "output", "output"],
        "rel_rms": [1e-3, 5e-3, 9e-1, 6e-3, 7e-3, 8e-3], "floor_ratio": [1.0, 3.0, 50.0, 4.0, 5.0, 6.0],
        "verdict": ["within floor", "above floor ×3", "above floor ×50", "above floor ×4", "above floor ×5",
                    "above floor ×6"],
    })


def test_layer_table_helpers_pick_primary_outputs_kinds_and_the_first_module_above_its_floor():
    primary = primary_outputs(layer_rows())
    assert primary["tensor"].tolist() == ["output", "output", "output.0", "output", "output"]
    assert kinds_present(primary) == ["(block)", "attn", "attn.wkv", "attn.g_norm"]
    assert kinds_present(primary, kinds=["ffn", "attn"]) == ["attn"]
    assert modules_ending_with(primary)["rel_rms"].tolist() == [5e-3]
    assert first_above_floor_text(primary) == ("first module (execution order) whose free-run error is above 2x its "
                                               "floor: model.layers.0.attn.g_norm (0.005, above floor ×3)")
    assert first_above_floor_text(primary, threshold=4.5).endswith("model.layers.0 (0.007, above floor ×5)")
    assert first_above_floor_text(primary, threshold=100).endswith(": none")
    with pytest.raises(ParityKitError, match="'tensor' column"):
        primary_outputs(pd.DataFrame({"module": ["a"]}))


def sweep_table(removed: dict[str, float], all_listed: float = 0.4, whole: float = 0.9) -> pd.DataFrame:
    """A sweep_by_class-shaped table: three context rows, then class rows sorted by the error they remove."""
    classes = sorted(removed.items(), key=lambda kv: -kv[1])
    return pd.DataFrame({
        "kind": ["context"] * 3 + ["class"] * len(classes),
        "class": ["nothing in fp32 (all bf16)", "all listed classes in fp32", "whole model in fp32",
                  *(name for name, _ in classes)],
        "error_removed_fraction": [0.0, all_listed, whole, *(v for _, v in classes)],
    })


def test_join_sweeps_and_class_summary():
    sweep = sweep_table({"Linear": 0.3, "RWKV7GroupNorm": 0.1, "LayerNorm": -0.02})
    fp64 = sweep.iloc[::-1].assign(error_removed_fraction=[0.05, 0.15, 0.25, 0.35, 0.45, 0.55])
    joined = join_sweeps(sweep, fp64)
    assert joined["error_removed_vs_fp64"].tolist() == [0.55, 0.45, 0.35, 0.25, 0.15, 0.05]
    assert "error_removed_vs_fp64" not in sweep.columns
    summary = summarise_class_sweep(joined, "RWKV7GroupNorm")
    assert (summary.removed, summary.rank, summary.n_classes) == (0.1, 2, 3)
    assert (summary.top_class, summary.top_removed) == ("Linear", 0.3)
    assert (summary.all_classes_removed, summary.whole_model_removed) == (0.4, 0.9)
    line = summary.describe()  # the one-line summary quotes the fields above
    assert all(figure in line for figure in ("RWKV7GroupNorm", "10.0%", "rank 2 of 3", "Linear", "30.0%"))
    with pytest.raises(ParityKitError, match="not among the swept classes"):
        summarise_class_sweep(joined, "GroupNorm")
    with pytest.raises(ParityKitError, match="context rows"):
        summarise_class_sweep(joined[joined["kind"] == "class"], "Linear")
    with pytest.raises(ParityKitError, match="missing from the fp64 sweep"):
        join_sweeps(sweep, fp64.iloc[1:])


def lvp_table(gn_local: list[float], gn_free: list[float], attn_local: float = 3.0) -> pd.DataFrame:
    """A local-vs-propagated table with floors of 1e-3, so each error is 1e-3 × its floor ratio."""
    rows = [("model.layers.0.attn", attn_local, attn_local + 1)]
    rows += [(f"model.layers.{i}.attn.g_norm", loc, free) for i, (loc, free) in enumerate(zip(gn_local, gn_free))]
    return pd.DataFrame({"module": [r[0] for r in rows], "local_rel_rms": [1e-3 * r[1] for r in rows],
                         "free_rel_rms": [1e-3 * r[2] for r in rows], "floor": [1e-3] * len(rows)})


def test_summarise_local_errors_tells_inherited_from_own_error():
    inherited = summarise_local_errors(lvp_table([1.5, 1.8], [5.0, 6.0]))
    assert inherited.local_floor_ratio == pytest.approx([1.5, 1.8])
    assert inherited.free_floor_ratio == pytest.approx([5.0, 6.0])
    assert inherited.inherited
    assert (inherited.largest_local_module, inherited.largest_local_ratio) == ("model.layers.0.attn", pytest.approx(3.0))
    line = inherited.describe()  # the one-line summary quotes the fields above
    assert all(figure in line for figure in ("1.5-1.8", "model.layers.0.attn", "(3 x)"))
    own = summarise_local_errors(lvp_table([4.0, 5.0], [5.0, 6.0], attn_local=2.0))
    assert not own.inherited and own.largest_local_module == "model.layers.1.attn.g_norm"
    with pytest.raises(ParityKitError, match="no module ending with"):
        summarise_local_errors(lvp_table([], []))
    with pytest.raises(ParityKitError, match="lacks columns"):
        summarise_local_errors(lvp_table([1.0], [2.0]).drop(columns=["floor"]))


class GroupNormNet(nn.Module):
    """Linear → GroupNorm over 2 groups of a large-offset input (bf16-sensitive) → Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 16)
        self.g_norm = nn.GroupNorm(2, 16)
        self.head = nn.Linear(16, 6)
        with torch.no_grad():
            self.g_norm.weight.uniform_(0.5, 1.5)
            self.g_norm.bias.uniform_(-0.3, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.g_norm(self.proj(x)))


def test_groupnorm_fix_variants_lists_the_four_variants_in_order():
    net = GroupNormNet()
    variants = groupnorm_fix_variants(net, net, ["proj", "head"], "bf16")
    assert list(variants) == ["bf16", "bf16 + GroupNorm fp32 (up-cast weights)",
                              "bf16 + GroupNorm fp32 (fp32 master weights)", "bf16 + bisection set fp32 (2 blocks)"]
    assert [v[0] for v in variants.values()] == [[], ["g_norm"], ["g_norm"], ["proj", "head"]]
    assert [v[1] is net for v in variants.values()] == [False, False, True, True]
    with pytest.raises(ParityKitError, match="no nn.GroupNorm"):
        groupnorm_fix_variants(nn.Linear(2, 2), nn.Linear(2, 2), [], "bf16")


def test_measure_variants_runs_each_variant_and_evaluates_inside_it():
    ref = GroupNormNet().eval()
    low = copy.deepcopy(ref).to(torch.bfloat16)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_logits = ref(x)
        plain = low(x.bfloat16())
    seen: list[torch.dtype] = []

    def evaluate(model: nn.Module, label: str) -> LastWordResult:
        seen.append(model.g_norm.weight.dtype)
        with torch.no_grad():  # a real score of the model: the log-softmax of class 0 per row
            ll = torch.log_softmax(model(x.to(model.proj.weight.dtype)).double(), -1)[:, 0]
        return LastWordResult.from_loglikelihoods(ll.tolist(), n_bootstrap=50, label=label)

    reference_eval = evaluate(ref, "fp32")
    seen.clear()
    before = snapshot(low)
    error_low = pk.metrics.rel_rms(ref_logits, plain)
    result = measure_variants(
        low, groupnorm_fix_variants(low, ref, ["g_norm", "head"], "bf16"), x.bfloat16(),
        {"fp32": ref_logits, "fp64": ref_logits.double()}, error_low=error_low, evaluate=evaluate,
        reference_eval=reference_eval, n_bootstrap_paired=50)
    table = result.table
    assert snapshot(low) == before  # every variant restored the bf16 weights
    assert seen == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
    assert table["modules_in_fp32"].tolist() == [0, 1, 1, 2]
    assert table.loc[0, "removed_vs_plain"] == 0 and table.loc[0, "rel_rms_vs_fp32"] == error_low
    assert torch.equal(result.logits["bf16"], plain)
    assert table.loc[3, "removed_vs_plain"] > 0  # GroupNorm and head in fp32 with master weights
    assert table["removed_vs_plain"].tolist() == pytest.approx(
        [1 - pk.metrics.rel_rms(ref_logits, result.logits[v]) / error_low for v in table["variant"]])
    assert table["ppl_minus_ref"].tolist() == pytest.approx(
        [result.evals[v].ppl - reference_eval.ppl for v in table["variant"]])
    assert {"verdict_vs_fp32", "verdict_vs_fp64", "paired_z", "acc", "ppl_stderr"} <= set(table.columns)
    with pytest.raises(ParityKitError, match="reference_logits is empty"):
        measure_variants(low, {}, x, {}, error_low=1.0, evaluate=evaluate, reference_eval=reference_eval)


def bisection(chosen: list[str], n: int, passes: int, error: float, param_fraction: float) -> BisectionResult:
    curve = pd.DataFrame({"step": [0, len(chosen)], "param_fraction": [0.0, param_fraction]})
    return BisectionResult(chosen=chosen, passes=passes, pass_bound=2 + 4 * len(chosen) * 5, n_candidates=n,
                           error_low=3e-3, error_all_high=2e-3, error_chosen=error, target_error=2.5e-3,
                           floor=1.5e-3, metric="rel_rms", low_dtype="bf16", high_dtype="fp32", curve=curve)


def fix_rows(plain_z: float = -0.5, fix_z: float = 0.4, fix_removed: float = 0.25) -> pd.DataFrame:
    labels = ["bf16", "bf16 + GroupNorm fp32 (up-cast weights)", "bf16 + GroupNorm fp32 (fp32 master weights)",
              "bf16 + bisection set fp32 (2 blocks)"]
    return pd.DataFrame({"variant": labels, "rel_rms_vs_fp32": [3e-3, 3e-3, 3e-3 * (1 - fix_removed), 2e-3],
                         "removed_vs_plain": [0.0, 0.0, fix_removed, 1 / 3], "ppl": [4.5, 4.5, 4.25, 4.2],
                         "paired_z": [plain_z, plain_z, fix_z, 0.1]})


def conclude(gn_removed: float = 0.05, gn_rank: int = 3, local: LocalErrorSummary | None = None,
             upcast_change: float = 1e-3, **fix: float) -> tuple[str, dict, GroupNormVerdict]:
    """Story 02's conclusion from constructed measurements, with the judgements it is rendered from."""
    removed = {"RWKV7GroupNorm": gn_removed, "Linear": 0.6 if gn_rank > 1 else gn_removed / 2,
               "LayerNorm": 0.3 if gn_rank > 2 else -0.01}
    sweep = summarise_class_sweep(sweep_table(removed), "RWKV7GroupNorm")
    assert sweep.rank == gn_rank
    logit_table = pd.DataFrame({"rel_rms": [3e-3, 3.1e-3, 2e-7], "floor": [1.5e-3, 1.5e-3, 6e-8],
                                "floor_ratio": [2.0, 2.07, 3.3]})
    local = local or summarise_local_errors(lvp_table([1.5, 1.8], [5.0, 6.0]))
    fix_table = fix_rows(**fix)
    text, figures = conclude_groupnorm_precision(
        model="tiny-rwkv7", dtype="bf16", reference_dtype="fp32", logit_table=logit_table, sweep=sweep,
        local=local, blocks=bisection(["model.norm", "lm_head"], 20, 14, 2.2e-3, 0.125),
        leaves=bisection(["model.norm"], 82, 10, 2.9e-3, 0.001), fix_table=fix_table,
        reference_ppl=4.3, reference_ppl_stderr=0.2, upcast_logits_change=upcast_change)
    return text, figures, judge_groupnorm_precision(sweep, local, fix_table, upcast_change)


def test_conclusion_names_the_groupnorm_role_from_the_sweep():
    assert conclude(gn_removed=0.7, gn_rank=1)[2].role == "main culprit"
    contributor_text, _, contributor = conclude(gn_removed=0.3, gn_rank=2)
    assert contributor.role == "contributor" and "30.0%" in contributor_text and "60.0%" in contributor_text
    _, figures, minor = conclude(gn_removed=0.05, gn_rank=3)
    assert minor.role == "minor"
    # ranking first with less than half of the error is not enough to be the main culprit, nor is half of the
    # error while another class removes more
    assert conclude(gn_removed=0.3, gn_rank=1)[2].role == "contributor"
    assert conclude(gn_removed=0.55, gn_rank=2)[2].role == "contributor"
    assert (figures["groupnorm_error_removed"], figures["groupnorm_class_rank"], figures["n_classes"]) == (0.05, 3, 3)
    assert figures["top_class_error_removed"] == 0.6
    assert figures["class_error_removed"] == {"Linear": 0.6, "LayerNorm": 0.3, "RWKV7GroupNorm": 0.05}
    assert (figures["all_leaf_classes_error_removed"], figures["whole_model_error_removed"]) == (0.4, 0.9)


def test_conclusion_follows_the_local_error_the_bisection_and_the_fix():
    text, figures, verdict = conclude()
    # free-run ratios 5-6 against local 1.5-1.8: the GroupNorm inherits most of its error
    assert verdict.error_origin == "inherited"
    assert all(figure in text for figure in ("5-6x", "1.5-1.8x", "model.layers.0.attn's (3x)"))
    _, _, own = conclude(local=summarise_local_errors(lvp_table([4.0, 5.0], [5.0, 6.0], attn_local=2.0)))
    assert own.error_origin == "own"
    # |paired z| 0.5 and 0.4: neither run is told apart from fp32; 2.5 is
    assert verdict.indistinguishable and not conclude(plain_z=-2.5, fix_z=0.4)[2].indistinguishable
    assert not conclude(plain_z=0.5, fix_z=2.0)[2].indistinguishable  # the fixed run alone is enough
    assert not verdict.upcast_bit_identical and conclude(upcast_change=0.0)[2].upcast_bit_identical
    for figure in ("0.003", "2e-07", "12.5%", "14 passes", "0.0022", "1 of 82", "-25.0%", "4.5000", "4.2500",
                   "4.3000 ± 0.2000", "-0.50 -> 0.40"):
        assert figure in text, figure
    assert figures["groupnorm_local_floor_ratio"] == pytest.approx([1.5, 1.8])
    assert figures["groupnorm_free_floor_ratio"] == pytest.approx([5.0, 6.0])
    assert figures["largest_local_floor_ratio"] == pytest.approx(3.0)
    assert figures["logits_rel_rms_vs_ref"] == 3e-3 and figures["ref_vs_fp64_rel_rms"] == 2e-7
    assert figures["logits_rel_rms_vs_fp64"] == 3.1e-3 and figures["logits_floor"] == 1.5e-3
    assert (figures["bisection_blocks_chosen"], figures["bisection_blocks_candidates"],
            figures["bisection_blocks_passes"], figures["bisection_blocks_error"]) == (2, 20, 14, 2.2e-3)
    assert figures["bisection_blocks_pass_bound"] == 2 + 4 * 2 * 5
    assert (figures["bisection_leaves_chosen"], figures["bisection_leaves_passes"]) == (1, 10)
    assert figures["ppl_by_variant"]["bf16 + GroupNorm fp32 (fp32 master weights)"] == 4.25
    assert figures["paired_z_by_variant"]["bf16"] == -0.5
    assert figures["logits_rel_rms_by_variant"]["bf16 + bisection set fp32 (2 blocks)"] == 2e-3
    assert (figures["ppl_reference"], figures["ppl_reference_stderr"], figures["groupnorm_upcast_logits_change"]) \
        == (4.3, 0.2, 1e-3)
    with pytest.raises(ParityKitError, match="three rows"):
        conclude_groupnorm_precision(
            model="m", dtype="bf16", reference_dtype="fp32", logit_table=pd.DataFrame({"rel_rms": [1.0]}),
            sweep=ClassSweepSummary("G", 0.1, 1, pd.DataFrame({"class": ["G"], "error_removed_fraction": [0.1]}), 0.2, 0.3),
            local=LocalErrorSummary([1.0], [2.0], "m", 1.0), blocks=bisection([], 1, 2, 1.0, 0.0),
            leaves=bisection([], 1, 2, 1.0, 0.0), fix_table=fix_rows(), reference_ppl=1.0, reference_ppl_stderr=0.1,
            upcast_logits_change=0.0)


def test_story_panel_runs_the_precision_exploration():
    import parity_kit as pk
    from parity_kit.stories.groupnorm import explore_precision

    def rerun(p):
        return explore_precision(p["model"], dtype=p["dtype"], reference_dtype=p["ref_dtype"], device=p["device"],
                                 seq_len=p["seq_len"], removed=p["removed"], candidates=p["candidates"])

    panel = pk.ui.story_panel(rerun, model="tiny-rwkv7", dtype="bf16", ref_dtype="fp32", device="cpu",
                              seq_len=16, removed=0.5, candidates="blocks")
    panel.click()
    assert panel.error is None, panel.error
    sweep, _, summary, curve, _ = panel.results
    assert "RWKV7GroupNorm" in set(sweep["class"]) and isinstance(summary, str) and len(curve)
    panel.set(candidates="no.such.module")
    panel.click()
    assert panel.results == [] and "matched no module" in panel.error


def test_conclusion_wording_follows_the_sign_and_size_of_its_figures():
    from parity_kit.stories.wording import ppl_change, removes_text
    from parity_kit.stories.groupnorm_variants import conclude_variants

    assert removes_text(0.286) == "removes 28.6% of" and removes_text(-0.034) == "adds 3.4% to"
    # perplexities equal to 4 decimals are shown with the decimals that tell them apart, equal ones as unchanged
    assert ppl_change(1.008660, 1.008668) == "last-word perplexity from 1.00866 to 1.00867"
    assert ppl_change(4.5, 4.25) == "last-word perplexity from 4.5000 to 4.2500"
    assert ppl_change(1.0, 1.0) == "leaves last-word perplexity at 1.0000"
    s = ClassSweepSummary("GN", -0.034, 7, pd.DataFrame({"class": ["L"], "error_removed_fraction": [0.29]}), .2, .6)
    local = LocalErrorSummary([2.6, 2.7], [5.2, 5.6], "x.attn", 3.4)

    def text(mean_over_std: float, overflow: float) -> str:
        ranges = pd.DataFrame({"max_abs_input": [910.0], "median_mean_over_std": [mean_over_std],
                               "overflow_fraction_bf16": [overflow]})
        return conclude_variants(variant="as converted", correct_variant="native", dtype="bf16",
                                 checks={"all_met": False}, sweep=s, local=local, fix_z=-1.49, correct_sweep=s,
                                 ranges=ranges)

    well, ill = text(0.05, 0.0), text(16.0, 0.25)
    assert "adds 3.4% to the logit error" in well and "centring cancels no bits" in well and "none of the" in well
    assert "16x the spread" in ill and "about 4.0 bits" in ill and "25.0%-25.0% of" in ill
