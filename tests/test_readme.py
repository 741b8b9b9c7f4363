"""The README's Python examples run as written (a newcomer copies them first)."""

from __future__ import annotations

import re

import pytest

from parity_kit._util.paths import notebooks_dir, repo_root

README = repo_root() / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_readme_has_python_examples():
    assert BLOCKS, "README.md has no ```python block; this test would check nothing"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_written(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write reports/ relative to where they run
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_the_quickstarts_default_model_loads_with_models_load():
    import nbformat
    import torch

    import parity_kit as pk
    from parity_kit.analyses.runs import RunSpec, load_run
    from parity_kit.app.report_command import notebook_parameters

    quickstart = nbformat.read(notebooks_dir() / "00_quickstart.ipynb", as_version=4)
    name = notebook_parameters(quickstart)["model"]
    model, tok = pk.models.load(name, dtype="fp32")
    in_notebook, _ = load_run(RunSpec(name, "fp32"))  # what the quickstart runs (4 layers, seed 0)
    ids = tok("User: who are you\nAssistant:", return_tensors="pt").input_ids
    assert ids.shape[1] > 1 and int(ids.max()) < model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(model(ids).logits, in_notebook(ids).logits)
