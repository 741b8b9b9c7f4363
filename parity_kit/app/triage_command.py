"""``parity-kit triage REF CAND``: run :func:`parity_kit.triage` and print its ranked verdict; with ``--out DIR``
the triage runs inside a short notebook that is executed (papermill) and exported, so DIR holds
``triage.ipynb`` (executed), ``triage.html`` (self-contained) and ``triage.findings.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._util.atomic import atomic_write
from ..analyses.triage_verdict import Cause, verdict_text
from ..errors import ParityKitError

FINDINGS_NAME = "triage.findings.json"


@dataclass
class TriageRequest:
    """What the command line asked for: both runs' settings, the input, the eval set and the switches.

    >>> TriageRequest("a", "b").kwargs()["quick"]
    False
    """

    ref: str
    cand: str
    prompt: str | None = None
    eval_file: str | None = None
    eval_limit: int | None = None
    ref_dtype: str = "fp32"
    cand_dtype: str = "fp32"
    device: str = "cpu"
    ref_attn: str | None = None
    cand_attn: str | None = None
    ref_bos: str = "auto"
    cand_bos: str = "auto"
    quick: bool = False
    max_new_tokens: int = 24

    def kwargs(self) -> dict[str, Any]:
        """The literal arguments of the notebook's parameters cell (and of :func:`run_request`)."""
        return dict(vars(self))


def check_request(request: TriageRequest) -> None:
    """ParityKitError for settings that would only fail inside the triage (or be skipped by it): both models'
    names or folders, dtypes, BOS settings and the eval file, checked before any model loads or the notebook starts.

    >>> check_request(TriageRequest("a", "b", ref_dtype="fp12"))  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    parity_kit.errors.ParityKitError: unknown dtype 'fp12'; ...
    """
    from ..analyses.evaluation import load_lastword_items
    from ..dtypes import parse_dtype
    from ..models import locate

    locate(request.ref)
    locate(request.cand)
    parse_dtype(request.ref_dtype)
    parse_dtype(request.cand_dtype)
    for bos in (request.ref_bos, request.cand_bos):
        if bos not in ("auto", "on", "off"):
            raise ParityKitError(f"BOS setting {bos!r}: use auto (as the tokenizer does), on or off")
    if request.eval_file is not None:
        load_lastword_items(request.eval_file, limit=request.eval_limit)


def _pipeline(tokenizer: Any, bos: str) -> Any:
    if bos == "auto" or tokenizer is None:
        return None
    if bos not in ("on", "off"):
        raise ParityKitError(f"BOS setting {bos!r}: use auto (as the tokenizer does), on or off")
    return (tokenizer, {"prepend_bos": bos == "on"})


def run_request(request: TriageRequest, *, show_progress: bool = True) -> Any:
    """Load both runs and triage them; returns the :class:`parity_kit.analyses.triage.TriageResult`.

    >>> r = run_request(TriageRequest("tiny-internlm2-llama", "tiny-internlm2-llama", quick=True, cand_bos="off"),
    ...                 show_progress=False)
    >>> r.causes[0].kind
    'inputs'
    """
    from ..analyses.runs import RunSpec, load_run
    from ..analyses.triage import triage

    check_request(request)
    sides = []
    for name, dtype, attn, bos in ((request.ref, request.ref_dtype, request.ref_attn, request.ref_bos),
                                   (request.cand, request.cand_dtype, request.cand_attn, request.cand_bos)):
        spec = RunSpec(name, dtype, request.device, attn)
        model, tokenizer = load_run(spec)
        sides.append(((model, tokenizer), _pipeline(tokenizer, bos), spec.label + ("" if bos == "auto" else f" BOS {bos}")))
    labels = (sides[0][2], sides[1][2])
    if labels[0] == labels[1]:
        labels = (f"{labels[0]} (reference)", f"{labels[1]} (candidate)")
    return triage(sides[0][0], sides[1][0], ref_pipeline=sides[0][1], cand_pipeline=sides[1][1],
                  prompt=request.prompt, eval_items=request.eval_file, eval_limit=request.eval_limit,
                  quick=request.quick, max_new_tokens=request.max_new_tokens, labels=labels,
                  show_progress=show_progress)


def _notebook(request: TriageRequest, findings: Path) -> Any:
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = "\n".join(f"{k} = {v!r}" for k, v in request.kwargs().items())
    nb.cells = [
        nbformat.v4.new_markdown_cell(
            "# Triage\nThe whole investigation of two runs, in order: inputs, configuration and environment, "
            "weights, precision or bug (both in fp64), where (calibrated verdicts, own vs inherited error), the fix "
            "for precision, consequences. The verdict ranks the causes the measurements support."),
        nbformat.v4.new_code_cell(params + f"\nfindings_path = {str(findings)!r}", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "from parity_kit.app.triage_command import TriageRequest, run_request\n"
            "request = TriageRequest(ref, cand, prompt, eval_file, eval_limit, ref_dtype, cand_dtype, device, ref_attn,\n"
            "                        cand_attn, ref_bos, cand_bos, quick, max_new_tokens)\n"
            "result = run_request(request, show_progress=False)\nprint(result.verdict)"),
        nbformat.v4.new_markdown_cell("## The steps' findings"),
        nbformat.v4.new_code_cell("import json\nfor name, step in result.steps.items():\n"
                                  "    print(f'--- {name}')\n"
                                  "    print(json.dumps(result.findings()['steps'][name], indent=1)[:3000])"),
        nbformat.v4.new_markdown_cell("## Tables: config differences, weights, the calibrated comparison"),
        nbformat.v4.new_code_cell("from IPython.display import display\nfor name, table in result.tables.items():\n"
                                  "    print(name)\n    display(table.head(30))"),
        nbformat.v4.new_code_cell("result.save(findings_path)"),
    ]
    return nb


def write_report(request: TriageRequest, out: str | Path) -> tuple[dict[str, Path], str | None]:
    """Execute the triage notebook into ``out``: executed notebook, HTML and findings; returns the paths and the
    notebook's error (None when it ran to the end)."""
    import nbformat

    from ..present.report import export_html
    from .demo import execute_notebook

    check_request(request)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"notebook": folder / "triage.ipynb", "html": folder / "triage.html", "findings": folder / FINDINGS_NAME}
    source = folder / ".triage.source.ipynb"
    with atomic_write(source) as f:
        f.write(nbformat.writes(_notebook(request, files["findings"].resolve())))
    try:
        error = execute_notebook(source, files["notebook"], {}, progress=True)
    finally:
        source.unlink(missing_ok=True)
    export_html(files["notebook"], files["html"])
    return files, error


def verdict_from_findings(path: str | Path) -> str:
    """The verdict text of a findings file written by a triage.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "f.json")
    >>> _ = open(p, "w").write(json.dumps({"reference": "A", "candidate": "B", "causes": [
    ...     {"kind": "rounding only", "title": "rounding only", "evidence": [], "try": "", "names": [], "score": 70}]}))
    >>> verdict_from_findings(p).splitlines()[1]
    '1. [rounding only] rounding only'
    """
    data = json.loads(Path(path).read_text())
    causes = [Cause(c["kind"], c["title"], c["evidence"], c["try"], c["names"], c["score"]) for c in data["causes"]]
    return verdict_text(causes, data["reference"], data["candidate"])
