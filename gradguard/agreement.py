"""Static and runtime findings side by side: the mistakes that both the source and the run show.

``gradguard run --lint`` and ``gradguard report --lint`` lint the program's files and add
what ``gradguard lint`` found to the report, under ``static``. A runtime finding and a
static one agree when they have the same code and file, and the runtime line is one of
the lines the static finding concerns (the ``step()`` of a missing reset, its
``backward()``, its loop). Each finding of either side then says which sides saw it, in
``seen_by``: a mistake the source shows but the run never reached is listed too.

Example:
    >>> from gradguard.findings import Finding, Location, Severity
    >>> run = Finding("GG101", "missing-zero-grad", Severity.WARNING, "applied twice", location=Location("t.py", 9))
    >>> lint = Finding("GG101", "missing-zero-grad", Severity.WARNING, "no reset", location=Location("t.py", 9),
    ...                data={"lines": [5, 8, 9]})
    >>> report = agree({"findings": [run.to_dict()], "summary": {}}, [lint], files=1)
    >>> report["findings"][0]["seen_by"], report["static"][0]["seen_by"], report["summary"]["agreed"]
    (['runtime', 'static'], ['static', 'runtime'], 1)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

from gradguard.findings import Finding, Location

_SITE = ("site-packages", "dist-packages")


def lint_beside(
    report: Mapping[str, Any],
    files: Iterable[str],
    *,
    select: Iterable[str] = (),
    ignore: Iterable[str] = (),
) -> dict[str, Any]:
    """``report`` with the findings of ``gradguard lint`` on ``files``, the script the run executed
    and every file a runtime finding names (libraries left out), marked as in :func:`agree`."""
    from gradguard.lint import lint_paths

    base = _base(report)
    wanted: dict[str, None] = {}
    command = report.get("command") if isinstance(report.get("command"), Mapping) else {}
    named = [str(command.get("script") or "")] if command else []
    for item in report.get("findings") or []:
        location = item.get("location") if isinstance(item, Mapping) else None
        if isinstance(location, Mapping) and location.get("file"):
            named.append(str(location["file"]))
    for file in [*files, *named]:
        full = os.path.normpath(os.path.join(base, file)) if file else ""
        if full.endswith((".py", ".ipynb")) and os.path.isfile(full) and not any(s in full for s in _SITE):
            wanted.setdefault(full)
    result = lint_paths(sorted(wanted), select=tuple(select), ignore=tuple(ignore))
    static = [_relative(f, base) for f in result.findings if f.code != "GG000"]
    return agree(report, static, files=len(wanted))


def agree(report: Mapping[str, Any], static: list[Finding], *, files: int) -> dict[str, Any]:
    """A copy of ``report`` with ``static`` added and every finding's ``seen_by`` set.

    ``summary`` gains ``static`` (how many static findings), ``static_files`` and ``agreed``
    (how many runtime findings the source shows too).
    """
    base = _base(report)
    runtime = [dict(item) for item in report.get("findings") or [] if isinstance(item, Mapping)]
    static_items = []
    matched: set[int] = set()
    for finding in static:
        item = finding.to_dict()
        item["seen_by"] = ["static"]
        for i, other in enumerate(runtime):
            if _same(other, finding, base):
                item["seen_by"] = ["static", "runtime"]
                matched.add(i)
        static_items.append(item)
    for i, item in enumerate(runtime):
        item["seen_by"] = ["runtime", "static"] if i in matched else ["runtime"]
    out = dict(report)
    out["findings"] = runtime
    out["static"] = static_items
    summary = dict(report.get("summary") or {})
    summary.update(static=len(static_items), static_files=files, agreed=len(matched))
    out["summary"] = summary
    return out


def _same(item: Mapping[str, Any], finding: Finding, base: str) -> bool:
    location = item.get("location")
    if item.get("code") != finding.code or not isinstance(location, Mapping) or finding.location is None:
        return False
    if _full(str(location.get("file", "")), base) != _full(finding.location.file, base):
        return False
    lines = {finding.location.line, *(finding.data.get("lines") or ())}
    return location.get("line") in lines


def _base(report: Mapping[str, Any]) -> str:
    """The folder the run started in: the files of its findings are relative to it."""
    command = report.get("command")
    cwd = command.get("cwd") if isinstance(command, Mapping) else None
    return cwd if isinstance(cwd, str) and os.path.isabs(cwd) else os.getcwd()


def _full(file: str, base: str) -> str:
    return os.path.normcase(os.path.normpath(os.path.join(base, file)))


def _relative(finding: Finding, base: str) -> Finding:
    """The finding with its file relative to ``base`` when below it (as runtime findings are)."""
    if finding.location is None:
        return finding
    from gradguard.formats import relative_path

    file, _inside = relative_path(finding.location.file, base)
    location = Location(file, finding.location.line, finding.location.function)
    return dataclasses.replace(finding, location=location)
