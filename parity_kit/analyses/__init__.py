"""Analyses built on capture and comparison: precision, replay, generation, evaluation, prefill (general API only)."""
