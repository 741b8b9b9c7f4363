"""The two-run flow behind the bug-report template, the template itself run headless by papermill, and
``parity-kit report`` end to end — all on a real tiny Llama checkpoint folder written by the test."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from parity_kit import Recording
from parity_kit._util.paths import data_dir, notebooks_dir
from parity_kit.analyses.runs import (
    FROM_CONFIG_LLAMA,
    RunSpec,
    auto_mapping,
    compare_runs,
    summarise,
)
from parity_kit.app.report_command import parse_cli_value
from parity_kit.errors import ParityKitError
from parity_kit.models import builtin_path
from parity_kit.present.report import read_findings
from parity_kit.stories.bug_report import comparison_plots

SCRIPT = Path(sys.executable).parent / "parity-kit"
TEMPLATE = notebooks_dir() / "05_bug_report.ipynb"


def _save_llama(folder: Path, *, add_bos: bool = True, poison: bool = False) -> Path:
    """A 2-layer Llama with the project's tokenizer; ``poison`` puts an Inf in layer 1's MLP weights."""
    tokenizer = AutoTokenizer.from_pretrained(data_dir() / "tokenizer")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = LlamaForCausalLM(config)
    if poison:
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if not add_bos:  # BOS is added by the fast tokenizer's post-processor; a pipeline without it
        spec = json.loads((folder / "tokenizer.json").read_text())
        spec["post_processor"] = None
        (folder / "tokenizer.json").write_text(json.dumps(spec))
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg["add_bos_token"] = False
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return _save_llama(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


PROMPT = "User: who are you\nAssistant:"
LAYERS = ["model.layers.0", "model.layers.1", "lm_head"]


def test_same_run_twice_is_exactly_equal(llama_dir):
    result = compare_runs(RunSpec(str(llama_dir)), RunSpec(str(llama_dir)), prompt=PROMPT, show_progress=False)
    ok = result.table[result.table["status"] == "ok"]
    assert len(ok) > 10 and (ok["rel_rms"] == 0).all()
    assert result.summary.first is None and result.summary.n_within == result.summary.n_modules
    assert result.provenance is None and result.input_ids["reference"][0] == 0, "the tokenizer adds BOS"
    assert result.figures()["first_divergence_order"] is None and result.figures()["max_rel_rms"] == 0


def test_bf16_candidate_is_measured_against_the_floor_and_recordings_round_trip(llama_dir, tmp_path):
    steps = []
    result = compare_runs(RunSpec(str(llama_dir)), RunSpec(str(llama_dir), "bf16"), prompt=PROMPT, modules=LAYERS,
                          threshold=1e-6, progress=lambda f, m: steps.append((f, m)))
    ok = result.table[result.table["status"] == "ok"]
    assert (ok["cand_dtype"] == "bf16").all() and (ok["rel_rms"] > 0).all() and (ok["floor"] > 0).all()
    assert (ok["floor_kind"] == "calibrated").all() and (ok["floor"] >= ok["rounding_floor"]).all()
    assert result.summary.verdict == "healthy" and result.floor is not None and result.culprits().empty
    assert result.figures()["n_modules_consistent"] == result.summary.n_modules
    assert result.summary.first["module"] == "model.layers.0", "threshold 1e-6 is crossed at the first module"
    assert [f for f, _ in steps] == sorted(f for f, _ in steps) and steps[-1][0] == 1.0
    assert result.per_token.shape == (3, len(result.input_ids["reference"]))
    figures = result.figures()
    assert figures["max_rel_rms"] == pytest.approx(ok["rel_rms"].max())
    assert figures["first_divergence_order"] == int(ok.iloc[0]["order"])
    assert len(comparison_plots(result)) == 2

    ref_path, cand_path = result.save_recordings(tmp_path, "05_bug_report")
    assert ref_path == tmp_path / "05_bug_report.recordings" / "reference"
    back = Recording.load(cand_path)
    assert back.names == result.cand_rec.names
    assert torch.equal(back["lm_head"][0].output, result.cand_rec["lm_head"][0].output)


def test_different_tokenizers_show_token_provenance(llama_dir, tmp_path):
    no_bos = _save_llama(tmp_path / "no-bos", add_bos=False)
    result = compare_runs(RunSpec(str(llama_dir)), RunSpec(str(no_bos)), prompt=PROMPT, show_progress=False)
    assert result.provenance is not None and result.provenance.first_difference == 0
    assert result.input_ids["reference"] == [0, *result.input_ids["candidate"]]
    assert "leading token" in result.provenance.summary
    assert (result.table["status"] == "shape mismatch").any()
    assert result.per_token is None
    # the token difference is stated before the numerics, which it makes unreliable
    assert result.provenance.summary in result.conclusion
    assert result.conclusion.endswith(result.summary.describe(result.cand.label))
    assert result.summary.verdict == "not comparable" and result.floor is None  # nothing can be replayed
    assert result.figures()["first_token_difference"] == 0


def test_first_nonfinite_is_localised(llama_dir, tmp_path):
    poisoned = _save_llama(tmp_path / "poisoned", poison=True)
    result = compare_runs(RunSpec(str(llama_dir)), RunSpec(str(poisoned)), prompt=PROMPT, show_progress=False)
    hit = result.summary.first_nonfinite
    assert hit["module"] == "model.layers.1.mlp.down_proj"
    assert hit["module"] in result.conclusion
    assert result.figures()["first_nonfinite_order"] == int(hit["order"])
    assert result.ref_nonfinite is None
    assert result.summary.verdict == "not finite"


def test_missing_builtin_says_how_to_create_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PARITY_KIT_DATA", str(tmp_path))
    with pytest.raises(ParityKitError, match="parity-kit train tiny-internlm2"):
        compare_runs(RunSpec("tiny-internlm2"), RunSpec("tiny-internlm2", "bf16"), prompt=PROMPT, show_progress=False)


def test_internlm2_against_llama_gets_the_mapping():
    from parity_kit.models.internlm2 import InternLM2Config, InternLM2ForCausalLM

    config = InternLM2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=1, bias=False)
    internlm2 = InternLM2ForCausalLM(config)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=1))
    mapping, name = auto_mapping(internlm2, llama)
    assert name == "internlm2_to_llama"
    assert [t.cand for t in mapping.targets("output")] == ["lm_head"]
    assert auto_mapping(llama, internlm2) == (None, "identity")


def test_summary_of_a_table_with_nothing_comparable():
    table = pd.DataFrame({"order": [0], "module": ["a"], "tensor": ["output"], "rel_rms": [float("nan")],
                          "verdict": [None], "status": ["shape mismatch"], "nonfinite": [0]})
    summary = summarise(table, 0.01)
    assert summary.n_rows == 0 and summary.n_not_comparable == 1
    assert summary.verdict == "not comparable" and f"({summary.n_not_comparable} rows" in summary.describe("x")
    assert summary.figures()["max_rel_rms"] is None


def test_summary_names_a_module_that_computes_differently():
    table = pd.DataFrame({
        "order": [0, 1, 2], "module": ["a", "b", "c"], "cand_module": ["a", "b", "c"], "call": 0, "tensor": "output",
        "rel_rms": [1e-3, 0.05, 0.04], "verdict": ["within floor", "above floor ×25", "above floor ×20"],
        "status": "ok", "nonfinite": 0, "own_rel_rms": [1e-3, 0.05, 1e-3], "own_floor": 2e-3,
        "own_floor_ratio": [0.5, 25.0, 0.5], "diagnosis": ["consistent with rounding", "own error above floor",
                                                            "inherited"],
        "own_cause": [None, "computes differently", None]})
    summary = summarise(table, 0.01)
    assert summary.judgements() == {"verdict": "computes differently", "culprits": ["b"],
                                    "culprit_causes": ["computes differently"], "precision_sensitive": []}
    figures = summary.figures()
    assert figures["n_culprits"] == 1 and figures["culprit_own_floor_ratios"] == [25.0]
    assert figures["n_modules_consistent"] == 1 and figures["n_rows_by_diagnosis"]["inherited"] == 1
    text = summary.describe("cand")
    assert "b (own error ×25" in text and "1 of 3 modules" in text  # the culprit, its ratio, the consistent count


def test_cli_values():
    assert parse_cli_value("True") is True and parse_cli_value("None") is None
    assert parse_cli_value("0.5") == 0.5 and parse_cli_value("'7'") == "7"
    assert parse_cli_value("/tmp/a folder") == "/tmp/a folder"
    assert parse_cli_value("[1, 2]") == [1, 2]


def test_from_config_llama_needs_input_ids_or_random_ids():
    result = compare_runs(RunSpec(FROM_CONFIG_LLAMA), RunSpec(FROM_CONFIG_LLAMA, "fp16"), seq_len=5, layers=1,
                          modules=["lm_head"], show_progress=False)
    assert len(result.input_ids["reference"]) == 5
    with pytest.raises(ParityKitError, match=r"shape \[1, T\]"):
        compare_runs(RunSpec(FROM_CONFIG_LLAMA), RunSpec(FROM_CONFIG_LLAMA), input_ids=[1, 2], layers=1,
                     show_progress=False)


# ------------------------------------------------------------------------------ the template, headless
def _report(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), "report", *args], capture_output=True, text=True, cwd=cwd, timeout=400)


def _local_parameters(folder: Path) -> list[str]:
    return ["-p", "ref_model", str(folder), "-p", "cand_model", str(folder), "-p", "smoke", "True"]


@pytest.mark.slow
def test_report_runs_the_template_and_gathers_html_findings_and_recordings(llama_dir, tmp_path):
    out = tmp_path / "out"
    done = _report(str(TEMPLATE), "--out", str(out), *_local_parameters(llama_dir), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    printed = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert Path(printed["html"]) == out / "05_bug_report.html"

    findings = read_findings(out / "05_bug_report.findings.json")
    assert findings["parameters"]["ref_model"] == str(llama_dir) and findings["parameters"]["cand_dtype"] == "bf16"
    assert findings["parameters"]["smoke"] is True
    assert findings["environment"]["python_prefix"] == sys.prefix
    figures = findings["figures"]
    assert figures["n_modules"] > 10 and figures["max_rel_rms"] > 0
    assert f"{figures['max_rel_rms']:.3g}" in findings["conclusion"]

    archive = Path(printed["recordings"])
    assert archive == out / "05_bug_report.recordings.zip"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp_path / "unzipped")
    ref = Recording.load(tmp_path / "unzipped" / "05_bug_report.recordings" / "reference")
    cand = Recording.load(tmp_path / "unzipped" / "05_bug_report.recordings" / "candidate")
    assert ref.names == cand.names and len(ref.names) == figures["n_modules"]

    page = (out / "05_bug_report.html").read_text()
    assert "data:image/png;base64" in page
    assert "<script src=\"http" not in page and "src=\"https://" not in page
    assert 'class="highlight' in page, "code cells are shown by default"

    # the already executed copy, exported again without its code
    hidden = _report(str(out / "05_bug_report.ipynb"), "--out", str(tmp_path / "hidden"), "--no-execute",
                     "--hide-code", cwd=tmp_path)
    assert hidden.returncode == 0, hidden.stderr
    hidden_page = (tmp_path / "hidden" / "05_bug_report.html").read_text()
    assert 'class="highlight' not in hidden_page and "data:image/png;base64" in hidden_page
    assert str(llama_dir) in hidden_page and "cand_dtype" in hidden_page, "the parameters stay with --hide-code"
    assert "What to fill in" not in hidden_page and "What to fill in" not in page
    assert (tmp_path / "hidden" / "05_bug_report.findings.json").read_text() == \
        (out / "05_bug_report.findings.json").read_text()
    assert (tmp_path / "hidden" / "05_bug_report.recordings.zip").exists()


BUILTINS_READY = all((builtin_path(n) / "config.json").exists() for n in ("tiny-internlm2",))


@pytest.mark.slow
@pytest.mark.skipif(not BUILTINS_READY, reason="built-in tiny-internlm2 not trained yet (data/models/)")
def test_template_defaults_run_on_the_builtins(tmp_path):
    done = _report(str(TEMPLATE), "--out", str(tmp_path), "-p", "smoke", "True", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    findings = read_findings(tmp_path / "05_bug_report.findings.json")
    assert findings["parameters"]["ref_model"] == "tiny-internlm2" and findings["figures"]["n_modules"] > 0


def test_report_errors(tmp_path):
    missing = _report(str(tmp_path / "nope.ipynb"), cwd=tmp_path)
    assert missing.returncode == 2 and "no notebook at" in missing.stderr

    plain = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nbformat.write(plain, tmp_path / "plain.ipynb")
    untagged = _report(str(tmp_path / "plain.ipynb"), cwd=tmp_path)
    assert untagged.returncode == 2 and "no cell tagged 'parameters'" in untagged.stderr

    with_p = _report(str(tmp_path / "plain.ipynb"), "--no-execute", "-p", "x", "2", cwd=tmp_path)
    assert with_p.returncode == 2 and "drop -p or --no-execute" in with_p.stderr


@pytest.mark.slow
def test_report_of_a_failing_notebook_keeps_its_copy_and_html(tmp_path):
    params = nbformat.v4.new_code_cell("interactive = True\nreports_dir = 'r'")
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell("raise RuntimeError('checkpoint is broken')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "fails.ipynb")
    done = _report(str(tmp_path / "fails.ipynb"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 1
    assert "checkpoint is broken" in done.stderr
    assert "checkpoint is broken" in (tmp_path / "out" / "fails.html").read_text()
    assert (tmp_path / "out" / "fails.ipynb").exists()


def test_execution_noise_judges_the_comparison_against_the_candidates_own_spread():
    from parity_kit.analyses.runs import RunSpec, compare_runs
    from parity_kit.stories.bug_report import execution_noise

    result = compare_runs(RunSpec("tiny-internlm2", "fp32"), RunSpec("tiny-internlm2", "bf16"),
                          prompt="User: who are you\nAssistant:", show_progress=False)
    noise = execution_noise(result, repeats=2, batch_sizes=(2,), progress=False)
    ok = result.table["status"] == "ok"
    assert int(noise.counts.sum()) == int(ok.sum())
    assert {"run_to_run_floor", "batch_floor", "execution_floor"} <= set(noise.table.columns)
    # a healthy bf16 run: every row is explained by rounding or by the candidate's own executions
    assert noise.n_explained == int(ok.sum())
    assert noise.figures()["execution_explained_rows"] == noise.n_explained
    assert f"{noise.n_explained} of {int(ok.sum())}" in noise.summary


def test_execution_noise_refuses_what_is_not_a_comparison():
    from parity_kit.stories.bug_report import execution_noise

    with pytest.raises(ParityKitError, match="RunComparison"):
        execution_noise("table")
