"""Adversarial inputs and planted faults against the public API: each case must raise a ParityKitError whose
message names the problem (or return an explicit status), and leave no hook, wrapper or global hook behind.

Cases are small functions of a shared :class:`World` (tiny models built from configs, recordings, a temporary
folder); :func:`test_case` runs each one between two leak checks (:func:`parity_kit.testing.hook_counts` of every
model of the world, which includes torch's process-wide hooks).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pandas as pd
import pytest
import torch
from torch import nn

import parity_kit as pk
from parity_kit import testing
from parity_kit.errors import ParityKitError
from parity_kit.recording import Call, Recording, TensorStats

DATA = Path(__file__).resolve().parents[1] / "parity_kit" / "data" / "models"


class World:
    """What the cases share: built once per module (models from configs, a few recordings, a scratch folder)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.llama = testing.tiny_llama(layers=1)
        self.other = testing.tiny_llama(seed=1, layers=1)
        self.mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
        self.ids = torch.tensor([[1, 5, 9, 13]])
        with pk.record(self.llama, "*") as self.rec:
            self.llama(self.ids)
        with pk.record(self.other, "*") as self.rec_other:
            self.other(self.ids)
        with pk.record(self.llama, "*", mode="stats") as self.stats:
            self.llama(self.ids)
        self.table = pk.compare(self.rec, self.rec_other)
        self._n = 0

    def models(self) -> list[nn.Module]:
        return [self.llama, self.other, self.mlp]

    def path(self, name: str = "p") -> Path:
        self._n += 1
        return self.tmp / f"{self._n}-{name}"

    def small_rec(self, value: float = 1.0) -> Recording:
        return Recording("tensors", [Call("m", 0, 0, {"output": torch.full((2, 3), value)})])

    def model_copy(self, name: str, edit: Callable[[dict], None] | None = None) -> Path:
        dst = self.path(name)
        shutil.copytree(DATA / name, dst)
        if edit is not None:
            cfg = json.loads((dst / "config.json").read_text())
            edit(cfg)
            (dst / "config.json").write_text(json.dumps(cfg))
        return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("bad_inputs"))


def leak_state(w: World) -> list[dict[str, tuple[int, int, int, int]]]:
    return [testing.hook_counts(m) for m in w.models()]


# ------------------------------------------------------------------ the cases
# Each case: (id, function of the world, regex the ParityKitError message must match). A function that returns
# instead of raising fails the case.
CASES: list[tuple[str, Callable[[World], Any], str]] = []


def case(match: str, name: str | None = None) -> Callable[[Callable[[World], Any]], Callable[[World], Any]]:
    def register(fn: Callable[[World], Any]) -> Callable[[World], Any]:
        CASES.append((name or fn.__name__, fn, match))
        return fn
    return register


def _enter(cm: Any) -> Any:
    with cm:
        pass


def _record_forward(w: World, *args: Any, **kwargs: Any) -> Recording:
    with pk.record(w.llama, *args, **kwargs) as rec:
        w.llama(w.ids)
    return rec


# --- record() and select_modules
@case("model|Module|str")
def record_a_string(w):
    _enter(pk.record("gpt2"))


@case("model|Module|None")
def record_none(w):
    _enter(pk.record(None))


@case("mode")
def record_unknown_mode(w):
    _enter(pk.record(w.llama, mode="everything"))


@case("nope|close names|matched no")
def record_pattern_matches_nothing(w):
    _enter(pk.record(w.llama, "nope.*"))


@case("dtype")
def record_integer_dtype(w):
    _enter(pk.record(w.llama, dtype=torch.int32))


@case("dtype|fp33")
def record_unknown_dtype(w):
    _enter(pk.record(w.llama, dtype="fp33"))


@case("CUDA|cuda")
def record_cuda_absent(w):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    _enter(pk.record(w.llama, device="cuda"))


@case("memory_budget")
def record_bad_budget(w):
    _enter(pk.record(w.llama, memory_budget="lots"))


