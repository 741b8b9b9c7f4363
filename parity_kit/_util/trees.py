"""Tensor trees: the tuples, lists, dicts and ModelOutputs that modules take and return.

One walker names every tensor leaf the way a recording names it (``output``, ``output.0``,
``output.logits``, ``input.hidden_states``); one rebuilder replaces leaves and keeps the containers.

>>> import torch
>>> tree = (torch.ones(1), {"mask": torch.zeros(2), "n": 3})
>>> [name for name, _ in leaves(tree, "input")]
['input.0', 'input.1.mask']
>>> map_tensors(tree, lambda name, t: t + 1)[1]["mask"].tolist()
[1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

#: Containers nested deeper than this are not walked: module arguments never nest that deep, a cyclic or
#: pathological structure (a config object holding itself) would otherwise recurse without end.
MAX_DEPTH = 8


def leaves(obj: Any, prefix: str, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensor leaves of ``obj`` with stable dotted names below ``prefix``; non-tensor leaves are skipped."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif depth >= MAX_DEPTH:
        return
    elif isinstance(obj, Mapping):  # dicts and transformers' ModelOutput (an OrderedDict)
        for key, value in obj.items():
            yield from leaves(value, f"{prefix}.{key}", depth + 1)
    elif isinstance(obj, (tuple, list)):
        for i, value in enumerate(obj):
            yield from leaves(value, f"{prefix}.{i}", depth + 1)


def map_tensors(obj: Any, fn: Callable[[str, torch.Tensor], torch.Tensor], prefix: str = "") -> Any:
    """``obj`` rebuilt with every tensor leaf replaced by ``fn(leaf name, tensor)``; containers keep their type
    (namedtuples, ModelOutputs and dict subclasses included), other leaves are kept as they are."""
    return _rebuild(obj, fn, prefix, 0)


def _rebuild(obj: Any, fn: Callable[[str, torch.Tensor], torch.Tensor], prefix: str, depth: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(prefix, obj)
    if depth >= MAX_DEPTH:
        return obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_rebuild(v, fn, f"{prefix}.{i}", depth + 1) for i, v in enumerate(obj)))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_rebuild(v, fn, f"{prefix}.{i}", depth + 1) for i, v in enumerate(obj))
    if isinstance(obj, dict):
        mapped = {k: _rebuild(v, fn, f"{prefix}.{k}", depth + 1) for k, v in obj.items()}
        if hasattr(obj, "to_tuple"):  # transformers ModelOutput: keyword constructor only
            return type(obj)(**mapped)
        try:
            return type(obj)(mapped)
        except TypeError:  # a dict subclass with its own constructor: a plain dict keeps the data
            return mapped
    return obj


def cast_floating(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating tensor cast to ``dtype`` (integer tensors, e.g. token ids, unchanged)."""
    return map_tensors(obj, lambda _name, t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t)


def first_floating_dtype(obj: Any) -> torch.dtype | None:
    """The dtype of the first floating tensor leaf of ``obj``, or None."""
    return next((t.dtype for _, t in leaves(obj, "") if t.is_floating_point()), None)
