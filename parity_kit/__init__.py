"""parity_kit: reproduce, localise and explain numerical differences between two runs of a language model."""

from __future__ import annotations

from .errors import ParityKitError

__version__ = "0.1.0"

__all__ = ["ParityKitError", "__version__"]
