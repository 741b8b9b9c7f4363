from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import build_tiny_llama, hook_counts
from torch import nn

import parity_kit as pk
from parity_kit.errors import ParityKitError
from parity_kit.precision import BisectionResult, run_in_dtype


class NaiveNorm(nn.Module):
    """Normalisation with the textbook variance E[x²] − E[x]²: over a near-constant input the two terms
    nearly cancel, so in bf16 the variance is mostly rounding error (a planted precision culprit)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = (x * x).mean(-1, keepdim=True) - mean * mean
        return (x - mean) * torch.rsqrt(var.clamp_min(1e-5)) * self.weight


def build_sensitive(culprits: tuple[int, ...] = (3,), blocks: int = 6, d: int = 32) -> nn.Sequential:
    """Linear → [Linear → norm → GELU] × blocks → Linear; block i in ``culprits`` feeds a NaiveNorm a
    near-constant input (bias 40, small spread), the others use LayerNorm on well-scaled inputs."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(16, d)]
    for i in range(blocks):
        lin = nn.Linear(d, d)
        if i in culprits:
            with torch.no_grad():
                lin.bias.fill_(40.0)
                lin.weight.mul_(4.0)
        layers += [lin, NaiveNorm(d) if i in culprits else nn.LayerNorm(d), nn.GELU()]
    layers.append(nn.Linear(d, 8))
    return nn.Sequential(*layers).eval()


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
    with pytest.raises(ParityKitError, match="cannot be minimised"):
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
