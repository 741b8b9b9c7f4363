"""Byte counts as people write them ("4GiB", "500MB") and as people read them.

>>> parse_bytes("1.5KiB"), parse_bytes(None), format_bytes(3 * 2**20)
(1536, None, '3.00 MiB')
"""

from __future__ import annotations

import re

from ..errors import ParityKitError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(budget: int | str | None, knob: str = "memory_budget") -> int | None:
    """Bytes in ``budget`` (an int, a string like "4GiB" / "500MB", or None for no limit); ``knob`` names the
    argument in the error message."""
    if budget is None or (isinstance(budget, int) and not isinstance(budget, bool)):
        if isinstance(budget, int) and budget < 0:
            raise ParityKitError(f"{knob}={budget!r} is negative; use a byte count >= 0, '4GiB', '500MB' or None")
        return budget
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", budget.lower())
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2) or "b"])
    raise ParityKitError(f"{knob}={budget!r} is not understood; use bytes (int), '4GiB', '500MB' or None")


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps the number at least 1."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
