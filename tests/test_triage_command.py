"""``parity-kit triage``: the parser, the printed verdict, and --out's executed notebook, HTML and findings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import parity_kit
from parity_kit.app import cli
from parity_kit.app.triage_command import FINDINGS_NAME, TriageRequest, verdict_from_findings


def test_parser_takes_both_runs_settings():
    args = cli.build_parser().parse_args(["triage", "a", "b", "--cand-dtype", "bf16", "--cand-bos", "off", "--quick"])
    assert (args.ref, args.cand, args.cand_dtype, args.cand_bos, args.quick) == ("a", "b", "bf16", "off", True)


def test_triage_prints_the_ranked_verdict(capsys):
    assert cli.main(["triage", "tiny-internlm2-llama", "tiny-internlm2-llama", "--cand-bos", "off", "--quick"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[1]
    assert first.startswith("1. [inputs]") and "BOS" in first  # the top-ranked cause's kind, and what differs


def test_triage_bad_setting_is_a_clear_error(capsys):
    assert cli.main(["triage", "no-such-model", "tiny-internlm2-llama", "--quick"]) == 2
    assert "parity-kit triage: error:" in capsys.readouterr().err


def test_out_writes_executed_notebook_html_and_findings(tmp_path, monkeypatch, capsys):
    # the notebook's kernel imports this checkout's package
    root = str(Path(parity_kit.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = tmp_path / "triage"
    assert cli.main(["triage", "tiny-internlm2", "tiny-internlm2-llama", "--cand-dtype", "bf16", "--quick",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    findings = json.loads((out / FINDINGS_NAME).read_text())
    assert findings["causes"][0]["kind"] == "rounding only"
    assert findings["steps"]["precision or bug"]["branch"] == "precision"
    assert verdict_from_findings(out / FINDINGS_NAME) in printed
    assert (out / "triage.html").stat().st_size > 0 and "rounding only" in (out / "triage.ipynb").read_text()


def test_request_carries_every_notebook_parameter():
    assert set(TriageRequest("a", "b").kwargs()) >= {"ref", "cand", "prompt", "eval_file", "quick", "cand_bos"}
