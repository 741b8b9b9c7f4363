"""Story 01 notebook: its shape (parameters, no outputs, findings) and a real headless smoke run."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "parity_kit" / "notebooks" / "01_fp16_fp32_divergence.ipynb"
PARAMETERS = {"model": "tiny-internlm2", "converted": "tiny-internlm2-llama", "dtype": "fp16",
              "reference_dtype": "fp32", "device": "cpu", "interactive": True, "smoke": False,
              "reports_dir": "reports", "prompt": "who are you", "max_new_tokens": 128, "n_prompts": 30, "batch_size": 8,
              "trust_remote_code": False}


def test_notebook_is_committed_clean_with_literal_parameters():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])
    values = {}
    for statement in ast.parse(code[0].source).body:
        assert isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant), ast.dump(statement)
        values[statement.targets[0].id] = statement.value.value
    assert values == PARAMETERS
    assert 'pk.write_findings("01_fp16_fp32_divergence"' in code[-1].source
    assert "import ipywidgets" not in "\n".join(c.source for c in code)


@pytest.fixture(scope="module")
def standin_data(tmp_path_factory):
    """A data folder whose built-in InternLM2 pair is a small random model and its real conversion."""
    from transformers import AutoTokenizer

    from parity_kit._util.paths import data_dir
    from parity_kit.models.convert import convert_internlm2_to_llama
    from parity_kit.models.internlm2 import InternLM2Config, InternLM2ForCausalLM

    source = data_dir()
    if not (source / "prompts.json").is_file() or not (source / "tokenizer").is_dir():
        pytest.skip("data/prompts.json and data/tokenizer/ are created by the corpus step; run it first")
    root = tmp_path_factory.mktemp("data")
    shutil.copy(source / "prompts.json", root / "prompts.json")
    tokenizer = AutoTokenizer.from_pretrained(source / "tokenizer")
    torch.manual_seed(0)
    config = InternLM2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bias=False,
                             bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=0.1)
    original = root / "models" / "tiny-internlm2"
    InternLM2ForCausalLM(config).save_pretrained(original)
    tokenizer.save_pretrained(original)
    convert_internlm2_to_llama(original, root / "models" / "tiny-internlm2-llama")
    return root


@pytest.mark.slow
def test_notebook_runs_headless_in_smoke_mode_and_writes_its_findings(standin_data, tmp_path):
    reports = tmp_path / "reports"
    env = {**os.environ, "PARITY_KIT_DATA": str(standin_data), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "papermill", str(NOTEBOOK), str(tmp_path / "out.ipynb"), "-p", "interactive", "False",
         "-p", "smoke", "True", "-p", "reports_dir", str(reports), "--cwd", str(NOTEBOOK.parent)],
        capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    findings = json.loads((reports / "01_fp16_fp32_divergence.findings.json").read_text())
    figures = findings["figures"]
    assert findings["parameters"]["smoke"] is True
    # 14 pairs that vary one factor (12, plus each model alone vs in batches), plus original vs converted as
    # shipped (eager vs sdpa) in both dtypes
    assert figures["prompts"] == 5 and figures["max_new_tokens"] == 32 and figures["pairs"] == 16
    by_pair = figures["diverged_fraction_by_pair"]
    assert len(by_pair) == 16 and sum("(as shipped:" in name for name in by_pair) == 2
    assert f"{figures['prompts']} prompts and {figures['pairs']} pairs" in findings["conclusion"]
    fractions = figures["diverged_fraction_by_factor"]
    assert set(fractions) == {"fp16 vs fp32 (dtype)", "attention implementation in fp16",
                              "attention implementation in fp32", "conversion in fp16", "conversion in fp32",
                              "batch composition in fp16"}
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    images = sum("image/png" in o.get("data", {}) for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 5  # three margin plots, the histogram, the layer profile
