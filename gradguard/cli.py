"""The command line: ``gradguard run``, ``lint``, ``report``, ``explain`` and ``rules``.

Only ``run`` imports torch (when the guard starts): ``--help``, ``--version``, ``lint``,
``rules``, ``explain`` and ``report`` answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from gradguard._version import __version__
from gradguard.config import FORMATS, Config, load_config, parse_budget
from gradguard.errors import ConfigurationError
from gradguard.findings import Finding, Severity
from gradguard.outputs import Outputs, check_outputs

EXIT_FOUND = 1
EXIT_USAGE = 2
EXIT_STRICT = 3


class _Parser(argparse.ArgumentParser):
    """Errors in one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"gradguard: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gradguard",
        description="Catch the silent mistakes of PyTorch training loops while they run.",
        epilog="Settings may also come from [tool.gradguard] in pyproject.toml; options given here win.",
    )
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a training script unchanged under gradguard",
        usage="gradguard run [OPTIONS] (SCRIPT | -m MODULE) [ARGS ...]",
        description="Run SCRIPT (or -m MODULE) exactly as `python SCRIPT ARGS` would, watching every model and "
        "optimizer. Every output path is checked before the program starts.",
    )
    _outputs(run)
    run.add_argument("--no-json", action="store_true", help="write no JSON report")
    run.add_argument("--policy", choices=["warn", "raise", "collect"], help="what a finding does (default warn)")
    run.add_argument("--select", action="append", metavar="CODES", help="code prefixes or names to keep")
    run.add_argument("--ignore", action="append", metavar="CODES", help="code prefixes or names to drop")
    run.add_argument(
        "--budget",
        type=_budget,
        metavar="N|all",
        help="parameter tensors per param group that per-parameter checks look at per step after the "
        "first 32 steps (default 4); 'all' looks at every tensor at every step",
    )
    run.add_argument(
        "--lint",
        action="store_true",
        default=None,
        help="also lint the program's files, and mark the mistakes both the source and the run show",
    )
    run.add_argument("-m", dest="module", metavar="MODULE", help="run a module, as `python -m MODULE` would")
    run.add_argument("script", nargs="?", metavar="SCRIPT", help="the Python script to run")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the program's own arguments")

    rep = sub.add_parser(
        "report",
        help="print a JSON report as text, JSON, SARIF or GitHub annotations, or turn it into HTML",
        description="Print the findings of a JSON report written by `gradguard run` or Guard.write_json().",
    )
    rep.add_argument("report", metavar="JSON", help="the JSON report")
    rep.add_argument(
        "--lint", action="store_true", default=None, help="lint the files the report names, beside its findings"
    )
    _outputs(rep, json=False)

    lint = sub.add_parser(
        "lint",
        help="find the same mistakes in the source, before the run, with safe fixes",
        description="Check Python files and notebooks for the mistakes whose source shows them, under the "
        "codes of the runtime detectors. Exit 1 when a finding remains, 2 on bad input.",
    )
    lint.add_argument("paths", nargs="*", metavar="PATH", help="files and folders to lint (default: .)")
    lint.add_argument("--fix", action="store_true", help="apply the fixes that are always safe, in place")
    lint.add_argument("--diff", action="store_true", help="print the safe fixes as a diff; change nothing")
    lint.add_argument("--select", action="append", metavar="CODES", help="code prefixes or names to keep")
    lint.add_argument("--ignore", action="append", metavar="CODES", help="code prefixes or names to drop")
    lint.add_argument("--exclude", action="append", metavar="PATTERN", help="paths to leave out (fnmatch)")
    lint.add_argument("--exit-zero", action="store_true", help="exit 0 even when findings remain")
    lint.add_argument("--json", metavar="PATH", help="also write the findings as a JSON report")
    lint.add_argument("--sarif", metavar="PATH", help="also write a SARIF 2.1.0 report (for code scanning)")
    lint.add_argument(
        "--format", choices=FORMATS, help="what to print: text (default), json, sarif or github annotations"
    )
    lint.add_argument("--config", metavar="PYPROJECT", help="read [tool.gradguard] from this file")

    exp = sub.add_parser(
        "explain", help="print a rule's page", description="Print what a rule detects and how to fix it."
    )
    exp.add_argument("rule", metavar="CODE", help="a code (GG101) or name (missing-zero-grad)")
    exp.add_argument("--markdown", action="store_true", help="print the page as Markdown")

    sub.add_parser("rules", help="list every rule", description="List every rule code and name.")
    return parser


