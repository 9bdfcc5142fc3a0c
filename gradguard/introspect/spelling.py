"""Misspellings of ``requires_grad``: which names are near misses, and which lines of a file assign one.

``p.requres_grad = False`` raises nothing: Python stores a new attribute that nothing reads.
:func:`is_near_miss` tells such a name from ``requires_grad`` and the attributes tensors
really have; :func:`misspelt_assignments` finds the lines of a source file that assign one,
reading each file once (until it changes) and parsing it only when a near miss is written in
it, so looking at every file of a program costs little.

Example:
    >>> is_near_miss("requres_grad"), is_near_miss("requires_grad"), is_near_miss("grad")
    (True, False, False)
"""

from __future__ import annotations

import linecache
import os
import re
import tokenize
from collections import Counter

import torch

from gradguard.introspect.sites import attribute_assignments

_TARGET = "requires_grad"
_TARGET_KEY = "requiresgrad"
_TARGET_COUNTS = Counter(_TARGET_KEY)
_MAX_DISTANCE = 2


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def damerau_levenshtein(a: str, b: str) -> int:
    """Edit distance counting insertions, deletions, substitutions and adjacent swaps.

    >>> damerau_levenshtein("requries_grad", "requires_grad")
    1
    >>> damerau_levenshtein("require_grad", "requires_grad")
    1
    """
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def _within(key: str) -> bool:
    if abs(len(key) - len(_TARGET_KEY)) > _MAX_DISTANCE:
        return False
    # an edit changes the letters' counts by at most 2 in all: a cheap bound before the distance
    counts = Counter(key)
    differ = sum(((counts - _TARGET_COUNTS) + (_TARGET_COUNTS - counts)).values())
    return differ <= 2 * _MAX_DISTANCE and damerau_levenshtein(key, _TARGET_KEY) <= _MAX_DISTANCE


# Attributes that tensors really have (``requires_grad``, ...), except the method
# ``requires_grad_``: an instance attribute of that name is a misspelt assignment.
_LEGITIMATE = frozenset(n for n in dir(torch.nn.Parameter) if n != "requires_grad_" and _within(_key(n))) | {_TARGET}
_KNOWN: dict[str, bool] = {}


def is_near_miss(name: str) -> bool:
    """Whether an attribute name is a misspelling of ``requires_grad``.

    Names are compared case- and underscore-blind, within two edits (insertions,
    deletions, substitutions or swaps of neighbours). ``requires_grad`` itself and the
    other attributes tensors really have are not near misses; ``requires_grad_`` set as
    an attribute (it is a method) is one.

    >>> all(is_near_miss(n) for n in ("requres_grad", "require_grad", "requiresgrad", "Requires_Grad",
    ...                                "requires_grads", "required_grad", "requieres_grad", "requries_grad"))
    True
    >>> is_near_miss("requires_grad"), is_near_miss("retains_grad"), is_near_miss("sharded")
    (False, False, False)
    """
    known = _KNOWN.get(name)
    if known is None:
        known = name not in _LEGITIMATE and _within(_key(name))
        if len(_KNOWN) > 65536:
            _KNOWN.clear()
        _KNOWN[name] = known
    return known


# --------------------------------------------------------------------------- files
#: Names written after a dot (``p.requres_grad``) or quoted (``setattr(p, "requres_grad", v)``).
_CANDIDATE = re.compile(r"""\.\s*([A-Za-z_]\w*)|["']([A-Za-z_]\w*)["']""")
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
    names = {a or b for a, b in _CANDIDATE.findall(_text(filename, entry, stamp))}
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
