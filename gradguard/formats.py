"""A run report in other formats: text, JSON, SARIF 2.1.0 and GitHub Actions workflow commands.

Every renderer takes the report dict (what :func:`gradguard.report.build_report` returns,
as written to JSON or read back from it) and returns text ending with a newline, ready to
be written as it is. Nothing here imports torch: ``gradguard report`` answers at once.

>>> from gradguard.findings import Finding, Location, Severity
>>> f = Finding("GG101", "missing-zero-grad", Severity.WARNING, "applied twice",
...             hint="Call zero_grad()", location=Location("train.py", 9), where="fc.weight")
>>> report = {"summary": {"steps": 3}, "findings": [f.to_dict()]}
>>> print(render(report, "github", root="."), end="")
::warning file=train.py,line=9,title=GG101 missing-zero-grad::fc.weight: applied twice%0Afix: Call zero_grad()
gradguard: 1 finding in 3 steps: 1 warning
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import shlex
import urllib.parse
from collections import Counter
from collections.abc import Mapping
from typing import Any

from gradguard import pages, ranks
from gradguard._version import __version__
from gradguard.errors import ConfigurationError
from gradguard.explain import plain_text, render_terminal
from gradguard.findings import Finding, Severity
from gradguard.report import _json_default, format_summary
from gradguard.rules import RULES

FORMATS = ("text", "json", "sarif", "github")

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_VERSION = "2.1.0"
INFORMATION_URI = "https://github.com/gradguard/gradguard"
SRCROOT = "%SRCROOT%"

_SARIF_LEVELS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}
_GITHUB_COMMANDS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def render(report: Mapping[str, Any], fmt: str, *, root: str | None = None) -> str:
    """The report in format ``fmt`` (one of :data:`FORMATS`), as text ending with a newline.

    ``root`` is the folder that SARIF and GitHub paths are relative to (see :func:`to_sarif`
    and :func:`to_github`); text and JSON ignore it.

    >>> render({"summary": {"steps": 2}, "findings": []}, "text")
    'gradguard: 0 findings in 2 steps (gradguard took 0.00 s of 0.00 s)\\n'
    >>> render({}, "xml")
    Traceback (most recent call last):
    ...
    gradguard.errors.ConfigurationError: Expected fmt to be one of text, json, sarif, github but got 'xml'
    """
    if fmt == "text":
        return to_text(report)
    if fmt == "json":
        return to_json(report)
    if fmt == "sarif":
        return json.dumps(to_sarif(report, root=root), indent=2, allow_nan=False) + "\n"
    if fmt == "github":
        return to_github(report, root=root)
    raise ConfigurationError(f"Expected fmt to be one of {', '.join(FORMATS)} but got {fmt!r}")


def to_text(report: Mapping[str, Any]) -> str:
    """The terminal summary of :func:`gradguard.report.format_summary`, with a final newline.

    In a run of several ranks (``summary.world_size``), each finding says which ranks saw it.
    A lint report (``kind: "lint"``) lists each finding at its line and column; a run report
    that was linted too (``static``) lists the static findings after the runtime ones.
    """
    if isinstance(report, Mapping) and report.get("kind") == "lint":
        from gradguard.lint.output import to_text as lint_text

        return lint_text(report)
    findings = _findings(report)
    summary = _summary(report)
    return (
        format_summary(
            findings,
            steps=_number(summary, "steps", int),
            overhead_s=_number(summary, "overhead_s", float),
            wall_s=_number(summary, "wall_s", float),
            suppressed=_number(summary, "suppressed", int),
            world_size=max(_number(summary, "world_size", int), 1),
            ranks_seen=_ranks(report),
        )
        + "\n"
        + static_text(report)
    )


def static_text(report: Mapping[str, Any]) -> str:
    """The section of a run report that lists what ``gradguard lint`` found in the program's files.

    >>> from gradguard.findings import Finding, Location, Severity
    >>> f = Finding("GG201", "graph-retained", Severity.WARNING, "kept", location=Location("t.py", 4))
    >>> print(static_text({"static": [{**f.to_dict(), "seen_by": ["static", "runtime"]}],
    ...                    "summary": {"static_files": 2}}), end="")
    <BLANKLINE>
    gradguard lint: 1 finding in 2 files, 1 also seen while the program ran
      t.py:4: GG201 graph-retained [warning]: kept [seen at run time too]
    """
    items = report.get("static") if isinstance(report, Mapping) else None
    if not isinstance(items, list):
        return ""
    files = _number(_summary(report), "static_files", int)
    both = [item for item in items if isinstance(item, Mapping) and "runtime" in (item.get("seen_by") or ())]
    noun = "finding" if len(items) == 1 else "findings"
    lines = [
        "",
        f"gradguard lint: {len(items)} {noun} in {files} {'file' if files == 1 else 'files'}, "
        f"{len(both)} also seen while the program ran",
    ]
    for item, finding in zip(items, _findings({"findings": items}), strict=True):
        seen = " [seen at run time too]" if "runtime" in (item.get("seen_by") or ()) else " [not seen at run time]"
        lines.append(f"  {finding}{seen}")
    return "\n".join(lines) + "\n"


def to_json(report: Mapping[str, Any]) -> str:
    """The report as the JSON that :func:`gradguard.report.write_json_atomic` writes.

    >>> to_json({"findings": [], "where": ("a", "b")})
    '{\\n  "findings": [],\\n  "where": [\\n    "a",\\n    "b"\\n  ]\\n}\\n'
    """
    return json.dumps(report, indent=2, default=_json_default) + "\n"


def to_sarif(report: Mapping[str, Any], *, root: str | None = None) -> dict[str, Any]:
    """The report as a SARIF 2.1.0 log (a dict ready for :func:`json.dumps`), for code scanning.

    The driver lists every rule of :data:`gradguard.rules.RULES`, in order, with its page.
    A finding's file is written relative to ``root`` (default: the current directory) with
    ``uriBaseId`` ``%SRCROOT%``, or as an absolute ``file://`` URI when it lies outside.
    Relative files in the report are relative to the folder the run started in
    (``report["command"]["cwd"]`` when the report has it, else the current directory). A
    finding without a file and line is placed on the script the run executed, when the
    report names one, else it has no location. ``partialFingerprints`` hash the code,
    ``where``, file and function (not the line), so an edit above a finding keeps its
    alert.

    >>> from gradguard.findings import Finding, Location, Severity
    >>> f = Finding("GG601", "accumulation-batchnorm", Severity.INFO, "per micro-batch",
    ...             location=Location("/src/train.py", 40))
    >>> log = to_sarif({"gradguard": "1.0", "findings": [f.to_dict()]}, root="/src")
    >>> result = log["runs"][0]["results"][0]
    >>> result["ruleId"], result["level"], log["runs"][0]["tool"]["driver"]["rules"][result["ruleIndex"]]["id"]
    ('GG601', 'note', 'GG601')
    >>> result["locations"][0]["physicalLocation"]["artifactLocation"]
    {'uri': 'train.py', 'uriBaseId': '%SRCROOT%'}
    """
    findings, seen_by = _with_static(report)
    root_dir = os.path.abspath(root if root is not None else os.getcwd())
    command = _command(report)
    base = _base_dir(command)
    rules = list(RULES)
    index = {code: i for i, code in enumerate(rules)}

    results = []
    keys: list[str] = []
    ranks_seen = _ranks(report) + [[]] * (len(findings) - len(_findings(report)))
    for finding, seen, sides in zip(findings, ranks_seen, seen_by, strict=True):
        result: dict[str, Any] = {"ruleId": finding.code}
        if finding.code in index:
            result["ruleIndex"] = index[finding.code]
        result["level"] = _SARIF_LEVELS[finding.severity]
        result["message"] = {"text": _message(finding)}
        artifact = None
        if finding.location is not None and _is_file(finding.location.file):
            artifact = _artifact(finding.location.file, root_dir, base)
            physical: dict[str, Any] = {"artifactLocation": artifact}
            if finding.location.line >= 1:
                physical["region"] = {"startLine": finding.location.line}
                if isinstance(finding.data.get("column"), int):
                    physical["region"]["startColumn"] = finding.data["column"]
            result["locations"] = [{"physicalLocation": physical}]
        elif command.get("script") and _is_file(str(command["script"])):
            # Code scanning shows no result without a file: place it on the script that ran.
            script = _artifact(str(command["script"]), root_dir, base)
            result["locations"] = [
                {"physicalLocation": {"artifactLocation": script}, "message": {"text": "found while this script ran"}}
            ]
        keys.append(_fingerprint_key(finding, artifact))
        properties: dict[str, Any] = {"step": finding.step, "count": finding.count, "where": finding.where}
        if finding.location is not None and finding.location.function:
            properties["function"] = finding.location.function
        if seen:
            properties["ranks"] = seen
        if sides:
            properties["seenBy"] = sides
        properties["data"] = _json_safe(dict(finding.data))
        result["properties"] = properties
        results.append(result)
    for result, fingerprint in zip(results, _fingerprints(findings, keys), strict=True):
        result["partialFingerprints"] = {"gradguard/v1": fingerprint}

    invocation: dict[str, Any] = {"executionSuccessful": True}
    argv = command.get("argv")
    if isinstance(argv, (list, tuple)) and argv:
        invocation["commandLine"] = shlex.join(str(arg) for arg in argv)
        invocation["arguments"] = [str(arg) for arg in argv]
    cwd = command.get("cwd")
    if isinstance(cwd, str) and os.path.isabs(cwd):
        invocation["workingDirectory"] = {"uri": _dir_uri(cwd)}
    python = command.get("python")
    if isinstance(python, str) and os.path.isabs(python):
        invocation["executableLocation"] = {"uri": pathlib.Path(python).as_uri()}
    extra = {key: command[key] for key in ("script", "module") if command.get(key)}
    if extra:
        invocation["properties"] = _json_safe(extra)

    run: dict[str, Any] = {
        "tool": {
            "driver": {
                "name": "gradguard",
                "version": str(report.get("gradguard") or __version__),
                "informationUri": INFORMATION_URI,
                "rules": [_rule(code) for code in rules],
            }
        },
        "originalUriBaseIds": {SRCROOT: {"uri": _dir_uri(root_dir)}},
        "invocations": [invocation],
        "results": results,
    }
    properties = {key: report[key] for key in ("created", "summary") if key in report}
    if properties:
        run["properties"] = _json_safe(properties)
    return {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [run]}


def to_github(report: Mapping[str, Any], *, root: str | None = None) -> str:
    """The findings as GitHub Actions workflow commands, one line each, then a summary line.

    An error is an ``::error`` annotation, a warning a ``::warning`` one and an info a
    ``::notice``, on the finding's file and line, made relative to ``root`` (default: the
    ``GITHUB_WORKSPACE`` environment variable when set, else the current directory). Values
    are escaped as GitHub's toolkit escapes them, so a message keeps its newlines.

    >>> from gradguard.findings import Finding, Severity
    >>> f = Finding("GG301", "memory-growth", Severity.ERROR, "grew 5%\\nper step", where="model")
    >>> print(to_github({"summary": {"steps": 4}, "findings": [f.to_dict()]}), end="")
    ::error title=GG301 memory-growth::model: grew 5%25%0Aper step
    gradguard: 1 finding in 4 steps: 1 error
    """
    findings = _with_static(report)[0]
    root_dir = os.path.abspath(root if root is not None else os.environ.get("GITHUB_WORKSPACE") or os.getcwd())
    base = _base_dir(_command(report))
    lines = []
    for finding in sorted(findings, key=lambda f: (-f.severity.rank, f.code)):
        properties = []
        if finding.location is not None and _is_file(finding.location.file):
            path, _inside = relative_path(finding.location.file, root_dir, base=base)
            properties.append(("file", path))
            if finding.location.line >= 1:
                properties.append(("line", str(finding.location.line)))
                if isinstance(finding.data.get("column"), int):
                    properties.append(("col", str(finding.data["column"])))
        properties.append(("title", f"{finding.code} {finding.name}"))
        props = ",".join(f"{key}={_escape_property(value)}" for key, value in properties)
        lines.append(f"::{_GITHUB_COMMANDS[finding.severity]} {props}::{_escape_data(_message(finding))}")
    counts = Counter(f.severity for f in findings)
    noun = "finding" if len(findings) == 1 else "findings"
    tally = ", ".join(_count(counts[s], s) for s in (Severity.ERROR, Severity.WARNING, Severity.INFO) if counts[s])
    if report.get("kind") == "lint":
        files = _number(_summary(report), "files", int)
        scope = f"gradguard lint: {len(findings)} {noun} in {files} {'file' if files == 1 else 'files'}"
    else:
        scope = f"gradguard: {len(findings)} {noun} in {_number(_summary(report), 'steps', int)} steps"
    lines.append(scope + (f": {tally}" if tally else ""))
    return "\n".join(lines) + "\n"


def relative_path(file: str, root: str, *, base: str | None = None) -> tuple[str, bool]:
    """``file`` relative to ``root`` with ``/`` separators and ``True``, or absolute and ``False``.

    A relative ``file`` is first taken relative to ``base`` (default: the current directory).

    >>> relative_path("pkg/train.py", "/work", base="/work")
    ('pkg/train.py', True)
    >>> relative_path("../elsewhere/train.py", "/work/repo", base="/work/repo")
    ('/work/elsewhere/train.py', False)
    """
    path = os.path.normpath(os.path.join(os.path.abspath(base or os.getcwd()), file))
    try:
        rel = os.path.relpath(path, os.path.abspath(root))
    except ValueError:  # another drive on Windows
        return path, False
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return path, False
    return rel.replace(os.sep, "/"), True


def _count(n: int, severity: Severity) -> str:
    return f"{n} {severity.value}" if n == 1 or severity is Severity.INFO else f"{n} {severity.value}s"


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _message(finding: Finding) -> str:
    """What happened, on which object, and the fix."""
    where = f"{finding.where}: " if finding.where else ""
    seen = f" (seen {finding.count} times)" if finding.count > 1 else ""
    text = f"{where}{finding.message}{seen}"
    return f"{text}\nfix: {finding.hint}" if finding.hint else text


def _rule(code: str) -> dict[str, Any]:
    page = pages.markdown(code)
    text = render_terminal(page, width=100)
    tags = ["pytorch", "training"]
    if code == "GG000":
        tags.append("internal")
    elif code not in pages.implemented():
        tags.append("reserved")
    return {
        "id": code,
        "name": RULES[code],
        "shortDescription": {"text": plain_text(" ".join(pages.summary(code).split()))},
        "fullDescription": {"text": text, "markdown": page},
        "help": {"text": text, "markdown": page},
        "defaultConfiguration": {"level": _default_level(code)},
        "properties": {"tags": tags},
    }


def _default_level(code: str) -> str:
    return {"error": "error", "warning": "warning", "info": "note"}[pages.default_severity(code)]


def _artifact(file: str, root: str, base: str) -> dict[str, Any]:
    path, inside = relative_path(file, root, base=base)
    if inside:
        return {"uri": urllib.parse.quote(path, safe="/"), "uriBaseId": SRCROOT}
    return {"uri": pathlib.Path(path).as_uri()}


def _dir_uri(folder: str) -> str:
    uri = pathlib.Path(os.path.abspath(folder)).as_uri()
    return uri if uri.endswith("/") else uri + "/"


def _is_file(file: str) -> bool:
    """A real path, not ``<stdin>``, ``<string>`` or an empty name."""
    return bool(file) and not (file.startswith("<") and file.endswith(">"))


def _fingerprint_key(finding: Finding, artifact: Mapping[str, Any] | None) -> str:
    function = finding.location.function if finding.location is not None else ""
    file = artifact["uri"] if artifact is not None else ""
    parts = (finding.code, finding.where, file, function)
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:32]


def _fingerprints(findings: list[Finding], keys: list[str]) -> list[str]:
    """``key:n``, ``n`` numbering the findings that share a key in the order of their lines."""
    lines = [f.location.line if f.location is not None else 0 for f in findings]
    order = sorted(range(len(findings)), key=lambda i: (keys[i], lines[i], i))
    seen: Counter[str] = Counter()
    out = [""] * len(findings)
    for i in order:
        seen[keys[i]] += 1
        out[i] = f"{keys[i]}:{seen[keys[i]]}"
    return out


def _json_safe(value: Any) -> Any:
    """``value`` with only what strict JSON holds: no NaN or infinity, no tuples or objects."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(item) for item in value]
    return _json_safe(_json_default(value))


