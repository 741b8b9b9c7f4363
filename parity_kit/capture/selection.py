"""Module selection: which modules of a model a capture, a replay or a precision search works on.

One spelling everywhere (:data:`ModuleSpec`): a glob on qualified names (``"model.layers.*"``; ``*`` also
crosses dots), ``"re:<regex>"`` (the regex must match the whole name), a list of names or globs (each must
match something), or an ``nn.Module`` subclass or a tuple of them.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Sequence

from torch import nn

from ..errors import ParityKitError

#: What every ``modules=`` / ``candidates=`` argument of the kit accepts (see the module docstring).
ModuleSpec = str | Sequence[str] | type[nn.Module] | tuple[type[nn.Module], ...]


def select_modules(model: nn.Module, modules: ModuleSpec = "*") -> list[tuple[str, nn.Module]]:
    """The ``(qualified name, module)`` pairs that ``modules`` selects, in ``named_modules()`` order.

    ``modules`` is a glob on qualified names (``fnmatch``; ``*`` also crosses dots), ``"re:<regex>"``
    (the regex must match the whole name), a list of names/globs (each must match something), or an
    ``nn.Module`` subclass / tuple of subclasses. The root module (name ``""``) is only selected by
    naming it exactly (``modules=[""]``). A pattern that matches nothing raises ParityKitError listing
    close names.

    >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> [n for n, _ in select_modules(m, "*")], [n for n, _ in select_modules(m, nn.ReLU)]
    (['0', '1'], ['1'])
    """
    return select_from(named_modules(model), modules)


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``list(model.named_modules())``: the same pairs in the same order, without a generator per
    module (nested generators pass each name up through every level). A model where some module
    overrides ``named_modules`` gets its own answer."""
    if not isinstance(model, nn.Module):
        hint = (f"; load it first, e.g. model, tok = pk.models.load({model!r})" if isinstance(model, str)
                else "")
        raise ParityKitError(f"model must be a torch.nn.Module, got {type(model).__name__} {model!r:.60}{hint}")
    standard = nn.Module.named_modules
    if type(model).named_modules is not standard:
        return list(model.named_modules())
    found: list[tuple[str, nn.Module]] = [("", model)]
    seen = {model}

    def walk(module: nn.Module, prefix: str) -> bool:
        for name, child in module._modules.items():
            if child is None or child in seen:
                continue
            if type(child).named_modules is not standard:
                return False
            seen.add(child)
            qualified = f"{prefix}.{name}" if prefix else name
            found.append((qualified, child))
            if child._modules and not walk(child, qualified):
                return False
        return True

    return found if walk(model, "") else list(model.named_modules())


def select_from(named: list[tuple[str, nn.Module]], modules: ModuleSpec) -> list[tuple[str, nn.Module]]:
    """:func:`select_modules` over an already listed ``named`` (``named_modules(model)``), so a caller that
    needs the full list too walks the tree once."""
    if isinstance(modules, type) or (
        isinstance(modules, tuple) and modules and all(isinstance(m, type) for m in modules)
    ):
        classes = modules if isinstance(modules, tuple) else (modules,)
        if not all(issubclass(c, nn.Module) for c in classes):
            raise ParityKitError(f"modules={modules!r}: classes must be torch.nn.Module subclasses")
        found = [pair for pair in named if isinstance(pair[1], classes)]
        if not found:
            present = sorted({type(m).__name__ for _, m in named})
            raise ParityKitError(
                f"no module is an instance of {[c.__name__ for c in classes]}; classes in this model: {present}"
            )
        return found
    if modules == "*":  # the common case: every module but the root, without building a name set
        return [pair for pair in named if pair[0]]
    if isinstance(modules, str):
        patterns = [modules]
    elif isinstance(modules, Sequence) and all(isinstance(p, str) for p in modules):
        patterns = list(modules)
        if not patterns:
            raise ParityKitError("modules=[] selects nothing; pass '*' for every module or a list of names")
    else:
        raise ParityKitError(
            f"modules={modules!r} is not understood; pass a glob ('model.layers.*'), 're:<regex>', "
            "a list of names/globs, or an nn.Module subclass"
        )
    names = [n for n, _ in named]
    chosen: set[str] = set()
    for pattern in patterns:
        hits = _match(pattern, names)
        if not hits:
            raise ParityKitError(_no_match_message(pattern, names))
        chosen.update(hits)
    return [pair for pair in named if pair[0] in chosen]  # the same tuples: no allocation per module


def _match(pattern: str, names: list[str]) -> list[str]:
    if pattern == "*":  # the common case, without a glob match per module
        return [n for n in names if n]
    if pattern in names:
        return [pattern]
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as e:
            raise ParityKitError(f"modules={pattern!r} is not a valid regular expression: {e}") from None
        return [n for n in names if n and regex.fullmatch(n)]
    return [n for n in names if n and fnmatch.fnmatchcase(n, pattern)]


def _no_match_message(pattern: str, names: list[str]) -> str:
    probe = pattern[3:] if pattern.startswith("re:") else pattern
    probe = re.sub(r"[*?\[\]\\^$+(){}|]", "", probe)
    close = difflib.get_close_matches(probe, [n for n in names if n], n=5, cutoff=0.4)
    if not close:
        last = probe.rsplit(".", 1)[-1]
        close = [n for n in names if n and last and last in n][:5]
    hint = f"close names: {close}" if close else f"first names in the model: {[n for n in names if n][:8]}"
    return (f"modules pattern {pattern!r} matched no module; {hint}. "
            "Globs use fnmatch ('*' crosses dots), 're:' patterns must match the whole name")
