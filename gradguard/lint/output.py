"""The text of a lint report: one line per finding, ``path:line:col``, its fix, then a summary.

Example:
    >>> from gradguard.findings import Finding, Location, Severity
    >>> f = Finding("GG401", "requires-grad-typo", Severity.WARNING, "froze nothing", hint="Spell it requires_grad",
    ...             location=Location("train.py", 7), where="p", data={"column": 7, "fix": "Rename it"})
    >>> print(to_text({"kind": "lint", "summary": {"files": 3, "fixable": 1}, "findings": [f.to_dict()]}), end="")
    train.py:7:7: GG401 requires-grad-typo [warning] p: froze nothing
        fix: Spell it requires_grad
        --fix: Rename it
    gradguard lint: 1 finding in 3 files: 1 warning (1 fixable with --fix)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from gradguard.findings import Finding, Severity


def place(finding: Finding) -> str:
    """``path:line:col`` (``path:cell N:line:col`` in a notebook).

    >>> from gradguard.findings import Location, Severity
    >>> place(Finding("GG201", "graph-retained", Severity.WARNING, "m", location=Location("n.ipynb", 2),
    ...               data={"cell": 4, "column": 5}))
    'n.ipynb:cell 4:2:5'
    """
    if finding.location is None:
        return "<unknown>"
    cell = finding.data.get("cell")
    column = finding.data.get("column")
    parts = [finding.location.file]
    if cell is not None:
        parts.append(f"cell {cell}")
    parts.append(str(finding.location.line))
    if column is not None:
        parts.append(str(column))
    return ":".join(parts)


def finding_line(finding: Finding) -> str:
    """One finding on one line, ruff-style."""
    where = f" {finding.where}:" if finding.where else ":"
    return f"{place(finding)}: {finding.code} {finding.name} [{finding.severity.value}]{where} {finding.message}"


def to_text(report: Mapping[str, Any]) -> str:
    """Every finding with its fix, then one summary line."""
    findings = [Finding.from_dict(item) for item in report.get("findings") or []]
    summary = report.get("summary") or {}
    lines = []
    for finding in findings:
        lines.append(finding_line(finding))
        if finding.hint:
            lines.append(f"    fix: {finding.hint}")
        if finding.data.get("fix"):
            lines.append(f"    --fix: {finding.data['fix']}")
    lines.append(summary_line(findings, summary))
    return "\n".join(lines) + "\n"


def summary_line(findings: list[Finding], summary: Mapping[str, Any]) -> str:
    """``gradguard lint: 2 findings in 9 files: 2 warnings (1 fixable with --fix)``, and what was fixed.

    >>> summary_line([], {"files": 1, "fixed": 2, "suppressed": 1})
    'gradguard lint: 0 findings in 1 file, 1 suppressed by comments; 2 fixed'
    """
    files = int(summary.get("files", 0))
    noun = "finding" if len(findings) == 1 else "findings"
    text = f"gradguard lint: {len(findings)} {noun} in {files} {'file' if files == 1 else 'files'}"
    counts = Counter(f.severity for f in findings)
    tally = ", ".join(
        f"{counts[s]} {s.value}" + ("s" if counts[s] > 1 and s is not Severity.INFO else "")
        for s in (Severity.ERROR, Severity.WARNING, Severity.INFO)
        if counts[s]
    )
    if tally:
        text += f": {tally}"
    if summary.get("suppressed"):
        text += f", {summary['suppressed']} suppressed by comments"
    if summary.get("fixable"):
        text += f" ({summary['fixable']} fixable with --fix)"
    if summary.get("fixed"):
        text += f"; {summary['fixed']} fixed"
    if summary.get("unparsable"):
        text += f"; {summary['unparsable']} could not be read or parsed"
    return text