def _outputs(parser: argparse.ArgumentParser, json: bool = True) -> None:
    if json:
        parser.add_argument("--json", metavar="PATH", help="JSON report path (default gradguard-report.json)")
    parser.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    parser.add_argument("--sarif", metavar="PATH", help="write a SARIF 2.1.0 report (for code scanning)")
    parser.add_argument(
        "--format", choices=FORMATS, help="what to print at the end: text (default), json, sarif or github annotations"
    )
    parser.add_argument("--strict", action="store_true", default=None, help=f"exit {EXIT_STRICT} on a warning or error")
    parser.add_argument("--config", metavar="PYPROJECT", help="read [tool.gradguard] from this file")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradguard`` command; returns the exit code.

    A ``KeyboardInterrupt`` that ends the program run by ``gradguard run`` is raised again,
    after the report, so that Python ends the process as it does on Ctrl-C (status -2).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    ns = parser.parse_args(_split_run(argv, parser))
    try:
        if ns.command == "explain":
            return _explain(ns)
        if ns.command == "rules":
            from gradguard.explain import rules_table

            print(rules_table())
            return 0
        config = load_config(ns.config)
        if ns.command == "lint":
            return _lint(ns, config, argv)
        if ns.command == "report":
            return _report(ns, config)
        return _run(ns, config, argv)
    except ConfigurationError as exc:
        parser.exit(EXIT_USAGE, f"gradguard: error: {exc}\n")


