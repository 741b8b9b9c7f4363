"""The ``parity-kit`` console script, run as a user runs it (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from parity_kit.app import cli
from parity_kit.errors import ParityKitError

SCRIPT = Path(sys.executable).parent / "parity-kit"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    assert SCRIPT.exists(), f"console script missing at {SCRIPT}; reinstall with pip install -e ."
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_env_json_is_the_capsule():
    done = run_cli("env", "--json")
    assert done.returncode == 0, done.stderr
    cap = json.loads(done.stdout)
    assert cap["python_prefix"] == sys.prefix
    assert {"torch", "transformers", "tf32_matmul", "sdpa_flash", "git_commit"} <= set(cap)


def test_env_pretty_prints_one_line_per_key():
    done = run_cli("env")
    assert done.returncode == 0, done.stderr
    lines = {ln.split()[0]: ln.split(None, 1)[1] for ln in done.stdout.splitlines()}
    import torch

    assert lines["torch"] == torch.__version__
    assert lines["default_dtype"] == "fp32"


def test_demo_only_unknown_lists_available_notebooks(tmp_path):
    for stem in ("00_quickstart", "04_bos_token"):
        nbformat.write(nbformat.v4.new_notebook(), tmp_path / f"{stem}.ipynb")
    done = run_cli("demo", "--notebooks", str(tmp_path), "--only", "nope", "--reports", str(tmp_path / "r"))
    assert done.returncode == 2
    assert "no notebook named 'nope'" in done.stderr
    assert "00_quickstart (quickstart)" in done.stderr and "04_bos_token (bos_token)" in done.stderr
    assert not (tmp_path / "r").exists()


def test_demo_on_a_missing_folder_is_a_clear_error(tmp_path):
    done = run_cli("demo", "--notebooks", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_subcommand_whose_module_is_missing_names_it():
    with pytest.raises(ParityKitError, match="parity_kit.no_such_module"):
        cli._load("parity_kit.no_such_module", "train", "train")
    with pytest.raises(ParityKitError, match="does not exist"):
        cli._load("parity_kit.errors", "no_such_function", "train")


def test_convert_dry_run_only_for_internlm2(tmp_path, capsys):
    for direction in ("rwkv7-to-fla", "rwkv7-fla"):
        assert cli.main(["convert", direction, str(tmp_path / "a"), str(tmp_path / "b"), "--dry-run"]) == 2
        assert "--dry-run is only supported for internlm2-to-llama" in capsys.readouterr().err


def _internlm2_folder(folder: Path) -> Path:
    from parity_kit.models.internlm2 import InternLM2Config, InternLM2ForCausalLM

    config = InternLM2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=1, bias=False)
    InternLM2ForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("direction", ["internlm2-to-llama", "internlm2-llama"])
def test_convert_dry_run_prints_one_row_per_line(tmp_path, direction):
    src = _internlm2_folder(tmp_path / "src")
    done = run_cli("convert", direction, str(src), str(tmp_path / "dst"), "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "model.layers.0.attention.wqkv.weight -> model.layers.0.self_attn.q_proj.weight (16, 16)" in lines
    assert "model.layers.0.attention.wqkv.weight -> model.layers.0.self_attn.k_proj.weight (4, 16)" in lines
    assert all(" -> " in line for line in lines) and len(lines) >= 10
    assert not (tmp_path / "dst").exists()


def test_convert_help_names_the_new_directions():
    done = run_cli("convert", "--help")
    assert "internlm2-to-llama" in done.stdout and "rwkv7-to-fla" in done.stdout


def test_parser_rejects_unknown_command():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["frobnicate"])


def test_help_says_how_errors_read_and_how_to_get_the_traceback(capsys):
    from parity_kit.app.cli import build_parser

    text = build_parser().format_help()
    assert "--debug" in text and "exit 2" in text
