"""Per-line suppression: ``# gradguard: ignore[GG201]`` at a finding's location.

A comment on the line a finding points at drops that finding, for the codes it names (code
prefixes or rule names, comma-separated), or for every code when it names none::

    history.append(loss)  # gradguard: ignore[GG201]
    total += loss         # gradguard: ignore[graph-retained, GG301]
    frozen.train()        # gradguard: ignore

The source line is read through :mod:`linecache` when a finding is first made there (a
finding seen again is merged without reading it): nothing is read on the per-step path.
"""

from __future__ import annotations

import linecache
import re

from gradguard.findings import Finding
from gradguard.rules import resolve_prefix

_COMMENT = re.compile(r"#\s*gradguard\s*:\s*ignore\b(?:\[([^\]]*)\])?", re.IGNORECASE)
#: Every code: a bare ``# gradguard: ignore``.
ALL = ("GG",)


def ignored_at(file: str, line: int) -> tuple[str, ...]:
    """The code prefixes that a comment on ``file:line`` ignores (empty: none).

    Names that are not codes or rule names are left out, so a typo ignores nothing.

    >>> import pathlib, tempfile
    >>> path = str(pathlib.Path(tempfile.mkdtemp()) / "t.py")
    >>> lines = ["x = 1  # gradguard: ignore[GG201, memory-growth, nope]", "y = 2  # gradguard: ignore"]
    >>> _ = pathlib.Path(path).write_text("\\n".join(lines) + "\\n")
    >>> ignored_at(path, 1), ignored_at(path, 2)
    (('GG201', 'GG301'), ('GG',))
    """
    linecache.checkcache(file)  # the file may have changed since it was last read
    return ignored_in(linecache.getline(file, line))


def ignored_in(text: str) -> tuple[str, ...]:
    """The code prefixes a ``# gradguard: ignore[...]`` comment in a line of source ignores (empty: none).

    >>> ignored_in("x += loss  # gradguard: ignore[GG201, nope]"), ignored_in("y = 1  # gradguard: ignore")
    (('GG201',), ('GG',))
    """
    match = _COMMENT.search(text) if "gradguard" in text.lower() else None
    if match is None:
        return ()
    if match.group(1) is None:
        return ALL
    codes = (resolve_prefix(part) for part in match.group(1).split(","))
    return tuple(code for code in codes if code)


def suppressed(finding: Finding) -> bool:
    """Whether a comment at the finding's location ignores it. ``GG000`` is never suppressed.

    >>> from gradguard.findings import Severity
    >>> suppressed(Finding("GG101", "missing-zero-grad", Severity.WARNING, "m"))
    False
    """
    loc = finding.location
    if loc is None or finding.code == "GG000":
        return False
    try:
        codes = ignored_at(loc.file, loc.line)
    except Exception:  # an unreadable source suppresses nothing
        return False
    return bool(codes) and finding.code.startswith(codes)
