"""The ``parity-kit`` console script, run as a user runs it (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from parity_kit import cli
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
    assert cli.main(["convert", "rwkv7-fla", str(tmp_path / "a"), str(tmp_path / "b"), "--dry-run"]) == 2
    assert "--dry-run is only supported" in capsys.readouterr().err


def test_parser_rejects_unknown_command():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["frobnicate"])
