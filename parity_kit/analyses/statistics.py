"""The statistics of lm-evaluation-harness, so that our standard errors are comparable with published ones.

- accuracy's standard error is ``sd(acc, n−1) / sqrt(n)`` (:func:`mean_stderr`);
- perplexity's standard error is a bootstrap (:func:`perplexity_bootstrap_stderr`): replicates are drawn in
  chunks of 1,000 (fewer if fewer are asked for), chunk ``i`` from a Mersenne Twister seeded with ``i`` exactly
  as Python's ``random.Random(i).choices`` draws them, and the standard error is the sample standard
  deviation (n−1) of ``exp(-mean)`` over the replicates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import ParityKitError


#: lm-evaluation-harness draws bootstrap replicates in chunks of this size.
LM_EVAL_CHUNK = 1000


def mean_stderr(values: Sequence[float] | np.ndarray) -> float:
    """Standard error of the mean as lm-evaluation-harness computes it: sample sd (n−1) / sqrt(n).

    >>> round(mean_stderr([0.0, 1.0, 1.0, 0.0]), 4)
    0.2887
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        raise ParityKitError(f"a standard error needs at least 2 values, got {x.size}; evaluate more documents")
    return float(np.std(x, ddof=1) / math.sqrt(x.size))


def _lm_eval_draws(seed: int, n_replicates: int, n: int) -> np.ndarray:
    # Python's random.Random(i) seeds MT19937 with init_by_array([i]); numpy's legacy RandomState
    # seeded with the array [i] does the same, and random_sample is the same 53-bit double, so
    # floor(u * n) reproduces random.Random(i).choices(xs, k=n) index for index.
    u = np.random.RandomState([seed]).random_sample(n_replicates * n)
    return np.floor(u * n).astype(np.int64).reshape(n_replicates, n)  # [replicates, n]


def perplexity_bootstrap_stderr(ll: Sequence[float] | np.ndarray, n_bootstrap: int = 100_000) -> float:
    """Bootstrap standard error of ``exp(-mean(ll))``, drawn exactly as lm-evaluation-harness draws it.

    Replicates come in ``n_bootstrap // 1000`` chunks of 1,000 (one chunk of ``n_bootstrap`` when it is
    below 1,000), chunk ``i`` seeded with ``i``; the result is the sample sd (n−1) of the replicates.

    >>> round(perplexity_bootstrap_stderr([-1.0, -2.0, -3.0, -0.5], n_bootstrap=1000), 3) > 0
    True
    """
    x = np.asarray(ll, dtype=np.float64)
    if x.size < 2:
        raise ParityKitError(f"a bootstrap standard error needs at least 2 documents, got {x.size}")
    if n_bootstrap < 2:
        raise ParityKitError(f"n_bootstrap={n_bootstrap} is too few replicates; use at least 2 (lm-eval uses 100000)")
    chunk = min(LM_EVAL_CHUNK, n_bootstrap)
    replicates = np.concatenate([
        np.exp(-x[_lm_eval_draws(seed, chunk, x.size)].mean(axis=1)) for seed in range(n_bootstrap // chunk)
    ])
    return float(np.std(replicates, ddof=1))