@case("memory_budget")
def record_negative_budget(w):
    _enter(pk.record(w.llama, memory_budget=-1))


@case("memory_budget")
def record_budget_exceeded(w):
    _record_forward(w, memory_budget=16)


@case("stats_batch")
def record_bad_stats_batch(w):
    _enter(pk.record(w.llama, mode="stats", stats_batch="often"))


@case("copy_batch")
def record_bad_copy_batch(w):
    _enter(pk.record(w.llama, copy_batch=[1]))


@case("save_to|exists|not a parity_kit recording")
def record_save_to_a_file(w):
    f = w.path("file")
    f.write_text("x")
    _record_forward(w, save_to=f)


@case("below|is a file|not a folder")
def record_save_to_below_a_file(w):
    f = w.path("file")
    f.write_text("x")
    _record_forward(w, save_to=f / "rec")


@case("modules")
def select_modules_bad_type(w):
    pk.select_modules(w.llama, 42)


@case("re:|regex|regular expression")
def select_modules_bad_regex(w):
    pk.select_modules(w.llama, "re:[")


@case("model|Module")
def select_modules_of_a_string(w):
    pk.select_modules("gpt2")


@case("rec.calls|block|inside")
def calls_inside_batched_stats_block(w):
    with pk.record(w.llama, "*", mode="stats", stats_batch="1GiB") as rec:
        w.llama(w.ids)
        [c.module for c in rec.calls]


# --- Recording, Call, save and load
@case("mode")
def recording_bad_mode(w):
    Recording("both")


@case("not in this recording|close names")
def recording_unknown_module(w):
    w.rec["model.layers.9.mlp"]


@case("exists and is not a parity_kit recording")
def save_over_a_file(w):
    f = w.path("file")
    f.write_text("x")
    w.small_rec().save(f)


@case("exists and is not a parity_kit recording")
def save_over_a_full_folder(w):
    d = w.path("dir")
    d.mkdir()
    (d / "other.txt").write_text("x")
    w.small_rec().save(d)


@case("is a file|not a folder|below")
def save_below_a_file(w):
    f = w.path("file")
    f.write_text("x")
    w.small_rec().save(f / "sub" / "rec")


@case("ermission|writable")
def save_into_unwritable_folder(w):
    def refuse(*_: Any, **__: Any) -> str:
        raise PermissionError(13, "Permission denied")

    with mock.patch.object(tempfile, "mkdtemp", refuse):
        w.small_rec().save(w.path("ro"))


@case("index.json|No space")
def save_index_write_fails(w):
    real = pathlib.Path.write_text

    def full(self: Path, *a: Any, **k: Any) -> int:
        if self.name == "index.json":
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    target = w.path("idx")
    try:
        with mock.patch.object(pathlib.Path, "write_text", full):
            w.small_rec().save(target)
    finally:
        assert not target.exists()
        assert not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]


@case("complex|dtype")
def save_complex_tensor(w):
    Recording("tensors", [Call("m", 0, 0, {"output": torch.ones(2, dtype=torch.complex64)})]).save(w.path())


@case("not a parity_kit recording")
def load_missing_folder(w):
    Recording.load(w.path("absent"))


