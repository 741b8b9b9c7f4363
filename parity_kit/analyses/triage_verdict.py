"""The verdict of a triage: its step findings turned into a ranked list of causes, each with its evidence and
what to try (:func:`rank_causes`), and the text :func:`parity_kit.triage` prints (:func:`verdict_text`).

Ranking rule. A cause with direct evidence (the inputs, a config field, a weight) ranks above a symptom (a
module that computes differently); a config field or weight that differs ranks high only when the difference
stays in fp64 (the two compute different functions), else it is listed as "no measurable effect". A run
whose difference falls to the floor in fp64 is never called a bug: "rounding only" when every module is
within its calibrated floor, "precision" when some module loses more than rounding explains.

>>> steps = {"inputs": {"ids_differ": False}, "config": {"differences": []}, "weights": {"differing": []},
...          "precision or bug": {"branch": "precision", "output_rel_rms_high": 1e-16, "high_floor": 6.8e-8,
...                               "high_dtype": "fp64", "output_rel_rms_run": 1e-3, "run_dtypes": ["fp32", "bf16"]},
...          "where": {"verdict": "healthy", "culprits": [], "n_modules": 3, "n_modules_consistent": 3,
...                    "dtypes": ["fp32", "bf16"], "precision_sensitive": []},
...          "fix for precision": {"status": "skipped"}, "consequences": {"status": "skipped"}}
>>> [c.kind for c in rank_causes(steps)]
['rounding only']
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .triage_checks import FIELD_ADVICE

#: Scores behind the ranking (higher first); only their order matters.
SCORES = {"inputs": 100, "weights": 95, "config": 90, "computes differently": 85, "precision": 80,
          "unexplained": 60, "rounding only": 70, "no measurable effect": 30}


@dataclass
class Cause:
    """One candidate cause: ``kind`` ("inputs" | "config" | "weights" | "computes differently" | "precision" |
    "rounding only" | "unexplained" | "no measurable effect"), a one-line ``title``, the ``evidence`` lines
    behind it, what to ``try``, the ``names`` it blames (config fields, tensors or modules) and its ``score``."""

    kind: str
    title: str
    evidence: list[str] = field(default_factory=list)
    try_: str = ""
    names: list[str] = field(default_factory=list)
    score: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The cause as a JSON-ready dict (``try_`` spelled ``try``)."""
        d = asdict(self)
        d["try"] = d.pop("try_")
        return d


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _precision_line(prec: dict[str, Any]) -> str:
    high = prec["high_dtype"]
    if prec.get("falls_to_floor") is False:
        return (f"the difference stays in {high}: output rel_rms {prec['output_rel_rms_high']:.3g}, "
                f"×{prec['high_over_floor']:.3g} the floor of a correct fp32 run (run dtypes: rel_rms "
                f"{prec['output_rel_rms_run']:.3g})")
    return (f"in {high} the outputs agree to rel_rms {prec['output_rel_rms_high']:.3g} (within "
            f"{_fmt(prec.get('high_floor'))}, the floor of a correct fp32 run); in the run dtypes "
            f"{'/'.join(prec['run_dtypes'])}: rel_rms {prec['output_rel_rms_run']:.3g}")


def _culprit_lines(where: dict[str, Any], limit: int = 3) -> list[str]:
    dtypes = "/".join(where.get("dtypes", []))
    return [f"module {c['module']}" + (f" ({c['class']})" if c.get("class") else "")
            + f": own error ×{c['own_floor_ratio']:.3g} above its floor in {dtypes} ({c['own_cause']})"
            for c in where.get("culprits", [])[:limit]]


def _consequence_lines(cons: dict[str, Any]) -> list[str]:
    lines = []
    lock = cons.get("lockstep")
    if lock:
        step = lock.get("first_divergent_step")
        lines.append(f"greedy decoding ({cons.get('lockstep_inputs')}): " + (
            f"no divergence in {lock['steps']} steps" if step is None else f"first divergent token at step {step}"))
    ev = cons.get("eval")
    if ev:
        s = ev["stats"]
        lines.append(f"paired last-word evaluation on {ev['n']} documents: candidate perplexity "
                     f"{s['ppl_diff']:+.4g} vs reference, paired z = {s['z']:.2f}"
                     + (" (a real difference)" if ev["flagged"] else " (not distinguishable from zero)"))
    return lines