def _split_run(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Put ``--`` before the program's own arguments, so that none is taken for gradguard's."""
    if not argv or argv[0] != "run":
        return argv
    run = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    takes_value = {s for a in run._actions if a.nargs != 0 for s in a.option_strings}
    i = 1
    while i < len(argv):
        token = argv[i]
        if token == "--":
            return argv
        if token == "-m":
            return [*argv[: i + 2], "--", *argv[i + 2 :]]
        if not token.startswith("-") or token == "-":
            return [*argv[:i], "--", *argv[i:]]
        i += 2 if token in takes_value else 1
    return argv


def _explain(ns: argparse.Namespace) -> int:
    from gradguard.explain import explain, explain_text

    page = explain(ns.rule) if ns.markdown else explain_text(ns.rule)
    sys.stdout.write(page.rstrip("\n") + "\n")
    return 0


def _settings(ns: argparse.Namespace, config: Config, *, run: bool) -> Outputs:
    json_path = None
    if run:
        if ns.no_json and ns.json is not None:
            raise ConfigurationError("--no-json and --json conflict: give one of them")
        json_path = None if ns.no_json else (ns.json if ns.json is not None else config.json)
    return Outputs(
        json=json_path,
        html=ns.html if ns.html is not None else config.html,
        sarif=ns.sarif if ns.sarif is not None else config.sarif,
        format=ns.format or config.format,
        strict=ns.strict if ns.strict is not None else config.strict,
    )


def _run(ns: argparse.Namespace, config: Config, argv: list[str]) -> int:
    target = ns.module if ns.module is not None else ns.script
    args = list(ns.args)
    if ns.script is not None and ns.module is not None:
        args = [ns.script, *args]
    if target is None:
        raise ConfigurationError("expected a SCRIPT to run, or -m MODULE")
    if ns.module is None and not os.path.isfile(target):
        raise ConfigurationError(f"no such script: {target}")
    if ns.module is not None and not _module_exists(ns.module):
        raise ConfigurationError(f"no module named {ns.module}")
    outputs = _settings(ns, config, run=True)
    check_outputs(outputs, program=None if ns.module is not None else target)

    from gradguard.install import installed, uninstall
    from gradguard.ledger import Autosave
    from gradguard.processes import Options, Session
    from gradguard.report import command_record

    if installed() is not None:
        raise ConfigurationError("a guard is installed in this process already: gradguard run starts its own")
    options = Options(  # the guard's, and those of the children the program starts
        policy=ns.policy or config.policy,
        select=tuple(ns.select if ns.select is not None else config.select),
        ignore=tuple(ns.ignore if ns.ignore is not None else config.ignore),
        budget=parse_budget(ns.budget) if ns.budget is not None else config.budget,
        json=os.path.abspath(outputs.json) if outputs.json is not None else None,
    )
    guard = options.install()
    record = command_record(["gradguard", *argv], module=ns.module)
    record["script"] = os.path.abspath(target) if ns.module is None else None
    record["module"] = ns.module
    guard.command = record

    session = Session(guard, options)  # this process's rank, its children, and their reports merged

    def save(_finding: Any = None) -> None:  # a rank other than 0, or a forked child, writes a file of its own
        session.save()

    def flush() -> None:  # keeps a report, once there is one, current: counts and steps
        if guard.ledger.version:
            save()

    def ending(signum: int) -> None:  # a signal is about to end the process (see gradguard.launch)
        save()  # a forked child (a worker) inherits the handler: the session tells it apart
        path = session.path()
        if session.role == "main" and path is not None:
            shown = outputs.json if outputs.json is not None and os.path.abspath(outputs.json) == path else path
            os.write(2, f"gradguard: {signal.Signals(signum).name}: JSON report written to {shown}\n".encode())

    guard.finding_callbacks.append(save)  # nothing found is lost if the process dies
    guard.autosave = Autosave(flush)  # nor, within seconds, how often it was seen and how far the run got
    from gradguard.launch import end_interrupted, run_module, run_script

    interrupted: KeyboardInterrupt | None = None
    try:
        with session.watching():
            code = run_module(ns.module, args, ending) if ns.module is not None else run_script(target, args, ending)
    except KeyboardInterrupt as exc:  # Ctrl-C, its traceback printed: the report, then end as Python does
        interrupted, code = exc, 130
    guard.autosave = None
    uninstall(force=True)
    report = session.finish()  # rank 0's holds every rank's findings; each process's, its children's
    if (ns.lint if ns.lint is not None else config.lint) and not session.quiet:
        from gradguard.agreement import lint_beside
        from gradguard.introspect.frames import program_files

        report = lint_beside(report, program_files(), ignore=options.ignore, select=options.select)
    if session.quiet:  # a rank other than 0: its own file; rank 0 prints its findings
        own = dataclasses.replace(outputs, json=session.path(), html=None, sarif=None)
        written = own.write(report, text_to_stderr=True, quiet=True)
    else:
        written = outputs.write(report, text_to_stderr=True)
    if interrupted is not None:
        end_interrupted(interrupted)
    if not written and code == 0:
        return 1
    if outputs.strict and code == 0 and _loud(report):
        return EXIT_STRICT
    return code


def _report(ns: argparse.Namespace, config: Config) -> int:
    from gradguard.ranks import merge_siblings
    from gradguard.report import load_report

    outputs = _settings(ns, config, run=False)
    check_outputs(outputs, program=None)
    report = load_report(ns.report)
    report, merged = merge_siblings(report, ns.report)
    if merged:  # the files of the run's other ranks and children, written beside it
        print(f"gradguard: merged {', '.join(merged)} with {ns.report}", file=sys.stderr)
    if ns.lint if ns.lint is not None else config.lint:
        from gradguard.agreement import lint_beside

        report = lint_beside(report, (), select=config.select, ignore=config.ignore)
    if not outputs.write(report, text_to_stderr=False):
        return 1
    return EXIT_STRICT if outputs.strict and _loud(report) else 0


def _lint(ns: argparse.Namespace, config: Config, argv: list[str]) -> int:
    from gradguard.lint import lint_paths
    from gradguard.lint.fixes import unified_diff
    from gradguard.report import command_record, write_text_atomic

    if ns.fix and ns.diff:
        raise ConfigurationError("--fix and --diff conflict: --diff shows the fixes, --fix applies them")
    outputs = Outputs(json=ns.json, sarif=ns.sarif, format=ns.format or config.format)
    check_outputs(outputs, program=None)
    result = lint_paths(
        ns.paths or ["."],
        select=ns.select if ns.select is not None else config.select,
        ignore=ns.ignore if ns.ignore is not None else config.ignore,
        exclude=[*config.exclude, *(ns.exclude or ())],
        fix=ns.fix or ns.diff,
    )
    for error in result.errors:
        print(f"gradguard lint: {error}", file=sys.stderr)
    changed = [r for r in result.files if r.fixed is not None]
    if ns.diff:
        for file in changed:
            content = file.new_content()
            if content is not None:
                sys.stdout.write(unified_diff(file.path, file.original, content))
        fixes, noun = sum(r.fixes_applied for r in changed), "file" if len(changed) == 1 else "files"
        print(f"gradguard lint: {fixes} fixes in {len(changed)} {noun}", file=sys.stderr)
        return EXIT_FOUND if changed and not ns.exit_zero else 0
    failed = False
    for file in changed:
        content = file.new_content()
        try:
            if content is not None:
                write_text_atomic(content, file.path, newline="")  # the file's own line endings
        except OSError as exc:
            print(f"gradguard lint: could not write {file.path}: {exc.strerror or exc}", file=sys.stderr)
            file.fixes_applied, failed = 0, True
    command = command_record(["gradguard", *argv], module="")
    command["module"] = None
    report = result.report(command)
    if not outputs.write(report, text_to_stderr=False):
        failed = True
    if ns.exit_zero:
        return 0
    return EXIT_FOUND if result.findings or result.errors or failed else 0


def _loud(report: dict[str, Any]) -> bool:
    return any(Finding.from_dict(f).severity >= Severity.WARNING for f in report["findings"])


def _module_exists(module: str) -> bool:
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
    finally:
        sys.path.pop(0)


def _budget(text: str) -> str:
    try:
        parse_budget(text)
        return text
    except ConfigurationError:
        raise argparse.ArgumentTypeError(f"expected a positive number of tensors or 'all' but got {text!r}") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