@case("corrupted|truncated")
def load_truncated_index(w):
    p = w.small_rec().save(w.path())
    text = (p / "index.json").read_text()
    (p / "index.json").write_text(text[: len(text) // 2])
    Recording.load(p)


@case("truncated|corrupted")
def load_truncated_tensors(w):
    p = w.small_rec().save(w.path())
    data = (p / "tensors.safetensors").read_bytes()
    (p / "tensors.safetensors").write_bytes(data[:-4])
    Recording.load(p)


@case("checksum")
def load_flipped_tensor_byte(w):
    p = w.small_rec().save(w.path())
    data = bytearray((p / "tensors.safetensors").read_bytes())
    data[-2] ^= 0x10
    (p / "tensors.safetensors").write_bytes(bytes(data))
    Recording.load(p)


@case("index.json|checksum|corrupted")
def load_stats_with_flipped_digit(w):
    p = w.stats.save(w.path())
    index = json.loads((p / "index.json").read_text())
    leaf = index["calls"][0]["leaves"]["output"]
    leaf["rms"] = leaf["rms"] * 1.5
    (p / "index.json").write_text(json.dumps(index))
    Recording.load(p)


@case("index.json|checksum|corrupted")
def load_index_with_edited_shape(w):
    p = w.stats.save(w.path())
    index = json.loads((p / "index.json").read_text())
    index["calls"][0]["leaves"]["output"]["shape"][0] += 1
    (p / "index.json").write_text(json.dumps(index))
    Recording.load(p)


@case("version")
def load_future_version(w):
    p = w.small_rec().save(w.path())
    index = json.loads((p / "index.json").read_text())
    index["version"] = 99
    (p / "index.json").write_text(json.dumps(index))
    Recording.load(p)


@case("not a parity_kit recording index")
def load_foreign_json(w):
    d = w.path()
    d.mkdir()
    (d / "index.json").write_text("[1, 2]")
    Recording.load(d)


@case("lacks tensors.safetensors|incomplete")
def load_without_tensor_file(w):
    p = w.small_rec().save(w.path())
    (p / "tensors.safetensors").unlink()
    Recording.load(p)


@case("corrupted|truncated")
def load_non_utf8_index(w):
    p = w.small_rec().save(w.path())
    (p / "index.json").write_bytes(b"\xff\xfe\x00garbage")
    Recording.load(p)


# --- compare and the queries
@case("Recording|reference")
def compare_a_table(w):
    pk.compare(w.table, w.rec)


@case("stats|tensors")
def compare_stats_recordings(w):
    pk.compare(w.stats, w.stats)


@case("empty|no call")
def compare_two_empty_recordings(w):
    pk.compare(Recording("tensors"), Recording("tensors"))


@case("empty|no call|reference")
def compare_empty_reference(w):
    pk.compare(Recording("tensors"), w.rec)


@case("mapping")
def compare_bad_mapping(w):
    pk.compare(w.rec, w.rec_other, mapping=42)


@case("chunk_bytes")
def compare_bad_chunk(w):
    pk.compare(w.rec, w.rec_other, chunk_bytes="big")


@case("CUDA|cuda")
def compare_on_absent_cuda(w):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    pk.compare(w.rec, w.rec_other, device="cuda")


@case("strict|not comparable")
def compare_strict_with_missing(w):
    pk.compare(w.rec, w.small_rec(), strict=True)


@case("tensors")
def compare_bad_tensors_selector(w):
    pk.compare(w.rec, w.rec_other, tensors="everything")


@case("floor_tolerance")
def compare_negative_tolerance(w):
    pk.compare(w.rec, w.rec_other, floor_tolerance=-1)


@case("floor_tolerance")
def compare_nan_tolerance(w):
    pk.compare(w.rec, w.rec_other, floor_tolerance=float("nan"))


@case("empty|no row")
def first_divergence_empty_table(w):
    pk.first_divergence(w.table.iloc[:0])


@case("no row|comparable|mapping")
def first_divergence_nothing_comparable(w):
    table = pk.compare(w.rec, w.small_rec())
    pk.first_divergence(table)


@case("threshold")
def first_divergence_threshold_none(w):
    pk.first_divergence(w.table, threshold=None)


@case("threshold")
def first_divergence_threshold_nan(w):
    pk.first_divergence(w.table, threshold=float("nan"))


@case("threshold")
def first_divergence_threshold_string(w):
    pk.first_divergence(w.table, threshold="1e-2")


@case("metric")
def first_divergence_unknown_metric(w):
    pk.first_divergence(w.table, metric="accuracy")


@case("diagnosis")
def first_divergence_unknown_diagnosis(w):
    pk.first_divergence(w.table, diagnosis="bad")


@case("diagnosis|judge")
def first_divergence_unjudged_diagnosis(w):
    pk.first_divergence(w.table, diagnosis="own error above floor")


@case("DataFrame|table")
def first_divergence_of_a_recording(w):
    pk.first_divergence(w.rec)


@case("Recording|table")
def first_nonfinite_of_a_list(w):
    pk.first_nonfinite([1, 2])


@case("nonfinite|table|compare")
def first_nonfinite_foreign_table(w):
    pk.first_nonfinite(pd.DataFrame({"a": [1]}))


@case("metric")
def per_token_error_bad_metric(w):
    pk.per_token_error(w.rec, w.rec_other, metric="sqnr")


@case("stats|tensors")
def per_token_error_stats(w):
    pk.per_token_error(w.stats, w.rec)


@case("empty|no call|no module|nothing")
def per_token_error_empty(w):
    pk.per_token_error(Recording("tensors"), Recording("tensors"))


@case("placeholder")
def mapping_unknown_placeholder(w):
    mapping = pk.ModuleMapping([("model.layers.{i}.mlp", "model.layers.{j}.mlp")])
    pk.compare(w.rec, w.rec_other, mapping=mapping)


@case("Floor|dtype|floor")
def apply_floor_not_a_floor(w):
    pk.apply_floor(w.table, floor="fp32")


@case("table|column|status")
def run_verdict_foreign_table(w):
    pk.run_verdict(pd.DataFrame({"a": [1]}))


@case("table|column")
def culprits_foreign_table(w):
    pk.culprits(pd.DataFrame({"a": [1]}))


# --- analyses
@case("vocab|out of range|outside")
def lockstep_ids_outside_vocabulary(w):
    pk.lockstep_greedy(w.llama, w.other, torch.tensor([[1, 2, 999]]), max_new_tokens=2, progress=False)


@case("vocab|out of range|outside|negative")
def lockstep_negative_ids(w):
    pk.lockstep_greedy(w.llama, w.other, [1, -3], max_new_tokens=2, progress=False)


@case("vocab|out of range|outside")
def teacher_forced_ids_outside_vocabulary(w):
    pk.teacher_forced(w.llama, w.other, torch.tensor([[1, 2, 999]]))


@case("empty|no tokens")
def lockstep_empty_prompt(w):
    pk.lockstep_greedy(w.llama, w.other, [], max_new_tokens=2, progress=False)


@case("tokenizer")
def lockstep_string_without_tokenizer(w):
    pk.lockstep_greedy(w.llama, w.other, "hello", max_new_tokens=2, progress=False)


@case("max_new_tokens")
def lockstep_negative_new_tokens(w):
    pk.lockstep_greedy(w.llama, w.other, [1, 2], max_new_tokens=-1, progress=False)


@case("float|integer|ids|token")
def lockstep_float_ids(w):
    pk.lockstep_greedy(w.llama, w.other, torch.tensor([[1.5, 2.0]]), max_new_tokens=2, progress=False)


@case("vocab|out of range|outside")
def compare_models_ids_outside_vocabulary(w):
    pk.compare_models(w.llama, w.other, torch.tensor([[1, 2, 999]]), show_progress=False)


@case("dtype")
def calibrate_floor_bad_dtype(w):
    pk.calibrate_floor(w.llama, w.ids, ("fp32", "fp7"))


@case("dtype")
def rounding_only_bad_dtype(w):
    _enter(pk.rounding_only(w.llama, "int8"))


@case("dtype")
def run_in_dtype_bad_dtype(w):
    _enter(pk.run_in_dtype(w.llama, "*", "fp9"))


@case("nope|matched no|close names")
def run_in_dtype_no_match(w):
    _enter(pk.run_in_dtype(w.llama, "nope", "bf16"))


@case("nope|matched no|close names")
def local_vs_propagated_no_match(w):
    pk.local_vs_propagated(w.llama, w.other, w.ids, modules="nope")


@case("UTF-8|utf-8|encoding")
def lastword_non_utf8_file(w):
    p = w.path("bad.jsonl")
    p.write_bytes(b'{"context": "a \xff\xfe b", "target": " c"}\n')
    pk.evaluation.load_lastword_items(p)


@case("JSON|line 1|:1")
def lastword_bad_json(w):
    p = w.path("bad.jsonl")
    p.write_text("{not json}\n")
    pk.evaluation.load_lastword_items(p)


@case("empty|no items")
def lastword_empty_file(w):
    p = w.path("empty.jsonl")
    p.write_text("\n\n")
    pk.evaluation.load_lastword_items(p)


@case("does not exist")
def lastword_missing_file(w):
    pk.evaluation.load_lastword_items(w.path("none.jsonl"))


@case("limit")
def lastword_zero_limit(w):
    pk.evaluation.load_lastword_items([{"context": "a", "target": " b"}], limit=0)


@case("context|target")
def lastword_item_missing_target(w):
    pk.evaluation.load_lastword_items([{"context": "a"}])


@case("LastWordResult|result")
def paired_comparison_of_tables(w):
    pk.paired_comparison(w.table, w.table)


# --- models
@case("does not exist|unknown|built-in")
def models_load_unknown_name(w):
    pk.models.load("no-such-model")


@case("config.json")
def models_load_folder_without_config(w):
    d = w.path("nocfg")
    d.mkdir()
    pk.models.load(d)


@case("hidden_size")
def models_load_wrong_field_type(w):
    pk.models.load(w.model_copy("tiny-internlm2-llama", lambda c: c.update(hidden_size="big")))


@case("hidden_size|match|shape|mismatch")
def models_load_mismatched_weights(w):
    pk.models.load(w.model_copy("tiny-internlm2-llama", lambda c: c.update(hidden_size=c["hidden_size"] * 2)))


@case("model.safetensors|corrupt|damaged")
def models_load_corrupted_safetensors(w):
    d = w.model_copy("tiny-internlm2-llama")
    data = bytearray((d / "model.safetensors").read_bytes())
    data[10:30] = b"x" * 20
    (d / "model.safetensors").write_bytes(bytes(data))
    pk.models.load(d)


@case("model.safetensors|corrupt|damaged|truncated")
def models_load_truncated_safetensors(w):
    d = w.model_copy("tiny-internlm2-llama")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    pk.models.load(d)


@case("config.json|JSON")
def models_load_broken_config_json(w):
    d = w.model_copy("tiny-internlm2-llama")
    (d / "config.json").write_text("{")
    pk.models.load(d)


@case("dtype")
def models_load_bad_dtype(w):
    pk.models.load("tiny-internlm2-llama", dtype="fp12")


@case("num_attention_heads")
def convert_zero_heads(w):
    from parity_kit.models.convert import convert_internlm2_to_llama

    src = w.model_copy("tiny-internlm2", lambda c: c.update(num_attention_heads=0))
    convert_internlm2_to_llama(src, w.path("out"))


@case("num_key_value_heads")
def convert_string_kv_heads(w):
    from parity_kit.models.convert import convert_internlm2_to_llama

    src = w.model_copy("tiny-internlm2", lambda c: c.update(num_key_value_heads="two"))
    convert_internlm2_to_llama(src, w.path("out"))


@case("hidden_size")
def convert_negative_hidden(w):
    from parity_kit.models.convert import convert_internlm2_to_llama

    src = w.model_copy("tiny-internlm2", lambda c: c.update(hidden_size=-128))
    convert_internlm2_to_llama(src, w.path("out"))


@case("not a folder|does not exist")
def convert_missing_source(w):
    from parity_kit.models.convert import convert_internlm2_to_llama

    convert_internlm2_to_llama(w.path("absent"), w.path("out"))


# --- dtypes, metrics, reports
@case("fp33|dtype")
def parse_unknown_dtype(w):
    from parity_kit.dtypes import parse_dtype

    parse_dtype("fp33")


@case("shape")
def metric_shape_mismatch(w):
    pk.metrics.rel_rms(torch.ones(3), torch.ones(4))


@case("tolerance")
def verdict_negative_tolerance(w):
    pk.metrics.verdict(1e-3, 1e-4, tolerance=-1)


@case("conclusion")
def write_findings_empty_conclusion(w):
    pk.write_findings("nb", {}, "", {"x": 1}, reports_dir=w.path())


@case("figure")
def write_findings_tensor_figure(w):
    pk.write_findings("nb", {}, "it works", {"x": torch.ones(3, dtype=torch.complex64)}, reports_dir=w.path())


@case("is a file|not a folder|reports_dir|below")
def write_findings_below_a_file(w):
    f = w.path("file")
    f.write_text("x")
    pk.write_findings("nb", {}, "it works", {"x": 1}, reports_dir=f / "sub")


@case("no findings file")
def read_findings_missing(w):
    pk.read_findings(w.path("none.json"))


@case("not a valid findings file")
def read_findings_broken(w):
    p = w.path("f.json")
    p.write_bytes(b"\xff{")
    pk.read_findings(p)


@case("no notebook")
def export_html_missing(w):
    pk.export_html(w.path("none.ipynb"), w.path("out.html"))


@case("capsule|Mapping|dict")
def diff_capsules_not_mappings(w):
    pk.diff_capsules("a", "b")


# --- written after the first round of fixes (the report counts them apart)
@case("vocab")
def compare_live_ids_outside_vocabulary(w):
    pk.compare_live(w.llama, w.other, torch.tensor([[1, 999]]))


@case("window")
def compare_live_zero_window(w):
    pk.compare_live(w.llama, w.other, w.ids, window=0)


@case("metric")
def sweep_by_class_bad_metric(w):
    pk.sweep_by_class(w.llama, w.other, w.ids, metric="accuracy", progress=False)


@case("prompts")
def divergence_statistics_no_prompts(w):
    pk.divergence_statistics({"a": (w.llama, w.other)}, [], None, max_new_tokens=2, progress=False)


@case("pairs")
def divergence_statistics_bad_pairs(w):
    pk.divergence_statistics(42, [[1, 2]], None, max_new_tokens=2, progress=False)


@case("batch_size")
def evaluate_lastword_zero_batch(w):
    pk.evaluate_lastword(w.llama, None, [{"context": "a", "target": " b"}], batch_size=0, progress=False)


@case("pipelines")
def token_provenance_no_pipelines(w):
    pk.token_provenance("hello", {})


@case("fp9|dtype")
def floor_bad_dtype(w):
    pk.Floor(("fp32", "fp9"))


@case("keyed_by")
def floor_bad_keyed_by(w):
    pk.Floor(("fp32", "bf16"), keyed_by="nobody")


@case("Tensor")
def tensor_stats_of_a_string(w):
    pk.TensorStats.of("x")


@case("vocab")
def local_vs_propagated_ids_outside_vocabulary(w):
    pk.local_vs_propagated(w.llama, w.other, torch.tensor([[1, 999]]))


@case("Module|str")
def rounding_only_of_a_string(w):
    _enter(pk.rounding_only("gpt2", "bf16"))


@case("no token")
def calibrate_floor_empty_ids(w):
    pk.calibrate_floor(w.llama, torch.tensor([[]], dtype=torch.long), ("fp32", "bf16"))


@case("notebook name")
def write_findings_bad_notebook_name(w):
    pk.write_findings("../x", {}, "it works", {"a": 1}, reports_dir=w.path())


@case("master_weights")
def run_in_dtype_bad_master(w):
    _enter(pk.run_in_dtype(w.llama, "*", "bf16", master_weights="x"))


@case("nn.Module|reference model")
def compare_models_of_a_string(w):
    pk.compare_models("gpt2", w.other, w.ids, show_progress=False)


@case("call 5|call=")
def per_token_error_absent_call(w):
    pk.per_token_error(w.rec, w.rec_other, call=5)


@pytest.mark.parametrize("fn,match", [pytest.param(fn, match, id=name) for name, fn, match in CASES])
def test_case(world: World, fn: Callable[[World], Any], match: str) -> None:
    before = leak_state(world)
    try:
        with pytest.raises(ParityKitError) as caught:
            fn(world)
        assert caught.match(match), f"the message does not name the problem: {caught.value}"
    finally:
        assert leak_state(world) == before, "a hook or forward wrapper was left behind"


def test_the_suite_is_large_enough() -> None:
    assert len(CASES) >= 80, len(CASES)
    assert len({name for name, _, _ in CASES}) == len(CASES)


# ------------------------------------------------------------------ interrupted recordings
class _Planted(RuntimeError):
    pass


def _interrupted(w: World, mode: str = "tensors", **kwargs: Any) -> Recording:
    """A recording of ``w.llama`` whose forward raises inside its MLP (a planted fault)."""
    def fail(*_: Any) -> None:
        raise _Planted("planted fault in the MLP")

    before = leak_state(w)
    handle = w.llama.model.layers[0].mlp.register_forward_hook(fail)
    try:
        with pytest.raises(_Planted):  # the block's own exception reaches the caller, unchanged
            with pk.record(w.llama, "*", mode=mode, **kwargs) as rec:
                w.llama(w.ids)
    finally:
        handle.remove()
    assert leak_state(w) == before
    return rec


def test_a_complete_recording_says_so(world: World) -> None:
    assert world.rec.metadata["complete"] is True and "interrupted" not in world.rec.metadata


def test_an_interrupted_recording_is_marked_incomplete(world: World) -> None:
    rec = _interrupted(world)
    assert rec.metadata["complete"] is False
    assert "_Planted: planted fault in the MLP" in rec.metadata["interrupted"]
    assert "model.layers.0.mlp" not in rec and "model.layers.0.mlp.down_proj" in rec  # stopped part-way
    back = Recording.load(rec.save(world.path()))
    assert back.metadata["complete"] is False


def test_compare_marks_the_rows_of_an_interrupted_run(world: World) -> None:
    rec = _interrupted(world)
    table = pk.compare(world.rec, rec)
    assert "ok" not in set(table["status"])
    assert (table["status"] == "incomplete candidate").sum() == sum(len(c.outputs) for c in rec.calls)
    assert set(pk.compare(rec, world.rec)["status"]) >= {"incomplete reference"}
    assert set(pk.compare(rec, rec)["status"]) == {"incomplete runs"}
    both = table[table["status"] == "incomplete candidate"]
    assert both["rel_rms"].notna().all()  # the metrics are still there to look at
    with pytest.raises(ParityKitError, match="not comparable"):
        pk.compare(world.rec, rec, strict=True)
    with pytest.raises(ParityKitError, match="incomplete candidate.*block raised"):
        pk.first_divergence(table)


def test_a_recording_of_an_earlier_version_counts_as_complete(world: World) -> None:
    older = Recording("tensors", world.rec.calls, {k: v for k, v in world.rec.metadata.items() if k != "complete"})
    assert set(pk.compare(older, world.rec)["status"]) == {"ok"}


@pytest.mark.parametrize("batch", ["auto", "1GiB", 0])
def test_an_interrupted_stats_recording_is_readable_and_saves(world: World, batch: Any) -> None:
    rec = _interrupted(world, "stats", stats_batch=batch)
    assert rec.metadata["complete"] is False
    names = [c.module for c in rec.calls]
    assert "model.layers.0.mlp.down_proj" in names
    back = Recording.load(rec.save(world.path()))
    assert [c.module for c in back.calls] == names and back.metadata["complete"] is False