def _findings(report: Mapping[str, Any]) -> list[Finding]:
    if not isinstance(report, Mapping):
        raise ConfigurationError(f"Expected report to be a report dict but got {type(report).__name__}")
    items = report.get("findings") or []
    if not isinstance(items, list):
        raise ConfigurationError(f"Expected report['findings'] to be a list but got {type(items).__name__}")
    findings = []
    for i, item in enumerate(items):
        try:
            findings.append(Finding.from_dict(item))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigurationError(
                f"Expected report['findings'][{i}] to be a finding (code, name, severity, message, ...) "
                f"but got {item!r} ({type(exc).__name__}: {exc})"
            ) from exc
    return findings


def _with_static(report: Mapping[str, Any]) -> tuple[list[Finding], list[list[str]]]:
    """The report's findings, then the static findings the run did not see, and which sides saw each."""
    findings = _findings(report)
    items = [i for i in report.get("findings") or [] if isinstance(i, Mapping)]
    seen_by = [list(i.get("seen_by") or []) for i in items] + [[]] * (len(findings) - len(items))
    static = [
        item
        for item in report.get("static") or []
        if isinstance(item, Mapping) and "runtime" not in (item.get("seen_by") or ())
    ]
    findings += _findings({"findings": static})
    seen_by += [list(item.get("seen_by") or ["static"]) for item in static]
    return findings, seen_by


def _ranks(report: Mapping[str, Any]) -> list[list[int]]:
    """The ranks that saw each finding of the report (empty lists in a report that does not say)."""
    items = report.get("findings") or []
    return [ranks.finding_ranks(item) if isinstance(item, Mapping) else [] for item in items]


def _summary(report: Mapping[str, Any]) -> Mapping[str, Any]:
    summary = report.get("summary") or {}
    if not isinstance(summary, Mapping):
        raise ConfigurationError(f"Expected report['summary'] to be a dict but got {type(summary).__name__}")
    return summary


def _number(summary: Mapping[str, Any], key: str, kind: type[int] | type[float]) -> Any:
    value = summary.get(key, 0)
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"Expected report['summary'][{key!r}] to be a number but got {value!r}") from exc


def _command(report: Mapping[str, Any]) -> Mapping[str, Any]:
    command = report.get("command")
    return command if isinstance(command, Mapping) else {}


def _base_dir(command: Mapping[str, Any]) -> str:
    """The folder the run started in, that relative files in its report are relative to."""
    cwd = command.get("cwd")
    return cwd if isinstance(cwd, str) and os.path.isabs(cwd) else os.getcwd()
