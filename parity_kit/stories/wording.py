"""Small pieces of conclusion text shared by the stories: numbers written so that the sentence they are in
stays true (a negative share is not a removal, two different values never print alike, a maximum error that is
one rounding step says so)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..dtypes import parse_dtype

__all__ = ["distinct", "ppl_change", "removes_text", "ulp_note"]


def removes_text(fraction: float) -> str:
    """``"removes 12.5% of"`` for a share of the error removed, ``"adds 3.4% to"`` for a negative one.

    >>> removes_text(0.125), removes_text(-0.034)
    ('removes 12.5% of', 'adds 3.4% to')
    """
    return f"removes {fraction:.1%} of" if fraction >= 0 else f"adds {-fraction:.1%} to"


def distinct(a: float, b: float, digits: int = 4) -> tuple[str, str]:
    """``a`` and ``b`` with the fewest significant digits (at least ``digits``, at most 8) that tell them apart
    (equal strings when even 8 do not).

    >>> distinct(2.5748812, 2.5748921), distinct(1.0, 1.0)
    (('2.57488', '2.57489'), ('1', '1'))
    """
    for d in range(digits, 9):
        fa, fb = f"{a:.{d}g}", f"{b:.{d}g}"
        if fa != fb:
            return fa, fb
    return fa, fb


def ppl_change(before: float, after: float) -> str:
    """"last-word perplexity from A to B" with the decimals (4 to 8) that tell them apart, else "leaves ... at A".

    >>> ppl_change(1.008661, 1.008672), ppl_change(2.0, 2.0)
    ('last-word perplexity from 1.00866 to 1.00867', 'leaves last-word perplexity at 2.0000')
    """
    for decimals in range(4, 9):
        a, b = f"{before:.{decimals}f}", f"{after:.{decimals}f}"
        if a != b:
            return f"last-word perplexity from {a} to {b}"
    return f"leaves last-word perplexity at {before:.4f}"


def ulp_note(errors: Sequence[float], dtype: str) -> str:
    """Where each maximum error in ``errors`` that is a power of two is a single rounding step (ULP) of ``dtype``:
    ``"; 0.5 is one bf16 step (ULP) at |x| in [64, 128)"``; "" when none is.

    >>> ulp_note((0.5, 1.0), "bf16")
    '; 0.5 and 1.0 are each one bf16 step (ULP), at |x| in [64, 128) and [128, 256)'
    >>> ulp_note((0.3,), "bf16")
    ''
    """
    bits = -math.log2(torch.finfo(parse_dtype(dtype)).eps)  # stored mantissa bits: 7 for bf16, 10 for fp16
    steps = []
    for e in errors:
        exponent = math.log2(e) if e > 0 and math.isfinite(e) else math.nan
        if math.isfinite(exponent) and exponent == int(exponent):
            low = 2.0 ** (exponent + bits)
            shown = f"{e:.3g}"
            steps.append((shown + (".0" if shown.isdigit() else ""), f"[{low:g}, {2 * low:g})"))
    if not steps:
        return ""
    if len(steps) == 1:
        return f"; {steps[0][0]} is one {dtype} step (ULP) at |x| in {steps[0][1]}"
    return (f"; {' and '.join(v for v, _ in steps)} are each one {dtype} step (ULP), at |x| in "
            f"{' and '.join(r for _, r in steps)}")
