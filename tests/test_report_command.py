"""``parity-kit report`` as a newcomer meets it: a mistyped parameter is refused, the HTML says what ran
(also with --hide-code) without the template's fill-in instructions, outputs carry the report's name, and a
checkpoint without tokenizer files is named as such."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from parity_kit.analyses.runs import encode_prompt
from parity_kit.app.cli import main
from parity_kit.app.report_command import INSTRUCTIONS_TAG, make_report, notebook_parameters
from parity_kit._util.paths import notebooks_dir
from parity_kit.errors import ParityKitError
from parity_kit.models import load, tokenizer_files

TEMPLATE = notebooks_dir() / "05_bug_report.ipynb"
INSTRUCTIONS = "Fill in the parameters below, then run"


def test_a_mistyped_parameter_is_refused_with_the_known_ones(capsys, tmp_path):
    status = main(["report", str(TEMPLATE), "--out", str(tmp_path), "-p", "cand_dtyp", "fp16"])
    err = capsys.readouterr().err
    assert status == 2
    assert "'cand_dtyp'" in err and "did you mean 'cand_dtype'" in err
    known = notebook_parameters(nbformat.read(TEMPLATE, as_version=4))
    assert all(name in err for name in known), "every parameter of the parameters cell is listed"
    assert not list(tmp_path.iterdir()), "nothing ran, nothing was written"


def test_a_bad_report_name_is_refused(tmp_path):
    with pytest.raises(ParityKitError, match="plain file name"):
        make_report(TEMPLATE, tmp_path, name="../elsewhere")


def _template_like(folder: Path) -> Path:
    """A notebook shaped like the bug-report template: instructions, parameters (with report_name), findings."""
    instructions = nbformat.v4.new_markdown_cell(f"# Template\n\n{INSTRUCTIONS}.")
    instructions.metadata["tags"] = [INSTRUCTIONS_TAG]
    params = nbformat.v4.new_code_cell(
        "model = 'tiny-internlm2'\ndtype = 'fp32'\ninteractive = True\nreports_dir = 'r'\nreport_name = 'template'")
    params.metadata["tags"] = ["parameters"]
    work = nbformat.v4.new_code_cell(
        "import json, pathlib\n"
        "print('measured', dtype)\n"
        "pathlib.Path(reports_dir, report_name + '.findings.json').write_text(json.dumps({'dtype': dtype}))")
    nb = nbformat.v4.new_notebook(cells=[instructions, params, work])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "my_bug.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_reports_are_named_after_themselves_and_their_html_says_what_ran(tmp_path):
    notebook = _template_like(tmp_path)
    out = tmp_path / "reports"
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    first = make_report(notebook, out, hide_code=True, progress=False,
                        parameters={"dtype": "bf16", "model": str(checkpoint)})
    second = make_report(notebook, out, hide_code=True, progress=False, name="second", parameters={"dtype": "fp16"})
    assert first.error is None and second.error is None
    assert first.html == out / "my_bug.html" and second.html == out / "second.html"
    assert first.findings == [out / "my_bug.findings.json"] and second.findings == [out / "second.findings.json"]
    assert json.loads(first.findings[0].read_text()) == {"dtype": "bf16"}, "the second report kept the first's"
    assert json.loads(second.findings[0].read_text()) == {"dtype": "fp16"}

    page = first.html.read_text()
    assert "Report: my_bug" in page and "bf16" in page
    assert str(checkpoint.resolve()) in page, "the model's folder is named in the HTML"
    assert 'class="highlight' not in page, "the code is hidden"
    assert INSTRUCTIONS not in page, "the template's fill-in instructions are left out"
    assert page.index("Report: my_bug") < page.index("measured bf16")


def test_a_checkpoint_without_tokenizer_files_is_named_as_such(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    assert tokenizer_files(tmp_path) == []
    with pytest.raises(ParityKitError, match="no tokenizer files"):
        load(tmp_path)


class _EmptyTokenizer:
    all_special_ids = [0]

    def __len__(self) -> int:
        return 1

    def __call__(self, text: str) -> dict:
        return {"input_ids": []}


def test_a_tokenizer_without_vocabulary_is_named_as_such():
    with pytest.raises(ParityKitError, match="no vocabulary"):
        encode_prompt(_EmptyTokenizer(), "User: hi")
    with pytest.raises(ParityKitError, match="use a longer prompt"):
        encode_prompt(lambda text: {"input_ids": []}, " ")
