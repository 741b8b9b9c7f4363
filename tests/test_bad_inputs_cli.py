"""Bad input to every ``parity-kit`` command: one line ``error: ...`` on stderr naming the problem, a non-zero
exit status, never a traceback (``--debug`` shows it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from parity_kit.app import cli

DATA = Path(__file__).resolve().parents[1] / "parity_kit" / "data" / "models"
ROOT = Path(__file__).resolve().parents[1]


def _internlm2(tmp: Path, **edit: object) -> Path:
    dst = tmp / "src"
    shutil.copytree(DATA / "tiny-internlm2", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(edit)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _file(tmp: Path, name: str = "file", data: bytes = b"x") -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


# (id, argv builder from a temporary folder, regex the one error line must match)
CLI_CASES = [
    ("convert_zero_heads", lambda t: ["convert", "internlm2-to-llama", str(_internlm2(t, num_attention_heads=0)),
                                      str(t / "out")], "num_attention_heads"),
    ("convert_string_heads", lambda t: ["convert", "internlm2-to-llama",
                                        str(_internlm2(t, num_key_value_heads="two")), str(t / "out")],
     "num_key_value_heads"),
    ("convert_missing_source", lambda t: ["convert", "internlm2-to-llama", str(t / "absent"), str(t / "out")],
     "absent"),
    ("convert_source_is_a_file", lambda t: ["convert", "internlm2-to-llama", str(_file(t)), str(t / "out")],
     "not a folder"),
    ("convert_destination_below_a_file", lambda t: ["convert", "internlm2-to-llama", str(_internlm2(t)),
                                                    str(_file(t) / "out")], "file|folder"),
    ("convert_rwkv_missing_source", lambda t: ["convert", "rwkv7-to-fla", str(t / "absent.pth"), str(t / "out")],
     "absent"),
    ("convert_rwkv_garbage_checkpoint", lambda t: ["convert", "rwkv7-to-fla", str(_file(t, "m.pth", b"garbage")),
                                                   str(t / "out")], "m.pth"),
    ("convert_dry_run_rwkv", lambda t: ["convert", "rwkv7-to-fla", str(t / "a"), str(t / "b"), "--dry-run"],
     "dry-run"),
    ("train_unknown_model", lambda t: ["train", "tiny-gpt5", "--out", str(t / "out")], "tiny-gpt5"),
    ("train_unknown_device", lambda t: ["train", "tiny-rwkv7", "--device", "gpu0", "--out", str(t / "out")],
     "gpu0"),
    ("train_zero_batch", lambda t: ["train", "tiny-rwkv7", "--batch-size", "0", "--out", str(t / "out")],
     "batch_size=0"),
    ("demo_missing_notebooks", lambda t: ["demo", "--notebooks", str(t / "nowhere")], "does not exist"),
    ("demo_empty_notebooks", lambda t: ["demo", "--notebooks", str(t)], "no notebooks"),
    ("report_missing_notebook", lambda t: ["report", str(t / "none.ipynb"), "--out", str(t / "r")], "none.ipynb"),
    ("triage_bad_dtype", lambda t: ["triage", "tiny-internlm2-llama", "tiny-internlm2-llama", "--dtype", "fp12",
                                    "--out", str(t / "o")], "fp12"),
    ("triage_eval_not_utf8", lambda t: ["triage", "tiny-internlm2-llama", "tiny-internlm2-llama", "--quick",
                                        "--eval", str(_file(t, "e.jsonl", b'{"context": "\xff", "target": " a"}\n')),
                                        "--out", str(t / "o")], "UTF-8"),
    ("triage_eval_missing", lambda t: ["triage", "tiny-internlm2-llama", "tiny-internlm2-llama", "--quick",
                                       "--eval", str(t / "none.jsonl"), "--out", str(t / "o")], "none.jsonl"),
    ("report_not_a_notebook", lambda t: ["report", str(_file(t, "nb.ipynb", b"\xff\xfe")), "--out", str(t / "r"),
                                         "--no-execute"], "nb.ipynb"),
]


@pytest.mark.parametrize("argv,match", [pytest.param(a, m, id=name) for name, a, m in CLI_CASES])
def test_cli_error_is_one_line(tmp_path, capsys, argv, match):
    status = cli.main(argv(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert status != 0
    assert len(err) == 1 and "error: " in err[0], err
    assert "Traceback" not in err[0]
    import re

    assert re.search(match, err[0]), err[0]


def test_an_unexpected_failure_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    def explode(_args):
        raise RuntimeError("planted failure")

    with mock.patch.object(cli, "_cmd_env", explode):
        assert cli.main(["env"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error: " in err[0] and "planted failure" in err[0] and "RuntimeError" in err[0]
        assert "--debug" in err[0]
        assert cli.main(["--debug", "env"]) != 0
        err = capsys.readouterr().err
        assert "Traceback" in err and "planted failure" in err


def test_keyboard_interrupt_is_one_line(capsys):
    def interrupted(_args):
        raise KeyboardInterrupt

    with mock.patch.object(cli, "_cmd_env", interrupted):
        assert cli.main(["env"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0]


def test_the_command_in_a_process_prints_no_traceback(tmp_path):
    """As a user runs it (``python -m`` from the checkout, so this checkout's code runs, as the console script does
    in an installed clone)."""
    src = _internlm2(tmp_path, num_attention_heads=0)
    done = subprocess.run([sys.executable, "-m", "parity_kit.app.cli", "convert", "internlm2-to-llama", str(src),
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "num_attention_heads" in done.stderr, done.stderr
