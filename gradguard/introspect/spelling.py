"""Misspellings of ``requires_grad``: which names are near misses, and which lines of a file assign one.

``p.requres_grad = False`` raises nothing: Python stores a new attribute that nothing reads.
:func:`is_near_miss` (from :mod:`gradguard.spelling`, which ``gradguard lint`` shares) tells
such a name from ``requires_grad`` and the attributes tensors really have;
:func:`misspelt_assignments` finds the lines of a source file that assign one,
reading each file once (until it changes) and parsing it only when a near miss is written in
it, so looking at every file of a program costs little.

Example:
    >>> is_near_miss("requres_grad"), is_near_miss("requires_grad"), is_near_miss("grad")
    (True, False, False)
"""

from __future__ import annotations

import linecache
import os
import tokenize

from gradguard.introspect.sites import attribute_assignments
from gradguard.spelling import candidates, damerau_levenshtein, is_near_miss

__all__ = ["damerau_levenshtein", "is_near_miss", "misspelt_assignments"]


# --------------------------------------------------------------------------- files
_SCANNED: dict[str, tuple[tuple[int | None, int], dict[str, tuple[int, ...]]]] = {}


def misspelt_assignments(filename: str) -> dict[str, tuple[int, ...]]:
    """The near misses of ``requires_grad`` that a file assigns as attributes, each with its lines.

    A file on disk is read again only when its size or modification time changes; a source
    that only :mod:`linecache` holds (a notebook cell) is read from there. A file that
    cannot be read assigns nothing.
    """
    entry = linecache.cache.get(filename)
    try:
        stat = os.stat(filename)
        stamp: tuple[int | None, int] = (stat.st_mtime_ns, stat.st_size)
    except (OSError, ValueError):
        if entry is None or len(entry) != 4:
            return {}
        stamp = (None, int(entry[0]))
    cached = _SCANNED.get(filename)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    found: dict[str, tuple[int, ...]] = {}
    names = candidates(_text(filename, entry, stamp))
    for name in sorted(n for n in names if is_near_miss(n)):
        lines = attribute_assignments(filename, name)
        if lines:
            found[name] = tuple(lines)
    if len(_SCANNED) > 4096:
        _SCANNED.clear()
    _SCANNED[filename] = (stamp, found)
    return found


def _text(filename: str, entry: tuple[object, ...] | None, stamp: tuple[int | None, int]) -> str:
    if stamp[0] is None and entry is not None:
        return "".join(entry[2])  # type: ignore[arg-type]
    try:
        with tokenize.open(filename) as fh:
            return fh.read()
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return ""
