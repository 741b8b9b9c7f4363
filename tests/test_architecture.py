"""The package's structure holds: layers import downwards only, no import cycles, no private names across
modules, no module over ~600 lines, no function over ~80 lines without a comment that says why, and
``import parity_kit`` stays lazy. The graph is read from the source with ``ast`` (every import, also inside
functions), so a violation fails here before anyone draws a picture."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "parity_kit"

#: Layers, lowest first: a module may import modules of its own layer or below (never above).
LAYERS: list[tuple[str, ...]] = [
    ("parity_kit", "parity_kit.errors", "parity_kit.dtypes", "parity_kit._util"),
    ("parity_kit.recording", "parity_kit.models", "parity_kit.builtins.corpus", "parity_kit.builtins.tokenizer",
     "parity_kit.builtins.data"),
    ("parity_kit.capture",),
    ("parity_kit.comparison",),
    ("parity_kit.analyses",),
    ("parity_kit.present",),
    ("parity_kit.stories",),
    ("parity_kit.app", "parity_kit.builtins", "parity_kit.testing", "parity_kit.__main__"),
]
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80  # without the docstring
WHY_MARKER = "# Long on purpose:"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = rank, len(prefix)
    assert best is not None, f"{module} is in no layer of tests/test_architecture.py; add it where it belongs"
    return best


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import of ``path`` inside parity_kit."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "parity_kit" or target.startswith("parity_kit."):
                names = [a.name for a in node.names]
                # `from . import x`: x may be a submodule
                modules = [f"{target}.{n}" for n in names if _is_module(f"{target}.{n}")]
                found.append((target, [n for n in names if not _is_module(f"{target}.{n}")], node.lineno))
                found.extend((m, [], node.lineno) for m in modules)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("parity_kit"):
                    found.append((alias.name, [], node.lineno))
    return found


def _is_module(dotted: str) -> bool:
    relative = Path(*dotted.split("."))
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative / "__init__.py").is_file()


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer_and_imports_downwards_only():
    upward = []
    for path in SOURCES:
        me = module_name(path)
        for target, _, line in imports_of(path):
            if layer_of(target) > layer_of(me):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target} (layer {layer_of(target)} > "
                              f"{layer_of(me)})")
    assert upward == []


def test_no_import_cycles():
    graph: dict[str, set[str]] = {module_name(p): set() for p in SOURCES}
    for path in SOURCES:
        me = module_name(path)
        for target, _, _ in imports_of(path):
            if target != me and target in graph:
                graph[me].add(target)
    # a package's __init__ re-exports its children: importing a child runs the __init__ first, which is no
    # cycle of the code, so edges from a package to its own children are left out
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_no_private_name_is_imported_from_another_module():
    private = [f"{p.relative_to(ROOT)}:{line} takes {hidden} from {target}"
               for p in SOURCES for target, names, line in imports_of(p)
               if (hidden := [n for n in names if n.startswith("_") and not n.startswith("__")])]
    assert private == []


def test_general_modules_never_load_widgets_stories_or_the_ui():
    offenders = []
    for path in SOURCES:
        me = module_name(path)
        if layer_of(me) >= layer_of("parity_kit.present"):
            continue
        text = path.read_text()
        if "ipywidgets" in text.split('"""')[-1] and "import ipywidgets" in text:
            offenders.append(me)
    assert offenders == []


def _long_functions(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                length -= body[0].end_lineno - body[0].lineno + 1
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
            above = "\n".join(lines[max(0, first - 4):first])
            if length > MAX_FUNCTION_LINES and WHY_MARKER not in above:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_modules_and_functions_stay_small():
    too_big = [f"{p.relative_to(ROOT)} ({n} lines)" for p in SOURCES
               if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    too_long = [f for p in SOURCES for f in _long_functions(p)]
    assert too_big == [] and too_long == [], (
        f"split these, or say why above the function with '{WHY_MARKER} ...': {too_big + too_long}")


def test_import_parity_kit_loads_neither_torch_nor_pandas():
    code = "import parity_kit, sys; print('torch' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]


def test_import_parity_kit_before_torch_makes_idle_openmp_threads_sleep_unless_told_otherwise():
    # spinning OpenMP threads stall every parallel region on cores shared with other processes
    code = "import os, parity_kit, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                           env=extra).stdout.strip() for extra in (env, {**env, "OMP_WAIT_POLICY": "ACTIVE"})]
    assert runs == ["PASSIVE", "ACTIVE"]


def test_tests_do_not_import_each_other():
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name} imports {n}" for n in names if n == "conftest" or n.startswith("test_")]
    assert offenders == []
