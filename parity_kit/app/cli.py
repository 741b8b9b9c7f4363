"""The ``parity-kit`` command: ``env``, ``demo``, ``notebooks``, ``train``, ``convert``, ``report``, ``triage``.

Each subcommand imports what it needs when it runs, so a module that is missing or broken only
affects its own subcommand (``parity-kit env`` keeps working).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ParityKitError

_CONVERTERS = {
    # direction -> (module, function)
    "internlm2-to-llama": ("parity_kit.models.convert", "convert_internlm2_to_llama"),
    "rwkv7-to-fla": ("parity_kit.models.rwkv7_convert", "convert_rwkv7_to_fla"),
}
# the spellings of earlier versions keep working
_CONVERTER_ALIASES = {"internlm2-llama": "internlm2-to-llama", "rwkv7-fla": "rwkv7-to-fla"}


def _load(module: str, function: str, command: str) -> Callable[..., Any]:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ParityKitError(
            f"`parity-kit {command}` needs {module}, which cannot be imported here ({e}); "
            "reinstall the package (pip install -e .) or update your checkout"
        ) from None
    fn = getattr(mod, function, None)
    if fn is None:
        raise ParityKitError(f"`parity-kit {command}` needs {module}.{function}, which does not exist in this version")
    return fn


def _cmd_env(args: argparse.Namespace) -> int:
    from .._util.environment import environment_capsule

    capsule = environment_capsule()
    if args.json:
        print(json.dumps(capsule, indent=2))
    else:
        width = max(map(len, capsule))
        for key, value in capsule.items():
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            print(f"{key:<{width}}  {'-' if shown is None or shown == '' else shown}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo, summary_table

    results = run_demo(args.notebooks, args.reports, only=args.only, smoke=args.smoke)
    print()
    print(summary_table(results))
    print(f"\nreports in {Path(args.reports).resolve()}")
    failed = [r.name for r in results if r.status != "ok"]
    if failed:
        print(f"{len(failed)} of {len(results)} notebooks did not finish cleanly: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _cmd_notebooks(args: argparse.Namespace) -> int:
    from .notebooks_command import copy_notebooks

    copied = copy_notebooks(args.dest, overwrite=args.overwrite)
    for path in copied:
        print(path)
    print(f"\nopen them with: jupyter lab {args.dest}", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    train = _load("parity_kit.builtins.train", "train", "train")
    path = train(args.name, seed=args.seed, out_dir=args.out, bos=args.bos, device=args.device, steps=args.steps,
                 batch_size=args.batch_size)
    print(path)
    return 0


def _print_rows(rows: Sequence[Sequence[Any]]) -> None:
    """A conversion plan, one tensor per line: ``source -> target shape``."""
    for source, target, shape in rows:
        print(f"{source} -> {target} {tuple(shape)}")


def _cmd_convert(args: argparse.Namespace) -> int:
    direction = _CONVERTER_ALIASES.get(args.direction, args.direction)
    module, function = _CONVERTERS[direction]
    convert = _load(module, function, "convert")
    kwargs: dict[str, Any] = {"overwrite": args.overwrite}
    if args.dry_run:
        if direction != "internlm2-to-llama":
            raise ParityKitError(f"--dry-run is only supported for internlm2-to-llama, not {direction}")
        kwargs["dry_run"] = True
    result = convert(args.src, args.dst, **kwargs)
    if args.dry_run:
        _print_rows(result)
    elif isinstance(result, list):
        print(f"wrote {args.dst} ({len(result)} tensors)")
    elif result is not None:
        print(result)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report_command import make_report, parse_cli_value

    parameters = {name: parse_cli_value(value) for name, value in args.parameters or []}
    files = make_report(args.notebook, args.out, hide_code=args.hide_code, execute=not args.no_execute,
                        parameters=parameters, name=args.name)
    rows = [("notebook", files.executed), ("html", files.html), *(("findings", f) for f in files.findings),
            ("recordings", files.archive)]
    for kind, path in rows:
        print(f"{kind:<10}  {path if path is not None else '(none written)'}")
    if files.error is not None:
        print(f"parity-kit report: the notebook failed: {files.error}\n"
              f"its executed copy and HTML above show where; fix it and run again", file=sys.stderr)
        return 1
    if not files.findings:
        print("parity-kit report: note: the notebook wrote no findings file (its last cell should call "
              "pk.write_findings)", file=sys.stderr)
    return 0


def _cmd_triage(args: argparse.Namespace) -> int:
    from .triage_command import TriageRequest, run_request, verdict_from_findings, write_report

    request = TriageRequest(args.ref, args.cand, args.prompt, args.eval, args.eval_limit,
                            args.ref_dtype or args.dtype, args.cand_dtype or args.dtype, args.device, args.ref_attn,
                            args.cand_attn, args.ref_bos, args.cand_bos, args.quick, args.max_new_tokens)
    if args.out is None:
        print(run_request(request).verdict)
        return 0
    files, error = write_report(request, args.out)
    if error is not None:
        print(f"parity-kit triage: the triage notebook failed: {error}\nsee {files['html']}", file=sys.stderr)
        return 1
    print(verdict_from_findings(files["findings"]))
    for kind, path in files.items():
        print(f"{kind:<10}  {path}")
    return 0


def _add_triage(sub: Any) -> None:
    triage = sub.add_parser("triage", help="investigate two runs (inputs, config, weights, precision or bug, where, "
                                           "fix, consequences) and print the ranked causes")
    triage.add_argument("ref", help="reference: model folder or built-in name")
    triage.add_argument("cand", help="candidate: model folder or built-in name (the same one under other settings)")
    triage.add_argument("--prompt", default=None, help="text both pipelines encode (default: a chat-style line)")
    triage.add_argument("--eval", default=None, metavar="FILE", help="last-word JSONL for a paired evaluation")
    triage.add_argument("--eval-limit", type=int, default=None, metavar="N", help="evaluate the first N documents")
    triage.add_argument("--dtype", default="fp32", help="dtype of both runs (default fp32)")
    triage.add_argument("--ref-dtype", default=None)
    triage.add_argument("--cand-dtype", default=None)
    triage.add_argument("--device", default="cpu")
    triage.add_argument("--ref-attn", default=None, help="attention implementation of the reference (eager, sdpa)")
    triage.add_argument("--cand-attn", default=None)
    triage.add_argument("--ref-bos", choices=["auto", "on", "off"], default="auto",
                        help="BOS policy of the reference's pipeline (auto: as its tokenizer does)")
    triage.add_argument("--cand-bos", choices=["auto", "on", "off"], default="auto")
    triage.add_argument("--quick", action="store_true", help="skip the costly steps (fix for precision, consequences)")
    triage.add_argument("--max-new-tokens", type=int, default=24, help="greedy steps of the lockstep decoding")
    triage.add_argument("--out", default=None, metavar="DIR",
                        help="write triage.ipynb (executed), triage.html and triage.findings.json here")
    triage.set_defaults(func=_cmd_triage)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``parity-kit`` (exposed for documentation and tests).

    >>> build_parser().parse_args(["demo", "--smoke", "--only", "quickstart"]).only
    ['quickstart']
    """
    parser = argparse.ArgumentParser(
        prog="parity-kit", description="Numerical parity of language models: run the story notebooks, inspect the environment.",
        epilog="Errors are one line (exit 2 for bad input, 1 for an unexpected failure, 130 when interrupted); add --debug "
               "anywhere on the command line to print the traceback as well.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"parity-kit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    env = sub.add_parser("env", help="print the environment capsule (versions, device, TF32, SDPA, determinism)")
    env.add_argument("--json", action="store_true", help="print JSON instead of a table")
    env.set_defaults(func=_cmd_env)

    demo = sub.add_parser("demo", help="run every notebook headless; write reports/<name>.ipynb, .html, .findings.json")
    demo.add_argument("--smoke", action="store_true", help="shrink the work (CI): fewer prompts, shorter sequences")
    demo.add_argument("--only", action="append", metavar="NAME",
                      help="run only this notebook (00_quickstart or quickstart); repeatable")
    demo.add_argument("--reports", default="reports", metavar="DIR", help="output folder (default: reports)")
    demo.add_argument("--notebooks", default=None, metavar="DIR",
                      help="folder of notebooks to run (default: the ones shipped with the package)")
    demo.set_defaults(func=_cmd_demo)

    notebooks = sub.add_parser("notebooks", help="copy the story notebooks into DEST, to open and edit in JupyterLab")
    notebooks.add_argument("dest", type=Path, metavar="DEST", help="folder to copy into (created when missing)")
    notebooks.add_argument("--overwrite", action="store_true", help="replace notebooks already in DEST")
    notebooks.set_defaults(func=_cmd_notebooks)

    train = sub.add_parser("train", help="train a built-in tiny model reproducibly")
    train.add_argument("name", help="built-in model, e.g. tiny-internlm2 or tiny-rwkv7")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--bos", choices=["document", "sequence"], default="document",
                       help="BOS at the start of every packed document (default) or only at position 0 of every "
                            "training sequence (documents inside it separated by EOS)")
    train.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help="output folder (default: parity_kit/data/models/<name>)")
    train.add_argument("--device", default="cpu", help="where the training steps run: cpu (default) or cuda; "
                                                      "the held-out evaluation runs on the CPU")
    train.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    train.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the recipe's)")
    train.set_defaults(func=_cmd_train)

    convert = sub.add_parser("convert", help="convert a checkpoint folder between layouts")
    convert.add_argument("direction", choices=[*_CONVERTERS, *_CONVERTER_ALIASES],
                         help="internlm2-to-llama or rwkv7-to-fla (older spellings internlm2-llama, rwkv7-fla also work)")
    convert.add_argument("src", type=Path)
    convert.add_argument("dst", type=Path)
    convert.add_argument("--dry-run", action="store_true", help="print the planned tensors (source -> target shape) without writing (internlm2-to-llama)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination folder")
    convert.set_defaults(func=_cmd_convert)

    report = sub.add_parser("report", help="run a notebook headless and gather HTML, findings and recordings to attach")
    report.add_argument("notebook", type=Path, help="the notebook, e.g. 05_bug_report.ipynb from `parity-kit notebooks DEST`")
    report.add_argument("--out", default="reports", metavar="DIR", help="output folder (default: reports)")
    report.add_argument("--name", default=None, metavar="NAME",
                        help="name the outputs NAME.html, NAME.findings.json, ... (default: the notebook's file name)")
    report.add_argument("--hide-code", action="store_true",
                        help="leave the input cells out of the HTML (the parameters the run used stay, at the top)")
    report.add_argument("--no-execute", action="store_true", help="the notebook is already executed: only export it")
    report.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append", metavar=("NAME", "VALUE"),
                        help="set a parameter of the notebook's parameters cell (repeatable); VALUE is a Python "
                             "literal or plain text")
    report.set_defaults(func=_cmd_report)
    _add_triage(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``parity-kit`` console script; returns the exit status.

    A failure prints one line, ``parity-kit COMMAND: error: ...``, and returns 2 for a ParityKitError (bad
    input: the line says what to do), 1 for anything else (an unexpected failure, named by its type) and 130
    for Ctrl-C; ``--debug`` anywhere on the command line prints the traceback as well.

    >>> main(["env", "--json"]) == 0  # doctest: +SKIP
    True
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    args = build_parser().parse_args([a for a in args_list if a != "--debug"])
    try:
        return args.func(args)
    except ParityKitError as e:
        return _fail(args.command, str(e), debug, 2)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", debug, 130, prefix="")
    except Exception as e:  # noqa: BLE001  # anything else still ends in one line, not a traceback
        return _fail(args.command, f"{type(e).__name__}: {e} (an unexpected failure: run again with --debug for the "
                     "traceback, and report it)", debug, 1)


def _fail(command: str, message: str, debug: bool, status: int, prefix: str = "error: ") -> int:
    if debug:
        import traceback

        traceback.print_exc(file=sys.stderr)
    print(f"parity-kit {command}: {prefix}{' '.join(message.split())}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
