"""Story 02's variants on the built-in tiny-rwkv7: the "as converted" GroupNorm, the correct model, the input range
figures and the targets' judgement."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import parity_kit as pk
from parity_kit.analyses.evaluation import LastWordResult, load_lastword_items
from parity_kit._util.paths import data_dir
from parity_kit.errors import ParityKitError
from parity_kit.stories.groupnorm import ClassSweepSummary, LocalErrorSummary, held_out_input_ids, summarise_class_sweep
from parity_kit.stories.groupnorm_variants import (TARGETS, acceptance, fix_paired_z, groupnorm_input_range,
                                                   load_variant)


@pytest.fixture(scope="module")
def setting():
    ref, tokenizer = pk.models.load("tiny-rwkv7", dtype="fp32")
    ids = held_out_input_ids(load_lastword_items(data_dir() / "eval" / "lastword.jsonl"), tokenizer, skip=150,
                             seq_len=128)
    return ref, {"input_ids": torch.tensor([ids]), "use_cache": False}


def gn_sweep(model, ref, inputs) -> ClassSweepSummary:
    sweep = pk.sweep_by_class(model, ref, inputs, master_model=ref, progress=False)
    return summarise_class_sweep(sweep, "RWKV7GroupNorm")


def test_input_range_explains_where_a_written_out_norm_overflows(setting):
    ref, inputs = setting
    ranges = groupnorm_input_range(ref, inputs)
    assert len(ranges) == ref.config.num_hidden_layers
    # bf16 has fp32's range: nothing overflows; fp16's largest number is 65504 and the inputs exceed its square root
    assert (ranges["overflow_fraction_bf16"] == 0).all()
    assert (ranges["max_abs_input"] > 65504 ** 0.5).any() and (ranges["overflow_fraction_fp16"] > 0).any()
    assert (ranges["median_mean_over_std"] < 1).all()  # centring is well conditioned on this model


def test_as_converted_groupnorm_is_the_culprit_in_fp16(setting):
    ref, inputs = setting
    converted, _ = load_variant("tiny-rwkv7", "as converted", "fp16")
    native, _ = load_variant("tiny-rwkv7", "native", "fp16")
    with torch.no_grad():
        reference = ref(**inputs).logits
        err_converted = pk.metrics.rel_rms(reference, converted(**inputs).logits)
        err_native = pk.metrics.rel_rms(reference, native(**inputs).logits)
    assert err_converted > 10 * err_native
    summary = gn_sweep(converted, ref, inputs)
    assert summary.rank == 1 and summary.removed >= TARGETS["removed"]


def test_correct_model_groupnorm_is_not_the_culprit_in_bf16(setting):
    ref, inputs = setting
    native, _ = load_variant("tiny-rwkv7", "native", "bf16")
    assert gn_sweep(native, ref, inputs).removed < TARGETS["correct_removed"]


def summaries(removed=0.6, rank=1, local=(3.5, 4.0), correct=0.02):
    rows = pd.DataFrame({"class": ["GN"], "error_removed_fraction": [removed]})
    return (ClassSweepSummary("GN", removed, rank, rows, 0.7, 0.9), LocalErrorSummary(list(local), [5.0, 6.0], "x", 4.0),
            ClassSweepSummary("GN", correct, 3, rows, 0.5, 0.9))


@pytest.mark.parametrize("change, failing", [
    ({}, None),
    ({"removed": 0.49}, "groupnorm_removes_half"),
    ({"rank": 2}, "groupnorm_ranks_first"),
    ({"local": (2.99, 4.0)}, "g_norm_own_error_3x_floor"),
    ({"correct": 0.10}, "correct_variant_groupnorm_below_10pct"),
    ({"leaves": ["model.layers.1.attn.o_proj"]}, "bisection_keeps_g_norm"),
    ({"z": 1.9}, "fix_moves_ppl_toward_reference_z2"),
    ({"ppl_fixed": 5.5}, "fix_moves_ppl_toward_reference_z2"),
])
def test_acceptance_judges_each_target_at_its_threshold(change, failing):
    sweep, local, correct = summaries(**{k: v for k, v in change.items() if k in ("removed", "rank", "local", "correct")})
    checks = acceptance(sweep=sweep, local=local, leaves_chosen=change.get("leaves", ["model.layers.0.attn.g_norm"]),
                        ppl_plain=5.2, ppl_fixed=change.get("ppl_fixed", 5.05), ppl_reference=5.0,
                        fix_z=change.get("z", 2.0), correct_sweep=correct)
    failed = [name for name, ok in checks.items() if not ok and name != "all_met"]
    assert failed == ([] if failing is None else [failing])
    assert checks["all_met"] is (failing is None)


def test_fix_paired_z_needs_both_runs():
    a = LastWordResult.from_loglikelihoods([-1.0, -2.0, -1.5], n_bootstrap=10, label="a")
    with pytest.raises(ParityKitError, match="no evaluation named"):
        fix_paired_z({"a": a}, "a", "b", n_bootstrap=10)
