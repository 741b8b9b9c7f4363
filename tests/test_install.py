"""What an installed copy needs: data and notebooks found through the package, ``parity-kit notebooks``,
``--version`` and ``python -m parity_kit``. (The wheel itself, installed in a fresh venv: tests/test_wheel.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import parity_kit
from parity_kit._util import paths
from parity_kit.app import cli
from parity_kit.app.notebooks_command import copy_notebooks
from parity_kit.errors import ParityKitError

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(parity_kit.__file__).resolve().parent


def test_data_and_notebooks_are_found_inside_the_package(monkeypatch):
    monkeypatch.delenv("PARITY_KIT_DATA", raising=False)
    assert paths.data_dir() == PACKAGE / "data"
    assert paths.notebooks_dir() == PACKAGE / "notebooks"
    for relative in ("models/tiny-rwkv7/model.safetensors", "tokenizer/tokenizer.json", "eval/lastword.jsonl",
                     "prompts.json", "stored/wkv_kernels_h200.json"):
        assert (paths.data_dir() / relative).is_file(), relative
    # a clone's top-level data/ and notebooks/, where present, are links to the package's folders, never copies
    for name in ("data", "notebooks"):
        top = ROOT / name
        if top.exists() or top.is_symlink():
            assert top.is_symlink() and top.resolve() == (PACKAGE / name).resolve(), f"{top} is not a link to {PACKAGE / name}"


def test_parity_kit_data_overrides_the_data_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("PARITY_KIT_DATA", str(tmp_path))
    assert paths.data_dir() == tmp_path
    assert paths.notebooks_dir() == PACKAGE / "notebooks"  # the notebooks always come from the package


def test_a_package_folder_that_is_not_on_disk_is_a_clear_error():
    with pytest.raises(ParityKitError, match="not a folder on disk"):
        paths.package_folder("no-such-folder")


def test_pyproject_ships_every_data_file_and_notebook():
    """The package-data globs of pyproject.toml cover every file under parity_kit/data and parity_kit/notebooks
    (a new kind of file must not silently stay out of the wheel)."""
    import tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["parity_kit"]
    shipped = {p for g in globs for p in PACKAGE.glob(g) if p.is_file()}
    on_disk = {p for folder in ("data", "notebooks") for p in (PACKAGE / folder).rglob("*") if p.is_file()
               and "__pycache__" not in p.parts and ".ipynb_checkpoints" not in p.parts}
    assert on_disk and on_disk <= shipped, sorted(str(p.relative_to(PACKAGE)) for p in on_disk - shipped)


def test_copy_notebooks_copies_every_story_and_keeps_edits(tmp_path):
    dest = tmp_path / "nb"
    copied = copy_notebooks(dest)
    names = [p.name for p in copied]
    assert names == sorted(p.name for p in paths.notebooks_dir().glob("[0-9]*.ipynb")) and len(names) == 6
    for path in copied:
        nb = nbformat.read(path, as_version=4)
        assert nb == nbformat.read(paths.notebooks_dir() / path.name, as_version=4)
        assert 'reports_dir = "reports"' in nb.cells[[c.cell_type for c in nb.cells].index("code")].source
    edited = dest / "05_bug_report.ipynb"
    edited.write_text("my edits")
    with pytest.raises(ParityKitError, match="already holds.*05_bug_report.ipynb.*--overwrite"):
        copy_notebooks(dest)
    assert edited.read_text() == "my edits"
    copy_notebooks(dest, overwrite=True)
    assert json.loads(edited.read_text())["cells"]


def test_copy_notebooks_into_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ParityKitError, match="not a folder"):
        copy_notebooks(target)


def test_cli_notebooks_and_version(tmp_path, capsys):
    assert cli.main(["notebooks", str(tmp_path / "nb")]) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 6 and "jupyter lab" in out.err
    assert cli.main(["notebooks", str(tmp_path / "nb")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"parity-kit {parity_kit.__version__}"


def test_python_dash_m_parity_kit_is_the_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's package, from any folder
    version = subprocess.run([sys.executable, "-m", "parity_kit", "--version"], capture_output=True, text=True,
                             cwd=tmp_path, env=env, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"parity-kit {parity_kit.__version__}"
    bad = subprocess.run([sys.executable, "-m", "parity_kit", "demo", "--only", "no-such-story"], capture_output=True,
                         text=True, cwd=tmp_path, env=env, timeout=120)
    assert bad.returncode == 2 and "no notebook named 'no-such-story'" in bad.stderr
