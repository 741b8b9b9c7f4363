"""Two evaluations of the same documents, compared document by document.

Both runs score the same documents, so the per-document differences cancel the document-to-document spread
that dominates one run's standard error: :func:`paired_comparison` is the sound test of "does this change
the score", and :func:`position_loss_difference` shows where in the context the difference arises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import ParityKitError
from .evaluation import LastWordResult
from .statistics import LM_EVAL_CHUNK, mean_stderr


@dataclass
class PairedComparison:
    """Run ``b`` against run ``a`` on the same documents. ``table`` lists every statistic; ``verdict`` says
    what to trust. ``flagged`` is True when |z| > 3 or the paired bootstrap interval excludes 0.

    >>> a = LastWordResult.from_loglikelihoods([-1.0, -2.0, -0.5, -1.5], n_bootstrap=100)
    >>> b = LastWordResult.from_loglikelihoods([-1.1, -2.1, -0.6, -1.6], n_bootstrap=100)
    >>> paired_comparison(a, b, n_bootstrap=200).flagged
    True
    """

    table: pd.DataFrame
    flagged: bool
    verdict: str
    stats: dict[str, float]

    def __getitem__(self, key: str) -> float:
        return self.stats[key]

    def _repr_html_(self) -> str:
        return f"<p>{self.verdict}</p>" + self.table.to_html(index=False)

    def __repr__(self) -> str:
        return f"{self.table.to_string(index=False)}\n{self.verdict}"


def paired_comparison(
    a: LastWordResult,
    b: LastWordResult,
    *,
    n_bootstrap: int = 10_000,
    seed: int = 0,
    z_threshold: float = 3.0,
) -> PairedComparison:
    """Compare two runs document by document (b − a): paired mean loss difference, its z, and a paired
    bootstrap of the perplexity difference, next to the unpaired "how many of a's standard errors" figure.

    Every difference has one sign: b − a in loss (negative log-likelihood) and in perplexity, so a positive
    ``mean_nll_diff``, ``z`` and ``ppl_diff`` all say that b scores worse.

    The paired bootstrap resamples document indices once per replicate and applies them to both runs.
    Raises a ParityKitError when the runs did not score the same documents in the same order.

    >>> a = LastWordResult.from_loglikelihoods([-1.0, -2.0, -0.5], n_bootstrap=10)
    >>> paired_comparison(a, a, n_bootstrap=100).flagged
    False
    """
    for name, result in (("a", a), ("b", b)):
        if not isinstance(result, LastWordResult):
            raise ParityKitError(f"{name} must be a LastWordResult (from pk.evaluate_lastword), got "
                                 f"{type(result).__name__}")
    if a.n != b.n:
        raise ParityKitError(f"the runs scored different numbers of documents ({a.n} vs {b.n}); evaluate the same "
                             "items (same file, same limit) for a paired comparison")
    docs_a = list(zip(a.per_doc["context"], a.per_doc["target"]))
    docs_b = list(zip(b.per_doc["context"], b.per_doc["target"]))
    if docs_a != docs_b:
        first = next(i for i, (x, y) in enumerate(zip(docs_a, docs_b)) if x != y)
        raise ParityKitError(f"document {first} differs between the runs ({docs_a[first][1]!r} vs "
                             f"{docs_b[first][1]!r}); a paired comparison needs the same documents in the same order")
    if n_bootstrap < 2:
        raise ParityKitError(f"n_bootstrap={n_bootstrap}; use at least 2 replicates")
    ll_a = a.per_doc["ll"].to_numpy(np.float64)
    ll_b = b.per_doc["ll"].to_numpy(np.float64)
    d = ll_a - ll_b  # per-document loss of b minus loss of a: positive where b is worse
    mean_d = float(d.mean())
    se_d = mean_stderr(d)
    z = mean_d / se_d if se_d > 0 else (0.0 if mean_d == 0 else math.copysign(math.inf, mean_d))
    acc_d = b.per_doc["acc"].to_numpy(np.float64) - a.per_doc["acc"].to_numpy(np.float64)

    rng = np.random.default_rng(seed)
    reps: list[np.ndarray] = []
    for start in range(0, n_bootstrap, LM_EVAL_CHUNK):
        idx = rng.integers(0, a.n, size=(min(LM_EVAL_CHUNK, n_bootstrap - start), a.n))  # [replicates, n]
        reps.append(np.exp(-ll_b[idx].mean(axis=1)) - np.exp(-ll_a[idx].mean(axis=1)))
    boot = np.concatenate(reps)
    lo, hi = (float(v) for v in np.quantile(boot, [0.025, 0.975]))

    ppl_diff = b.ppl - a.ppl
    stats = {
        "n": float(a.n),
        "ppl_a": a.ppl, "ppl_b": b.ppl, "ppl_diff": ppl_diff,
        "ppl_diff_in_a_stderr": ppl_diff / a.ppl_stderr if a.ppl_stderr > 0 else math.nan,
        "ppl_diff_unpaired_z": ppl_diff / math.hypot(a.ppl_stderr, b.ppl_stderr)
        if (a.ppl_stderr or b.ppl_stderr) else math.nan,
        "mean_nll_diff": mean_d, "mean_nll_diff_stderr": se_d, "z": z,
        "ppl_diff_boot_sd": float(np.std(boot, ddof=1)), "ppl_diff_ci_low": lo, "ppl_diff_ci_high": hi,
        "acc_diff": float(acc_d.mean()), "acc_diff_stderr": mean_stderr(acc_d),
        "docs_changed": float(np.count_nonzero(d)),
    }
    excludes_zero = lo > 0 or hi < 0
    flagged = bool(abs(z) > z_threshold or excludes_zero)
    name_a, name_b = a.label or "a", b.label or "b"
    direction = "worse" if ppl_diff > 0 else "better"
    verdict = (
        f"Trust the paired test: both runs score the same {a.n} documents, so per-document differences cancel the "
        f"spread between documents that dominates one run's standard error. {name_b} vs {name_a}: perplexity "
        f"{ppl_diff:+.4g} ({direction}; {stats['ppl_diff_in_a_stderr']:.2f} of {name_a}'s standard errors, the "
        f"unpaired figure), paired mean loss difference {mean_d:+.4g} nats ± {se_d:.2g} (z = {z:.2f}), paired "
        f"bootstrap 95% interval of the perplexity difference [{lo:.4g}, {hi:.4g}] — "
        + ("a real difference." if flagged else "not distinguishable from zero.")
    )
    table = pd.DataFrame({"statistic": list(stats), "value": list(stats.values())})
    return PairedComparison(table=table, flagged=flagged, verdict=verdict, stats=stats)


def position_loss_difference(a: LastWordResult, b: LastWordResult, *, context_window: int = 16) -> pd.DataFrame:
    """Mean per-token loss difference (NLL of b − NLL of a) over documents, by token position.

    Two alignments: ``axis="from_start"`` counts text tokens from the first one (0); ``axis="from_target"``
    counts from the target's first token (0, 1, … target tokens; −1, −2, … the last ``context_window``
    context tokens). Each row holds the mean, its standard error (sd n−1 / √n) and the number of
    documents with a value there; positions where either run has no prediction (the first token of a
    run without BOS) are left out. Both runs must score the same documents with the same tokenizer.

    >>> from parity_kit.analyses.evaluation import evaluate_lastword
    >>> from parity_kit.models import load
    >>> model, tok = load("tiny-internlm2-llama")
    >>> items = [{"context": "The cat sat on the", "target": " mat"},
    ...          {"context": "A dog ran to the", "target": " park"}]
    >>> runs = [evaluate_lastword(model, tok, items, prepend_bos=b, n_bootstrap=10, progress=False)
    ...         for b in (True, False)]
    >>> df = position_loss_difference(*runs)
    >>> sorted(df["axis"].unique()), int(df["position"][df["axis"] == "from_start"].min())
    (['from_start', 'from_target'], 1)
    """
    for r in (a, b):
        if "token_logprobs" not in r.per_doc.columns:
            raise ParityKitError(f"result {r.label or ''!r} has no per-token log-probabilities; "
                                 "use results of evaluate_lastword, not from_loglikelihoods")
    if a.n != b.n or a.per_doc["n_context_tokens"].tolist() != b.per_doc["n_context_tokens"].tolist() \
            or a.per_doc["n_target_tokens"].tolist() != b.per_doc["n_target_tokens"].tolist():
        raise ParityKitError("the runs tokenised the documents differently (token counts differ); compare runs of "
                             "the same items with the same tokenizer")
    by_start: dict[int, list[float]] = {}
    by_target: dict[int, list[float]] = {}
    for lp_a, lp_b, n_ctx in zip(a.per_doc["token_logprobs"], b.per_doc["token_logprobs"],
                                 a.per_doc["n_context_tokens"]):
        diff = np.asarray(lp_a) - np.asarray(lp_b)  # NLL_b - NLL_a
        for j, v in enumerate(diff):
            if np.isnan(v):
                continue
            by_start.setdefault(j, []).append(float(v))
            rel = j - int(n_ctx)
            if rel >= -context_window:
                by_target.setdefault(rel, []).append(float(v))
    rows = []
    for axis, groups in (("from_start", by_start), ("from_target", by_target)):
        for pos in sorted(groups):
            vals = np.asarray(groups[pos])
            sem = float(np.std(vals, ddof=1) / math.sqrt(vals.size)) if vals.size > 1 else math.nan
            rows.append({"axis": axis, "position": pos, "mean": float(vals.mean()), "stderr": sem,
                         "n_docs": int(vals.size)})
    return pd.DataFrame(rows, columns=["axis", "position", "mean", "stderr", "n_docs"])
