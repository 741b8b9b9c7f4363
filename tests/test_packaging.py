"""Packaging stays in sync: pyproject ↔ environment.yml, README quick start ↔ .ci/run."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
TORCH_PIN = "torch==2.13.0"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pyproject_requirements() -> dict[str, Requirement]:
    project = _pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    return {canonicalize_name(r.name): r for r in reqs}


def _environment_requirements() -> tuple[dict[str, str], dict[str, Requirement], list[str]]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda: dict[str, str] = {}
    pip: list[str] = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip += dep["pip"]
        else:
            name, spec = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", dep).groups()
            conda[canonicalize_name(name)] = spec.replace(" ", "")
    editable = [p for p in pip if p.startswith("-e")]
    pip_reqs = {canonicalize_name(Requirement(p).name): Requirement(p) for p in pip if not p.startswith("-e")}
    return conda, pip_reqs, editable


def test_pyproject_declares_package_script_and_test_extra():
    project = _pyproject()["project"]
    assert project["name"] == "parity_kit"
    assert project["scripts"]["parity-kit"] == "parity_kit.app.cli:main"
    assert "test" in project["optional-dependencies"]
    assert "pytest" in _pyproject_requirements()


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    conda, pip_reqs, editable = _environment_requirements()
    wanted = _pyproject_requirements()
    provided = (set(conda) | set(pip_reqs)) - {"python", "pip"}
    assert provided == set(wanted), (
        f"only in pyproject: {sorted(set(wanted) - provided)}; only in environment.yml: {sorted(provided - set(wanted))}"
    )
    for name, spec in conda.items():
        if name in wanted:
            assert spec == str(wanted[name].specifier), f"{name}: environment.yml {spec!r} vs pyproject {wanted[name].specifier}"
    assert editable == ["-e .[test]"]


def test_torch_is_pinned_in_both_setup_paths_and_satisfies_pyproject():
    _, pip_reqs, _ = _environment_requirements()
    assert str(pip_reqs["torch"]) == TORCH_PIN
    assert "2.13.0" in _pyproject_requirements()["torch"].specifier
    for line in _quickstart_commands():
        assert TORCH_PIN in line


def _quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S)
    assert block, "README's Quick start has no code block"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _readme_test_command() -> str:
    commands = _quickstart_commands()
    assert len(commands) == 2, f"Quick start must show exactly two commands, found {commands}"
    assert commands[0].endswith("parity-kit demo")
    tests = [c for c in commands if "pytest" in c]
    assert len(tests) == 1
    return tests[0]


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[0].startswith("#!") and "bash" in ci[0]
    assert "set -euo pipefail" in ci
    command_lines = [ln for ln in ci[1:] if ln.strip() and not ln.startswith("#")
                     and ln not in ("set -euo pipefail", 'cd "$(dirname "$0")/.."')]
    assert command_lines == [_readme_test_command()]
    assert os.stat(ROOT / ".ci" / "run").st_mode & stat.S_IXUSR


def _fake_bin(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def test_ci_exits_non_zero_when_the_tests_fail(tmp_path):
    """Run .ci/run with a stand-in python3 whose venv's pytest fails: the failure must reach CI."""
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "run").write_text((ROOT / ".ci" / "run").read_text())
    (tmp_path / ".ci" / "run").chmod(0o755)
    shims = tmp_path / "shims"
    shims.mkdir()
    # stand-in `python3 -m venv .venv`: a venv whose pip succeeds and whose pytest run exits with $PYTEST_RC
    _fake_bin(shims, "python3", 'mkdir -p .venv/bin\n'
              'printf "#!/usr/bin/env bash\\nexit 0\\n" > .venv/bin/pip\n'
              'printf "#!/usr/bin/env bash\\nexit $PYTEST_RC\\n" > .venv/bin/python\n'
              'chmod +x .venv/bin/pip .venv/bin/python')
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "CI": "true"}
    failing = subprocess.run([str(tmp_path / ".ci" / "run")], env={**env, "PYTEST_RC": "1"}, cwd=tmp_path)
    passing = subprocess.run([str(tmp_path / ".ci" / "run")], env={**env, "PYTEST_RC": "0"}, cwd=tmp_path)
    assert failing.returncode != 0
    assert passing.returncode == 0


def test_readme_performance_table_is_the_benchmark_summary():
    import sys

    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- performance table: generated by benchmarks/summary.py -->", "<!-- end performance table -->"
    table = readme.split(start, 1)[1].split(end, 1)[0].strip()
    summary = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "summary.py")], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert table == summary, "regenerate the README table with: python benchmarks/summary.py"


def _pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_the_pinned_set_pins_every_direct_dependency_within_pyproject_bounds():
    """CI installs through constraints/ci.txt: every direct dependency must be pinned there, at a version
    pyproject.toml allows, so a fresh clone installs what the suite last passed with."""
    from packaging.version import Version

    pins = _pins(ROOT / "constraints" / "ci.txt")
    for name, requirement in _pyproject_requirements().items():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        assert name in pins, f"{name} is not pinned in constraints/ci.txt; run python tools/deps.py refresh"
        assert requirement.specifier.contains(Version(pins[name]), prereleases=True), (
            f"constraints/ci.txt pins {name}=={pins[name]}, outside pyproject's {requirement.specifier}")
    assert pins["torch"] == TORCH_PIN.split("==")[1]
    for line in _quickstart_commands():
        assert "-c constraints/ci.txt" in line


def test_the_lowest_set_is_pyprojects_lower_bounds():
    import importlib.util

    spec = importlib.util.spec_from_file_location("deps", ROOT / "tools" / "deps.py")
    deps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deps)
    assert (ROOT / "constraints" / "lowest.txt").read_text() == deps.lowest_text(), (
        "constraints/lowest.txt is stale: run python tools/deps.py lowest")
    bounds = deps.lower_bounds()
    for name, requirement in _pyproject_requirements().items():
        if name != "torch" and any(s.operator == ">=" for s in requirement.specifier):
            assert any(canonicalize_name(n) == name for n in bounds), name


def test_extras_gpu_rwkv_test_and_environment_yml_names_them():
    """The extras people install (``parity_kit[gpu]``, ``[rwkv]``, ``[test]``) exist with the packages they promise,
    and environment.yml's commented editable line offers exactly pyproject's extras."""
    extras = _pyproject()["project"]["optional-dependencies"]
    names = {extra: {canonicalize_name(Requirement(r).name) for r in reqs} for extra, reqs in extras.items()}
    assert set(names) == {"test", "gpu", "rwkv"}
    assert names["gpu"] == {"flash-linear-attention", "fla-core", "triton"}
    assert names["rwkv"] == {"rwkv"}
    offered = re.findall(r"^\s*#\s*-\s*-e \.\[([a-z,]+)\]\s*$", (ROOT / "environment.yml").read_text(), re.M)
    assert len(offered) == 1 and set(offered[0].split(",")) == set(extras)


def test_the_version_has_one_source():
    import parity_kit

    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "parity_kit.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", parity_kit.__version__)