def _inputs_cause(inputs: dict[str, Any], cons: dict[str, Any]) -> Cause:
    bos = inputs.get("bos_token_id")
    ref_bos, cand_bos = inputs.get("reference_starts_with_bos"), inputs.get("candidate_starts_with_bos")
    if ref_bos and not cand_bos:
        title = f"inputs differ: the candidate has no BOS (the reference starts with token id {bos})"
        todo = f"prepend BOS (token id {bos}) in the candidate's pipeline, as the model saw it in training"
        names = ["BOS"]
    elif cand_bos and not ref_bos:
        title = f"inputs differ: the candidate adds a BOS (token id {bos}) the reference does not"
        todo = "give both pipelines the same BOS policy (the one the model was trained with)"
        names = ["BOS"]
    else:
        title = f"inputs differ at token position {inputs.get('first_difference')}"
        todo = "make both pipelines tokenize alike (special tokens, chat template, truncation)"
        names = ["token ids"]
    evidence = [f"token provenance: {inputs.get('summary')}",
                f"{inputs.get('n_tokens_reference')} vs {inputs.get('n_tokens_candidate')} tokens"]
    return Cause("inputs", title, evidence + _consequence_lines(cons), todo, names, SCORES["inputs"])


def _config_causes(config: dict[str, Any], prec: dict[str, Any], where: dict[str, Any], bug: bool) -> list[Cause]:
    causes = []
    for d in config.get("differences", []):
        if d["kind"] != "numerics":
            continue
        evidence = [f"{d['field']}: reference {_fmt(d['reference'])}, candidate {_fmt(d['candidate'])}",
                    _precision_line(prec)]
        if bug:
            causes.append(Cause("config", f"config: {d['field']} differs ({_fmt(d['reference'])} vs "
                                f"{_fmt(d['candidate'])})", evidence + _culprit_lines(where),
                                FIELD_ADVICE.get(d["field"], f"give the candidate the reference's {d['field']}"),
                                [d["field"]], SCORES["config"]))
        else:
            causes.append(Cause("no measurable effect", f"config: {d['field']} differs but the outputs agree to the "
                                "floor in high precision", evidence, "check it anyway: other inputs may show it",
                                [d["field"]], SCORES["no measurable effect"]))
    return causes


def _weights_cause(weights: dict[str, Any], prec: dict[str, Any], where: dict[str, Any], bug: bool) -> Cause | None:
    bad = [w for w in weights.get("differing", []) if w["status"] in ("differs", "shape mismatch")]
    if not bad:
        return None
    names = [w["candidate"] for w in bad]
    evidence = [f"{w['candidate']} vs {w['reference']}: {w['status']}"
                + (f", rel_rms {w['rel_rms']:.3g}, max |Δ| {w['max_abs']:.3g}" if w["status"] == "differs" else
                   f" {w['shape']}") for w in bad[:5]]
    evidence.append(_precision_line(prec))
    mapping = weights.get("mapping")
    if not bug:
        return Cause("no measurable effect", f"weights differ under the {mapping} mapping ({len(bad)} tensors) but "
                     "the outputs agree to the floor", evidence, "check the conversion anyway", names,
                     SCORES["no measurable effect"])
    return Cause("weights", f"weights differ under the {mapping} mapping: {', '.join(names[:3])}"
                 + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""), evidence + _culprit_lines(where),
                 "check how the conversion writes these tensors (a fused split, a transpose, a head permutation)",
                 names, SCORES["weights"])


