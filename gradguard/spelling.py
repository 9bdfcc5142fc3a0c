"""Which attribute names are misspellings of ``requires_grad``: pure Python, shared by the runtime and the linter.

``p.requres_grad = False`` raises nothing: Python stores a new attribute that nothing reads.
:func:`is_near_miss` tells such a name from ``requires_grad`` and the attributes tensors
really have. Nothing here imports torch, so ``gradguard lint`` and the runtime detector
decide alike without it.

Example:
    >>> is_near_miss("requres_grad"), is_near_miss("requires_grad"), is_near_miss("grad")
    (True, False, False)
"""

from __future__ import annotations

import re
from collections import Counter

#: The attribute every near miss is compared with.
TARGET = "requires_grad"
#: The most edits (insertions, deletions, substitutions, swaps of neighbours) a near miss is away.
MAX_DISTANCE = 2
#: The attributes of ``torch.nn.Parameter`` within :data:`MAX_DISTANCE` of ``requires_grad``, except
#: the method ``requires_grad_`` (an instance attribute of that name is a misspelt assignment).
#: Written out so that nothing imports torch; a test compares it with ``dir(torch.nn.Parameter)``.
LEGITIMATE = frozenset({"requires_grad"})


def spelling_key(name: str) -> str:
    """A name as near misses are compared: lower case, without underscores or dashes.

    >>> spelling_key("Requires_Grad_")
    'requiresgrad'
    """
    return name.lower().replace("_", "").replace("-", "")


_TARGET_KEY = spelling_key(TARGET)
_TARGET_COUNTS = Counter(_TARGET_KEY)


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


def within_distance(key: str) -> bool:
    """Whether a :func:`spelling_key` is within :data:`MAX_DISTANCE` edits of ``requires_grad``'s.

    >>> within_distance("requresgrad"), within_distance("requiresgrad"), within_distance("retainsgrad")
    (True, True, False)
    """
    if abs(len(key) - len(_TARGET_KEY)) > MAX_DISTANCE:
        return False
    # an edit changes the letters' counts by at most 2 in all: a cheap bound before the distance
    counts = Counter(key)
    differ = sum(((counts - _TARGET_COUNTS) + (_TARGET_COUNTS - counts)).values())
    return differ <= 2 * MAX_DISTANCE and damerau_levenshtein(key, _TARGET_KEY) <= MAX_DISTANCE


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
        known = name not in LEGITIMATE and within_distance(spelling_key(name))
        if len(_KNOWN) > 65536:
            _KNOWN.clear()
        _KNOWN[name] = known
    return known


#: Names written after a dot (``p.requres_grad``), or quoted in a file that calls ``setattr``; only names
#: long enough to be one (a near miss is at most two edits shorter than ``requiresgrad``).
_AFTER_DOT = re.compile(r"\.\s*([A-Za-z_]\w{9,39})")
_QUOTED = re.compile(r"""["']([A-Za-z_]\w{9,39})["']""")


def candidates(text: str) -> set[str]:
    """The names of a source that could be misspelt attributes: after a dot, or quoted for ``setattr``.

    >>> sorted(candidates("p.requres_grad = False; setattr(q, 'requiresgrd', 1); p.x = 1"))
    ['requiresgrd', 'requres_grad']
    """
    names = set(_AFTER_DOT.findall(text))
    if "setattr" in text:
        names.update(_QUOTED.findall(text))
    return names


def mentions_near_miss(text: str) -> bool:
    """Whether a source writes a near miss of ``requires_grad`` after a dot or in quotes: a cheap first test.

    >>> mentions_near_miss("p.requres_grad = False"), mentions_near_miss("p.requires_grad = False")
    (True, False)
    """
    return any(is_near_miss(name) for name in candidates(text))
