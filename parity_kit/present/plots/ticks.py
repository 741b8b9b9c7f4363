"""Tick labels that stay readable: at most :data:`MAX_TICK_LABELS` per axis."""

from __future__ import annotations

import math

#: More labels than this on one axis overlap at the default figure sizes.
MAX_TICK_LABELS = 60


def tick_step(n_labels: int) -> int:
    """Label every ``tick_step(n)``-th of ``n`` positions.

    >>> tick_step(10), tick_step(130)
    (1, 3)
    """
    return max(1, math.ceil(n_labels / MAX_TICK_LABELS))