def _precision_cause(prec: dict[str, Any], where: dict[str, Any], fix: dict[str, Any], cons: dict[str, Any]) -> Cause:
    dtypes = "/".join(where.get("dtypes", []))
    if where["verdict"] == "healthy":
        return Cause("rounding only", f"rounding only: within the floor in {prec['high_dtype']} and within the "
                     f"calibrated floor in {dtypes}",
                     [_precision_line(prec), f"{where['n_modules_consistent']} of {where['n_modules']} modules are "
                      "consistent with rounding"] + _consequence_lines(cons),
                     "nothing to fix: the two compute the same function; run in higher precision to shrink the "
                     "difference", [], SCORES["rounding only"])
    culprits = where.get("culprits", [])
    names = [c["module"] for c in culprits]
    evidence = [_precision_line(prec), *_culprit_lines(where)]
    todo = "keep the culprit modules in fp32"
    if fix.get("status") == "done":
        classes = fix.get("classes", [])
        if classes:
            top = classes[0]
            evidence.append(f"class sweep: {top['class']} in fp32 removes {100 * top['error_removed_fraction']:.1f}% "
                            f"of the {fix['low_dtype']} output error")
            todo = f"keep {top['class']} in fp32"
        chosen = fix.get("bisection", {}).get("chosen", [])
        if chosen:
            evidence.append(f"bisection: {fix['bisection']['summary']}")
            todo += f"; the bisection's minimal set: {', '.join(chosen[:5])}"
            names += [c for c in chosen if c not in names]
    title = (f"precision: {', '.join(names[:3])} lose(s) more than rounding in {dtypes}" if names
             else f"precision: above the calibrated floor in {dtypes} ({where['verdict']}), within it in "
                  f"{prec['high_dtype']}")
    return Cause("precision", title, evidence + _consequence_lines(cons), todo, names, SCORES["precision"])


def rank_causes(steps: dict[str, dict[str, Any]]) -> list[Cause]:
    """The causes the findings support, most likely first (see the module docstring for the rule)."""
    inputs, prec, where = steps["inputs"], steps["precision or bug"], steps["where"]
    cons, fix = steps.get("consequences", {}), steps.get("fix for precision", {})
    bug = prec["branch"] == "bug"
    causes: list[Cause] = []
    if inputs.get("ids_differ"):
        causes.append(_inputs_cause(inputs, cons))
    direct = _config_causes(steps["config"], prec, where, bug)
    weights = _weights_cause(steps["weights"], prec, where, bug)
    direct += [weights] if weights is not None else []
    causes += direct
    explained = any(c.kind in ("config", "weights") for c in direct)
    if bug and not explained:
        different = [c for c in where.get("culprits", []) if c["own_cause"] == "computes differently"]
        if different:
            causes.append(Cause("computes differently", f"{different[0]['module']} computes differently from the "
                                "reference", [_precision_line(prec), *_culprit_lines(where)],
                                "compare that module's code and weights in the two implementations",
                                [c["module"] for c in different], SCORES["computes differently"]))
        else:
            causes.append(Cause("unexplained", "the outputs differ in high precision, but no module's own error "
                                "points at one place", [_precision_line(prec)] + _consequence_lines(cons),
                                "narrow modules= or compare the two implementations' configs by hand", [],
                                SCORES["unexplained"]))
    if not bug:
        cause = _precision_cause(prec, where, fix, cons)
        if inputs.get("ids_differ") and cause.kind == "rounding only":
            cause.title = "on the same token ids: " + cause.title
            cause.score = 20.0
        causes.append(cause)
    return sorted(causes, key=lambda c: -c.score)


def verdict_text(causes: list[Cause], reference: str, candidate: str) -> str:
    """The ranked causes as printed text.

    >>> print(verdict_text([Cause("rounding only", "rounding only", ["a"], "nothing", [], 70)], "A", "B"))
    triage of B against A: 1 cause(s), most likely first
    1. [rounding only] rounding only
       - a
       try: nothing
    """
    lines = [f"triage of {candidate} against {reference}: {len(causes)} cause(s), most likely first"]
    for i, cause in enumerate(causes, 1):
        lines.append(f"{i}. [{cause.kind}] {cause.title}")
        lines += [f"   - {e}" for e in cause.evidence]
        if cause.try_:
            lines.append(f"   try: {cause.try_}")
    return "\n".join(lines)
