"""Applying fixes to a text, and showing them as a diff."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from gradguard.lint.source import Edit, Fix


def apply_fixes(text: str, fixes: Iterable[Fix]) -> tuple[str, int]:
    """``text`` with the fixes applied, and how many were; a fix that overlaps one applied before is left.

    >>> from gradguard.lint.source import Edit
    >>> apply_fixes("a b c", [Fix("x", (Edit(0, 1, "A"),)), Fix("y", (Edit(0, 3, "?"),)), Fix("z", (Edit(4, 5, "C"),))])
    ('A b C', 2)
    """
    taken: list[tuple[int, int]] = []
    edits: list[Edit] = []
    applied = 0
    for fix in sorted(fixes, key=lambda f: min(e.start for e in f.edits)):
        spans = [(e.start, e.end) for e in fix.edits]
        if any((s < te and ts < e) or s == e == ts for s, e in spans for ts, te in taken):
            continue
        taken.extend(spans)
        edits.extend(fix.edits)
        applied += 1
    for edit in sorted(edits, key=lambda e: (e.start, e.end), reverse=True):
        text = text[: edit.start] + edit.replacement + text[edit.end :]
    return text, applied


def unified_diff(path: str, old: str, new: str) -> str:
    """A unified diff from ``old`` to ``new``, as ``git diff`` shows one.

    >>> print(unified_diff("t.py", "a\\nb\\n", "a\\nc\\n"), end="")
    --- a/t.py
    +++ b/t.py
    @@ -1,2 +1,2 @@
     a
    -b
    +c
    """
    lines = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{path}", f"b/{path}")
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)
