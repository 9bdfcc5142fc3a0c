"""The command line: ``gradguard run``, ``gradguard report``, ``gradguard explain``, ``gradguard rules``."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import signal
import sys
import traceback
from collections.abc import Sequence
from types import FrameType, TracebackType
from typing import Any, NoReturn

from gradguard._version import __version__
from gradguard.errors import ConfigurationError
from gradguard.explain import explain, rules_table
from gradguard.findings import Finding, Severity
from gradguard.install import install, uninstall
from gradguard.report import format_summary
from gradguard.sampling import PER_GROUP

EXIT_USAGE = 2
EXIT_STRICT = 3
DEFAULT_JSON = "gradguard-report.json"


class _Parser(argparse.ArgumentParser):
    """Errors in one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"gradguard: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gradguard",
        description="Catch the silent mistakes of PyTorch training loops while they run.",
    )
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a training script unchanged under gradguard",
        description="Run SCRIPT exactly as `python SCRIPT ARGS` would, watching every model and optimizer.",
    )
    run.add_argument("--json", metavar="PATH", default=DEFAULT_JSON, help=f"JSON report path (default {DEFAULT_JSON})")
    run.add_argument("--no-json", action="store_true", help="write no JSON report")
    run.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report")
    run.add_argument("--policy", choices=["warn", "raise", "collect"], default="warn", help="what a finding does")
    run.add_argument("--strict", action="store_true", help=f"exit with {EXIT_STRICT} if any warning or error was found")
    run.add_argument("--select", action="append", default=[], metavar="CODES", help="code prefixes or names to keep")
    run.add_argument("--ignore", action="append", default=[], metavar="CODES", help="code prefixes or names to drop")
    run.add_argument(
        "--budget",
        type=_budget,
        default=PER_GROUP,
        metavar="N|all",
        help=f"parameter tensors per param group that per-parameter checks look at per step after the "
        f"first 32 steps (default {PER_GROUP}); 'all' looks at every tensor at every step",
    )
    run.add_argument("script", metavar="SCRIPT", help="the Python script to run")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the script's own arguments")

    rep = sub.add_parser(
        "report",
        help="summarise a JSON report, or turn it into HTML",
        description="Print the findings of a JSON report written by `gradguard run` or Guard.write_json().",
    )
    rep.add_argument("report", metavar="JSON", help="the JSON report")
    rep.add_argument("--html", metavar="PATH", help="write a self-contained HTML report there")

    exp = sub.add_parser(
        "explain", help="print a rule's page", description="Print what a rule detects and how to fix it."
    )
    exp.add_argument("rule", metavar="CODE", help="a code (GG101) or name (missing-zero-grad)")

    sub.add_parser("rules", help="list every rule", description="List every rule code and name.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradguard`` command; returns the exit code."""
    parser = _parser()
    ns = parser.parse_args(argv)
    if ns.command == "explain":
        try:
            sys.stdout.write(explain(ns.rule))
        except ConfigurationError as exc:
            parser.exit(EXIT_USAGE, f"gradguard: error: {exc}\n")
        return 0
    if ns.command == "rules":
        print(rules_table())
        return 0
    if ns.command == "report":
        return _report(parser, ns)
    return _run(parser, ns)


def _run(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    script = ns.script
    if not os.path.isfile(script):
        parser.exit(EXIT_USAGE, f"gradguard: error: no such script: {script}\n")
    json_path = None if ns.no_json else ns.json
    try:
        guard = install(policy=ns.policy, select=ns.select, ignore=ns.ignore, budget=ns.budget)
    except ConfigurationError as exc:
        parser.exit(EXIT_USAGE, f"gradguard: error: {exc}\n")

    def save(_finding: Any = None) -> None:
        if json_path is not None:
            guard.write_json(json_path)

    guard.finding_callbacks.append(save)  # nothing found is lost if the process dies
    code = _exec_script(script, list(ns.args))
    uninstall()
    try:
        save()
    except OSError as exc:
        print(f"gradguard: could not write {json_path}: {exc}", file=sys.stderr)
        json_path = None
    print(
        format_summary(
            guard.findings, steps=guard.step, overhead_s=guard.overhead_s, wall_s=guard.to_dict()["summary"]["wall_s"]
        ),
        file=sys.stderr,
    )
    if json_path is not None:
        print(f"gradguard: report written to {json_path}", file=sys.stderr)
    if ns.html:
        try:
            guard.write_html(ns.html)
            print(f"gradguard: HTML report written to {ns.html}", file=sys.stderr)
        except OSError as exc:
            print(f"gradguard: could not write {ns.html}: {exc}", file=sys.stderr)
    if ns.strict and code == 0 and any(f.severity >= Severity.WARNING for f in guard.findings):
        return EXIT_STRICT
    return code


def _report(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    try:
        with open(ns.report, encoding="utf-8") as fh:
            report = json.load(fh)
        findings = [Finding.from_dict(f) for f in report.get("findings", [])]
        summary = report.get("summary", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        parser.exit(EXIT_USAGE, f"gradguard: error: cannot read report {ns.report}: {exc}\n")
    print(
        format_summary(
            findings,
            steps=int(summary.get("steps", 0)),
            overhead_s=float(summary.get("overhead_s", 0.0)),
            wall_s=float(summary.get("wall_s", 0.0)),
        )
    )
    if ns.html:
        from gradguard.report_html import write_html

        try:
            write_html(report, ns.html)
        except OSError as exc:
            parser.exit(1, f"gradguard: error: could not write {ns.html}: {exc}\n")
        print(f"gradguard: HTML report written to {ns.html}", file=sys.stderr)
    return 0


def _budget(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of tensors or 'all' but got {text!r}")
    return value


def _exec_script(script: str, args: list[str]) -> int:
    """Run ``script`` as ``python script args`` would; return its exit code."""
    path = os.path.abspath(script)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(path))
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        runpy.run_path(path, run_name="__main__")
        return 0
    except SystemExit as exc:
        return _exit_code(exc.code)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", file=sys.stderr)
        return 130
    except BaseException as exc:
        _print_user_traceback(exc, path)
        return 1
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
        if previous is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.stdout.flush()


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _print_user_traceback(exc: BaseException, script: str) -> None:
    tb: TracebackType | None = exc.__traceback__
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != script:
        tb = tb.tb_next
    # Start at the script's own frame, as `python SCRIPT` would; a script that never ran
    # (a SyntaxError) shows the error alone.
    traceback.print_exception(type(exc), exc, tb)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
