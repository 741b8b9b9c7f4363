"""Run chosen modules in another dtype: :func:`run_in_dtype`.

A module kept in fp32 receives its inputs cast to fp32 and hands its outputs back in the surrounding dtype; its
weights are swapped for temporary high-precision copies (or exact master weights) and restored bit-exactly on
exit. Two neighbouring fp32 modules therefore still exchange a rounded tensor; to keep a whole island in fp32,
select the module that contains it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._util.trees import cast_floating, first_floating_dtype
from ..capture import ModuleSpec, select_modules
from ..dtypes import DtypeLike, parse_dtype
from ..errors import ParityKitError

#: Exact high-precision weights for the modules run in fp32: a state dict, the fp32 model itself, or None
#: (up-cast the model's own weights).
MasterWeights = Mapping[str, torch.Tensor] | nn.Module | None


def outermost(selected: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Drop every selected module that lies inside another selected one (the outermost wins)."""
    names = {name for name, _ in selected}

    def has_selected_ancestor(name: str) -> bool:
        if "" in names and name != "":
            return True
        parts = name.split(".")
        return any(".".join(parts[:i]) in names for i in range(1, len(parts)))

    return [(name, mod) for name, mod in selected if not has_selected_ancestor(name)]


def master_lookup(master_weights: MasterWeights) -> dict[str, torch.Tensor] | None:
    """``master_weights`` as a name → tensor table (parameters and buffers), or None."""
    if master_weights is None:
        return None
    if isinstance(master_weights, nn.Module):
        table = dict(master_weights.named_parameters(remove_duplicate=False))
        table.update(master_weights.named_buffers(remove_duplicate=False))
        return {k: v.detach() for k, v in table.items()}
    if isinstance(master_weights, Mapping):
        return {k: v.detach() for k, v in master_weights.items() if isinstance(v, torch.Tensor)}
    raise ParityKitError(
        f"master_weights must be a state dict, an nn.Module or None, not {type(master_weights).__name__}; "
        "pass the fp32 reference model (or its state_dict()) to supply exact high-precision weights"
    )


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


@contextlib.contextmanager
def run_modules_in_dtype(
    roots: Sequence[tuple[str, nn.Module]], dtype: torch.dtype, masters: dict[str, torch.Tensor] | None,
) -> Iterator[list[str]]:
    """:func:`run_in_dtype` on already selected, non-nested modules (no pattern matching per call)."""
    swapped: list[tuple[dict[str, Any], str, Any]] = []  # (the module's _parameters/_buffers, key, original)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        seen: set[int] = set()
        for root_name, root in roots:
            own_dtype: torch.dtype | None = None
            for sub_name, sub in root.named_modules():
                if id(sub) in seen:
                    continue
                seen.add(id(sub))
                for store in (sub._parameters, sub._buffers):
                    for key, original in list(store.items()):
                        if original is None or not original.is_floating_point():
                            continue
                        own_dtype = own_dtype or original.dtype
                        full = _join(root_name, sub_name, key)
                        source = original
                        if masters is not None and full in masters:
                            source = masters[full]
                            if source.shape != original.shape:
                                raise ParityKitError(
                                    f"master weight {full!r} has shape {tuple(source.shape)} but the model's has "
                                    f"{tuple(original.shape)}; pass master weights of the same architecture"
                                )
                        elif masters is not None and store is sub._parameters:
                            raise ParityKitError(
                                f"master_weights has no entry for parameter {full!r}; pass a model or state dict "
                                "with the same parameter names (or master_weights=None to up-cast the model's "
                                "own weights)"
                            )
                        copy = source.detach().to(device=original.device, dtype=dtype, copy=True)
                        if isinstance(original, nn.Parameter):
                            copy = nn.Parameter(copy, requires_grad=original.requires_grad)
                        swapped.append((store, key, original))
                        store[key] = copy
            handles.extend(_cast_hooks(root, dtype, own_dtype))
        yield [name for name, _ in roots]
    finally:
        for handle in reversed(handles):
            handle.remove()
        for store, key, original in reversed(swapped):
            store[key] = original


def _cast_hooks(
    module: nn.Module, dtype: torch.dtype, own_dtype: torch.dtype | None,
) -> list[torch.utils.hooks.RemovableHandle]:
    # One stack entry per call in flight, so recursive or re-entrant calls cast back correctly.
    surrounding: list[torch.dtype | None] = []

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # The dtype the rest of the model works in: the floating inputs' dtype, or, for a module fed
        # only integers (an embedding), the dtype its weights had.
        surrounding.append(first_floating_dtype((args, kwargs)) or own_dtype)
        return cast_floating(args, dtype), cast_floating(kwargs, dtype)

    def post_hook(_mod: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> Any:
        back = surrounding.pop() if surrounding else None
        return output if back is None else cast_floating(output, back)

    return [
        module.register_forward_pre_hook(pre_hook, prepend=True, with_kwargs=True),
        module.register_forward_hook(post_hook, prepend=True, with_kwargs=True),
    ]


@contextlib.contextmanager
def run_in_dtype(
    model: nn.Module, modules: ModuleSpec, dtype: DtypeLike, *, master_weights: MasterWeights = None,
) -> Iterator[list[str]]:
    """Make the chosen modules compute in ``dtype`` (higher or lower than the model's) inside the block.

    For each selected module: floating inputs (positional and keyword) are cast to ``dtype``; its
    parameters and floating buffers (its children's too) are replaced by temporary copies in
    ``dtype``; its floating outputs are cast back to the surrounding dtype (that of its first floating
    input, or of its own weights when it receives only integers). On exit — also after an exception —
    the original parameter and buffer objects are put back, so values, dtypes, ``requires_grad`` and
    identities are restored bit-exactly, and the hooks added here are removed.

    Up-casting a bf16 weight to fp32 does not restore the bits the bf16 cast lost: it only makes the
    *arithmetic* fp32. For a real fix, pass ``master_weights`` (the fp32 reference model, or its
    ``state_dict()``, with the same parameter names); the copies are then made from those. Buffers
    missing from a ``master_weights`` dict (non-persistent ones) are taken from the model itself.

    ``modules`` takes what :func:`parity_kit.select_modules` takes (names, globs, ``re:``
    regexes, classes). A module selected together with one of its ancestors is handled once, by the
    ancestor (the outermost wins). Neighbouring selected modules still hand each other tensors in the
    surrounding dtype; select their common parent to keep a whole block in ``dtype``. Outputs of a
    selected module are all cast back, including any recurrent state it returns.

    Yields the names of the modules that run in ``dtype`` (the outermost of the selection).

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).to(torch.bfloat16)
    >>> with run_in_dtype(net, nn.LayerNorm, "fp32") as names:
    ...     y = net(torch.randn(2, 4, dtype=torch.bfloat16))
    ...     inside = net[1].weight.dtype
    >>> names, inside, net[1].weight.dtype, y.dtype
    (['1'], torch.float32, torch.bfloat16, torch.bfloat16)
    """
    target = parse_dtype(dtype)
    roots = outermost(select_modules(model, modules))
    with run_modules_in_dtype(roots, target, master_lookup(master_weights)) as names:
        yield names
