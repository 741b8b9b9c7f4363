"""A cache of loaded models, so an interactive re-run with other knobs does not reload weights."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..dtypes import dtype_name, parse_dtype
from . import load


class ModelCache:
    """Loaded models kept by (name, dtype, device, attention implementation, extra options), least
    recently used evicted.

    >>> cache = ModelCache(max_models=2, loader=lambda name, **kw: (name, kw["dtype"]))
    >>> cache.load("m", "bf16") is cache.load("m", "bfloat16"), len(cache)
    (True, 1)
    """

    def __init__(self, max_models: int = 4, loader: Callable[..., Any] | None = None):
        self.max_models = max_models
        self._loader = loader
        self._entries: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every cached model (frees their memory once nothing else refers to them)."""
        self._entries.clear()

    def load(self, name: str, dtype: str = "fp32", device: str = "cpu",
             attn_implementation: str | None = None, *, loader: Callable[..., Any] | None = None,
             **kwargs: Any) -> Any:
        """``pk.models.load`` with caching; returns ``(model, tokenizer)``.

        ``loader`` replaces the cache's loader for this call (e.g. a builder of a model made from a
        config); ``kwargs`` go to the loader and are part of the cache key.
        """
        options = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        key = (name, dtype_name(parse_dtype(dtype)), str(device), attn_implementation, options)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        loader = loader or self._loader or load
        loaded = loader(name, dtype=dtype, device=device, attn_implementation=attn_implementation, **kwargs)
        self._entries[key] = loaded
        while len(self._entries) > self.max_models:
            self._entries.popitem(last=False)
        return loaded


#: The process-wide cache the story panels and their analyses use.
MODELS = ModelCache()
