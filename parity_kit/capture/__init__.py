"""Capture: hooks or forward wrappers on chosen modules that record their outputs into a Recording."""

from .recorder import ModuleSpec, parse_bytes, record, select_modules

__all__ = ["ModuleSpec", "parse_bytes", "record", "select_modules"]
