"""Comparison of two runs: metrics, the noise-floor rule, compare() tables and their queries, live comparison."""

from .compare import compare, first_divergence, first_nonfinite, per_token_error
from .live import compare_live

__all__ = ["compare", "compare_live", "first_divergence", "first_nonfinite", "per_token_error"]
