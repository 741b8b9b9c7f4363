"""The decoding cache under the name the installed transformers uses: ``cache`` (5.24 on) or ``past_key_values``.

transformers 5.24 renamed the cache argument of ``forward`` and the cache field of model outputs from
``past_key_values`` to ``cache``; ``generate`` passes the new name and the old one only warns. Our own models accept
both names and answer in the installed one; the kit calls any model with the name its ``forward`` declares.

>>> CACHE_FIELD in ("cache", "past_key_values")
True
>>> resolve_cache(None, None, "InternLM2ForCausalLM") is None
True
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from transformers.modeling_outputs import BaseModelOutputWithPast

from ..errors import ParityKitError

#: The field of transformers' model outputs that holds the cache in the installed version.
CACHE_FIELD: str = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
)

# Keyword arguments that transformers' ``generate`` (5.0 … 5.24) passes and that change nothing for our models:
# return_dict (we always return a ModelOutput), cache_position (positions follow from the cache's length).
_HARMLESS = frozenset({"return_dict", "cache_position"})


def resolve_cache(cache: Any, past_key_values: Any, owner: str) -> Any:
    """The cache passed under either name; both at once is refused unless they are the same object."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ParityKitError(
            f"{owner}.forward got both cache= and past_key_values= with different objects; pass one of them "
            "(transformers 5.24 and later call it cache)"
        )
    return cache if cache is not None else past_key_values


def refuse_unknown_kwargs(kwargs: dict[str, Any], owner: str, accepted: tuple[str, ...]) -> None:
    """Raise on a keyword the model would otherwise swallow silently (a misspelt or renamed argument).

    ``output_attentions`` is accepted only when false: our models return no attention maps (capture them with
    ``parity_kit.record`` instead).
    """
    unknown = sorted(k for k in kwargs if k not in _HARMLESS and k != "output_attentions")
    if unknown:
        raise ParityKitError(
            f"{owner}.forward does not take {unknown}; it takes {list(accepted)}. A renamed transformers argument "
            "lands here too: upgrade parity_kit or pass the name listed"
        )
    if kwargs.get("output_attentions"):
        raise ParityKitError(f"output_attentions is not supported by {owner}; capture with parity_kit.record")


def cache_argument(model: Any) -> str:
    """The keyword under which ``model.forward`` takes its cache (``cache`` or ``past_key_values``)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return CACHE_FIELD
    if "cache" in parameters:
        return "cache"
    if "past_key_values" in parameters:
        return "past_key_values"
    return CACHE_FIELD


def output_cache(output: Any) -> Any:
    """The cache a model returned (a ``ModelOutput``), read without tripping transformers' deprecation warning."""
    if isinstance(output, dict):
        for name in ("cache", "past_key_values"):
            if name in output.keys():
                return dict.__getitem__(output, name)
    return None
