"""Comparison of two runs: metrics, the noise-floor rule, compare() tables and their queries, live comparison."""

from .compare import compare
from .live import compare_live
from .queries import first_divergence, first_nonfinite, per_token_error

__all__ = ["compare", "compare_live", "first_divergence", "first_nonfinite", "per_token_error"]
