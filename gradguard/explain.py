"""Rule pages: ``gradguard explain CODE``."""

from __future__ import annotations

from gradguard.errors import ConfigurationError
from gradguard.rules import RULES, resolve

INTERNAL_ERROR_PAGE = """\
GG000 internal-error: a detector failed inside gradguard.

**What it reports.** A detector raised an exception while watching your training. gradguard
catches it before it can reach your loop, disables that one detector for the rest of the
run and reports it once, with the traceback in the finding's ``data``. Training goes on and
the other detectors keep working.

**Why it matters.** It is a bug in gradguard, not in your code; the disabled detector
cannot find anything for the rest of the run.

**How to fix it.** Report it with the traceback from the JSON report. Meanwhile, ignore the
failing rule (``--ignore GG301``) to silence it.

**Example.** ``GG000 internal-error [warning] GG301 memory-growth: detector GG301
memory-growth failed with RuntimeError: ...; it is disabled for the rest of the run``
"""


def explain(code_or_name: str) -> str:
    """The rule page for a code or rule name.

    >>> explain("GG101").splitlines()[0]
    'GG101 missing-zero-grad: gradients applied again by a later update.'
    """
    code = resolve(code_or_name)
    if code is None:
        known = ", ".join(f"{c} ({n})" for c, n in RULES.items())
        raise ConfigurationError(f"Expected a rule code or name among {known} but got {code_or_name!r}")
    if code == "GG000":
        return INTERNAL_ERROR_PAGE
    from gradguard.detectors import DETECTORS

    for cls in DETECTORS:
        if cls.code == code:
            return cls.rule_page() + "\n"
    return f"{code} {RULES[code]}: reserved; this version of gradguard has no detector for it yet.\n"


def rules_table() -> str:
    """One line per rule: code, name, and whether this version detects it."""
    from gradguard.detectors import DETECTORS

    implemented = {cls.code: cls for cls in DETECTORS}
    lines = []
    for code, name in RULES.items():
        if code == "GG000":
            summary = "a detector failed; it is disabled and training goes on"
        elif code in implemented:
            summary = implemented[code].rule_page().splitlines()[0].split(": ", 1)[-1]
        else:
            summary = "(reserved)"
        lines.append(f"{code}  {name:<28} {summary}")
    return "\n".join(lines)
