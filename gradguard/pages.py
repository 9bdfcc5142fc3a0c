"""Rule pages without importing torch: each detector's docstring, read from its source file.

A detector's class docstring is its rule page (Markdown). ``gradguard explain``,
``gradguard rules`` and the SARIF rule table need the pages, and they must answer at once,
so the pages are read from the detectors' source files with :mod:`ast` instead of importing
the detectors (and torch with them). A test checks that this agrees with the registry.
"""

from __future__ import annotations

import ast
import functools
import inspect
import os

from gradguard.rules import RULES

INTERNAL_ERROR_PAGE = """\
GG000 internal-error: a detector failed inside gradguard.

**What it reports.** A detector raised an exception while watching your training. gradguard
catches it before it can reach your loop, disables that one detector for the rest of the
run and reports it once, with the traceback in the finding's `data`. Training goes on and
the other detectors keep working.

**Why it matters.** It is a bug in gradguard, not in your code; the disabled detector
cannot find anything for the rest of the run.

**How to fix it.** Report it with the traceback from the JSON report. Meanwhile, ignore the
failing rule (`--ignore GG301`) to silence it.

**Example.**

```text
train.py:31: GG000 internal-error [warning] GG301 memory-growth: detector GG301
memory-growth failed with RuntimeError: ...; it is disabled for the rest of the run,
and training goes on
```"""

_DETECTORS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "detectors")


@functools.lru_cache(maxsize=1)
def _detectors() -> tuple[dict[str, str], dict[str, str]]:
    """Every detector's page and default severity by code, read from ``gradguard/detectors/*.py``."""
    pages = {"GG000": INTERNAL_ERROR_PAGE}
    severities = {"GG000": "warning"}
    for entry in sorted(os.listdir(_DETECTORS_DIR)):
        if not entry.endswith(".py") or entry.startswith("_"):
            continue
        with open(os.path.join(_DETECTORS_DIR, entry), encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), filename=entry)
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                fields = _class_fields(node)
                code = fields.get("code")
                doc = ast.get_docstring(node, clean=False)
                if isinstance(code, str) and doc:
                    pages[code] = inspect.cleandoc(doc)
                    severities[code] = str(fields.get("severity", "warning"))
    return pages, severities


def _pages() -> dict[str, str]:
    return _detectors()[0]


def _class_fields(node: ast.ClassDef) -> dict[str, str]:
    """The class's ``code = "GG..."`` and ``severity = Severity.X`` (as ``"x"``), where set."""
    fields: dict[str, str] = {}
    for stmt in node.body:
        target: ast.expr | None = stmt.target if isinstance(stmt, ast.AnnAssign) else None
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
        value = getattr(stmt, "value", None)
        if not isinstance(target, ast.Name):
            continue
        if target.id == "code" and isinstance(value, ast.Constant) and isinstance(value.value, str):
            fields["code"] = value.value
        elif target.id == "severity" and isinstance(value, ast.Attribute):
            fields["severity"] = value.attr.lower()  # Severity.INFO -> "info"
    return fields


def default_severity(code: str) -> str:
    """The severity of a rule's findings unless its detector revises them: info, warning or error.

    >>> default_severity("GG101"), default_severity("GG601")
    ('warning', 'info')
    """
    return _detectors()[1].get(code, "warning")


def implemented() -> frozenset[str]:
    """The codes this version detects (and ``GG000``).

    >>> {"GG000", "GG101"} <= implemented()
    True
    """
    return frozenset(_pages())


def markdown(code: str) -> str:
    """The rule page of an exact code, as Markdown; a reserved code gets one line.

    >>> markdown("GG101").splitlines()[0]
    'GG101 missing-zero-grad: gradients applied again by a later update.'
    """
    page = _pages().get(code)
    if page is None:
        return f"{code} {RULES[code]}: reserved; this version of gradguard has no detector for it yet."
    if code == "GG000":
        return page
    return f"{page}\n\n**Static form.** {static_form(code)}"


def static_form(code: str) -> str:
    """What ``gradguard lint`` checks for a rule, or why it has no static form.

    >>> static_form("GG301").startswith("None")
    True
    """
    from gradguard.lint.rules import RULES as STATIC

    for rule in STATIC:
        if rule.code == code:
            return " ".join(rule.static_form.split())
    return (
        "None: `gradguard lint` has no rule for it, because the source cannot tell it reliably; "
        "only the run measures it."
    )


def summary(code: str) -> str:
    """One line: what the rule detects (the page's first sentence, without code and name).

    >>> summary("GG201")
    'autograd history kept alive across steps.'
    """
    if code not in _pages():
        return "(reserved)"
    if code == "GG000":
        return "a detector failed; it is disabled and training goes on."
    first = markdown(code).split("\n\n", 1)[0].replace("\n", " ")
    return first.split(": ", 1)[-1]
