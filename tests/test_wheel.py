"""Acceptance of issue #20: the wheel works anywhere.

Builds the wheel from a copy of what the build reads (pyproject.toml, README.md, parity_kit/), installs it
non-editable with the pinned torch and ``-c constraints/ci.txt`` into a fresh venv (no ``--system-site-packages``, no
repository on the path; pip's own download cache is reused), and from an empty folder runs ``parity-kit demo --smoke --only quickstart``,
``parity-kit notebooks nb/``, ``python -m parity_kit --version`` and loads a built-in model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

import parity_kit

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TORCH_PIN = "torch==2.13.0"
MAX_WHEEL_BYTES = 100 * 2**20


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _clean_env(venv: Path) -> dict[str, str]:
    """The environment a user's shell would give: this repository nowhere on the path, the venv's bin first."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PARITY_KIT_DATA", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("wheel")
    source = base / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "parity_kit", source / "parity_kit",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints", "reports"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", str(source), "-w", str(base / "dist")],
         cwd=base, env=env)
    wheels = sorted((base / "dist").glob("parity_kit-*.whl"))
    assert len(wheels) == 1, wheels
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=base, env=env)
    # --no-compile: byte-compiling torch and transformers up front more than doubled the install's CPU time here;
    # Python compiles what the commands below import anyway
    _run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-compile", "-c", str(ROOT / "constraints" / "ci.txt"),
          TORCH_PIN, str(wheels[0])], cwd=base, env=env, timeout=1800)
    empty = base / "elsewhere"
    empty.mkdir()
    return {"wheel": wheels[0], "venv": venv, "cwd": empty}


def test_the_wheel_holds_models_data_and_notebooks_and_stays_small(installed):
    wheel = installed["wheel"]
    assert wheel.stat().st_size <= MAX_WHEEL_BYTES
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("tiny-internlm2", "tiny-internlm2-llama", "tiny-rwkv7"):
        assert f"parity_kit/data/models/{name}/model.safetensors" in names
    for path in ("data/tokenizer/tokenizer.json", "data/eval/lastword.jsonl", "data/prompts.json",
                 "data/stored/wkv_kernels_h200.json", "notebooks/00_quickstart.ipynb", "notebooks/05_bug_report.ipynb",
                 "__main__.py"):
        assert f"parity_kit/{path}" in names, path
    assert not any(n.startswith(("tests/", "benchmarks/", "data/", "notebooks/")) for n in names)


def test_the_installed_package_is_the_wheel_not_this_checkout(installed):
    python = str(installed["venv"] / "bin" / "python")
    code = "import parity_kit, sys; print(parity_kit.__file__); print(parity_kit.__version__)"
    out = _run([python, "-c", code], cwd=installed["cwd"], env=_clean_env(installed["venv"])).stdout.splitlines()
    assert Path(out[0]).resolve().is_relative_to(installed["venv"].resolve())
    assert out[1] == parity_kit.__version__
    version = _run([python, "-m", "parity_kit", "--version"], cwd=installed["cwd"], env=_clean_env(installed["venv"]))
    assert version.stdout.strip() == f"parity-kit {parity_kit.__version__}"


def test_a_builtin_model_loads_from_anywhere(installed):
    python = str(installed["venv"] / "bin" / "python")
    code = ("import parity_kit as pk; model, tok = pk.models.load('tiny-rwkv7'); "
            "print(type(model).__name__, sum(p.numel() for p in model.parameters()))")
    out = _run([python, "-c", code], cwd=installed["cwd"], env=_clean_env(installed["venv"])).stdout.split()
    record = json.loads((ROOT / "parity_kit" / "data" / "models" / "tiny-rwkv7" / "training.json").read_text())
    assert out == ["RWKV7ForCausalLM", str(record["n_params"])]


def test_notebooks_command_copies_notebooks_that_match_the_package(installed):
    cwd, env = installed["cwd"], _clean_env(installed["venv"])
    _run([str(installed["venv"] / "bin" / "parity-kit"), "notebooks", "nb/"], cwd=cwd, env=env)
    copied = sorted(p.name for p in (cwd / "nb").glob("*.ipynb"))
    assert copied == sorted(p.name for p in (ROOT / "parity_kit" / "notebooks").glob("[0-9]*.ipynb"))
    for name in copied:
        assert nbformat.read(cwd / "nb" / name, as_version=4) == nbformat.read(ROOT / "parity_kit" / "notebooks" / name,
                                                                                 as_version=4)


def test_demo_runs_the_quickstart_from_an_empty_folder(installed):
    cwd = installed["cwd"]
    _run([str(installed["venv"] / "bin" / "parity-kit"), "demo", "--smoke", "--only", "quickstart"], cwd=cwd,
         env=_clean_env(installed["venv"]))
    reports = cwd / "reports"
    findings = json.loads((reports / "00_quickstart.findings.json").read_text())
    assert findings["conclusion"]
    assert (reports / "00_quickstart.html").stat().st_size > 0
    executed = nbformat.read(reports / "00_quickstart.ipynb", as_version=4)
    assert not any(o.get("output_type") == "error" for c in executed.cells for o in c.get("outputs", []))
    # the kernel ran the venv's interpreter: the capsule in the findings names it
    assert Path(findings["environment"]["python_prefix"]).resolve() == installed["venv"].resolve()
