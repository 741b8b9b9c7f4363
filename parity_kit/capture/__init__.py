"""Capture: forward wrappers or hooks on chosen modules that record their outputs into a Recording."""

from .recorder import record
from .selection import ModuleSpec, named_modules, select_modules

__all__ = ["ModuleSpec", "named_modules", "record", "select_modules"]
