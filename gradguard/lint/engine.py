"""Lint files and folders: find the sources, run the rules, apply the safe fixes.

Every rule runs on every file; a rule that fails on a file is reported there as ``GG000``
and the other rules go on. A ``# gradguard: ignore[CODE]`` comment on a finding's line
drops it, as at run time. Nothing here imports torch.

Example:
    >>> findings = lint_text("for x, y in data:\\n    p.requres_grad = False\\n", "t.py")
    >>> [(f.code, f.location.line) for f in findings]
    [('GG401', 2)]
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

from gradguard import pages
from gradguard._version import __version__
from gradguard.findings import Finding, Location, Severity
from gradguard.lint.files import discover, display_path
from gradguard.lint.fixes import apply_fixes
from gradguard.lint.notebook import Notebook
from gradguard.lint.rule import Hit, LintRule
from gradguard.lint.rules import RULES
from gradguard.lint.source import Fix, Source
from gradguard.policy import Policy
from gradguard.suppress import ignored_in

_MAX_PASSES = 4


@dataclasses.dataclass
class FileResult:
    """What linting one file found; ``fixed`` is its text after the safe fixes (``None``: nothing fixed)."""

    path: str
    findings: list[Finding] = dataclasses.field(default_factory=list)
    error: str | None = None
    suppressed: int = 0
    fixable: int = 0
    fixed: str | None = None
    fixes_applied: int = 0
    original: str = ""
    notebook: Notebook | None = None

    def new_content(self) -> str | None:
        """The file's new content once fixed (a notebook's JSON), or ``None``."""
        if self.fixed is None:
            return None
        return self.notebook.render(self.fixed) if self.notebook is not None else self.fixed


@dataclasses.dataclass
class LintResult:
    """The results of every file, in the order the files were found."""

    files: list[FileResult]

    @property
    def findings(self) -> list[Finding]:
        return [f for result in self.files for f in result.findings]

    @property
    def errors(self) -> list[str]:
        return [f"{r.path}: {r.error}" for r in self.files if r.error is not None]

    def report(self, command: dict[str, Any] | None = None) -> dict[str, Any]:
        """A report dict that :mod:`gradguard.formats` renders (text, JSON, SARIF, GitHub)."""
        report: dict[str, Any] = {
            "gradguard": __version__,
            "kind": "lint",
            "summary": {
                "files": len(self.files),
                "findings": len(self.findings),
                "suppressed": sum(r.suppressed for r in self.files),
                "fixable": sum(r.fixable for r in self.files),
                "fixed": sum(r.fixes_applied for r in self.files),
                "unparsable": len(self.errors),
            },
            "errors": self.errors,
            "findings": [f.to_dict() for f in self.findings],
        }
        if command is not None:
            report["command"] = command
        return report


def rules(select: Iterable[str] | str | None = None, ignore: Iterable[str] | str | None = None) -> list[LintRule]:
    """An instance of each static rule that ``select`` and ``ignore`` (codes, prefixes or names) keep."""
    policy = Policy.of("collect", select, ignore)
    return [rule() for rule in RULES if policy.enabled(rule.code)]


def lint_text(
    text: str,
    path: str = "<string>",
    *,
    select: Iterable[str] | str | None = None,
    ignore: Iterable[str] | str | None = None,
) -> list[Finding]:
    """The findings in one Python source. A ``SyntaxError`` propagates."""
    return check(Source(path, text), rules(select, ignore))[0]


def lint_paths(
    paths: Sequence[str],
    *,
    select: Iterable[str] | str | None = None,
    ignore: Iterable[str] | str | None = None,
    exclude: Sequence[str] = (),
    fix: bool = False,
) -> LintResult:
    """Lint files and folders (``.py`` and ``.ipynb`` files, searched recursively).

    With ``fix``, each file's safe fixes are applied to its text (in :attr:`FileResult.fixed`;
    nothing is written) and the findings are those that remain.
    """
    active = rules(select, ignore)
    return LintResult([lint_file(path, active, fix=fix) for path in discover(paths, exclude)])


def lint_file(path: str, active: list[LintRule], *, fix: bool = False) -> FileResult:
    """Lint one file with the ``active`` rules; a file that cannot be read or parsed has an ``error``.

    A file that contains none of the words the rules look for (:meth:`LintRule.relevant`) is
    not parsed: most files of a project have no training loop, and parsing is most of the cost.
    """
    result = FileResult(display_path(path))
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        result.error = f"cannot read: {exc}"
        return result
    result.original = text
    cells = None
    if path.endswith(".ipynb"):
        try:
            result.notebook = Notebook(path, text)
        except ValueError as exc:
            result.error = str(exc)
            return result
        text, cells = result.notebook.text, result.notebook.cells
    here = [rule for rule in active if rule.relevant(text)]
    if not here:
        return result  # nothing any rule looks for: not even parsed
    try:
        source = Source(result.path, text, cells=cells)
    except (SyntaxError, ValueError) as exc:
        line = f":{exc.lineno}" if isinstance(exc, SyntaxError) and exc.lineno else ""
        message = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        result.error = f"cannot parse{line}: {message}"
        return result
    findings, fixes, result.suppressed = check(source, here)
    if fix and fixes:
        for _ in range(_MAX_PASSES):
            new_text, applied = apply_fixes(source.text, fixes)
            try:
                fixed = Source(result.path, new_text, cells=cells)
            except (SyntaxError, ValueError):
                break  # a fix that breaks the file is never applied
            result.fixed, result.fixes_applied = new_text, result.fixes_applied + applied
            source.release()
            source = fixed
            findings, fixes, result.suppressed = check(source, here)
            if not fixes:
                break
    source.release()
    result.findings = findings
    result.fixable = len(fixes)
    return result


def check(source: Source, active: Iterable[LintRule]) -> tuple[list[Finding], list[Fix], int]:
    """Run the rules on one source: its findings (in line order), their fixes, how many comments dropped."""
    findings: list[Finding] = []
    fixes: list[Fix] = []
    suppressed = 0
    for rule in active:
        try:
            hits = list(rule.check(source))
        except Exception as exc:  # a rule's bug must not stop the others
            findings.append(_internal_error(rule, source, exc))
            continue
        for hit in hits:
            line = hit.node.lineno  # type: ignore[attr-defined]
            if rule.code.startswith(ignored_in(source.line_text(line))):
                suppressed += 1
                continue
            findings.append(_finding(rule, source, hit))
            if hit.fix is not None:
                fixes.append(hit.fix)
    findings.sort(key=lambda f: (f.location.line if f.location else 0, f.data.get("column", 0), f.code))
    return findings, fixes, suppressed


def _finding(rule: LintRule, source: Source, hit: Hit) -> Finding:
    line, cell = source.place(hit.node.lineno)  # type: ignore[attr-defined]
    data: dict[str, Any] = {"column": source.column(hit.node)}
    if cell is not None:
        data["cell"] = cell
    data["lines"] = sorted({source.place(n)[0] for n in (line, *hit.lines)})
    if hit.fix is not None:
        data["fix"] = hit.fix.title
    data.update(hit.data)
    return Finding(
        code=rule.code,
        name=rule.name,
        severity=Severity(pages.default_severity(rule.code)),
        message=hit.message,
        hint=rule.hint,
        location=Location(source.path, line, source.function_of(hit.node)),
        where=hit.where,
        data=data,
    )


def _internal_error(rule: LintRule, source: Source, exc: Exception) -> Finding:
    return Finding(
        code="GG000",
        name="internal-error",
        severity=Severity.WARNING,
        message=f"static rule {rule.code} {rule.name} failed on this file with {type(exc).__name__}: {exc}; "
        "the other rules went on",
        hint="Report it with the traceback in the JSON report; meanwhile --ignore the rule",
        location=Location(source.path, 1, "<module>"),
        where=rule.code,
        data={"traceback": traceback.format_exc(limit=-8)},
    )
