"""The table of finding codes and names: a public contract.

Codes never change meaning once released. A code is listed here even before its detector
exists, so that ``select``/``ignore`` and reports stay stable across releases.
"""

from __future__ import annotations

RULES: dict[str, str] = {
    "GG000": "internal-error",
    "GG101": "missing-zero-grad",
    "GG102": "zero-grad-before-step",
    "GG201": "graph-retained",
    "GG301": "memory-growth",
    "GG401": "requires-grad-typo",
    "GG402": "frozen-param-updated",
    "GG403": "param-not-in-optimizer",
    "GG404": "frozen-norm-stats-updating",
    "GG405": "param-without-grad",
    "GG406": "optimizer-updates-nothing",
    "GG501": "numpy-alias-mutated",
    "GG601": "accumulation-batchnorm",
}

_BY_NAME = {name: code for code, name in RULES.items()}


def resolve(code_or_name: str) -> str | None:
    """The code for an exact code or rule name, or ``None``.

    >>> resolve("missing-zero-grad"), resolve("gg101"), resolve("GG999")
    ('GG101', 'GG101', None)
    """
    text = code_or_name.strip()
    if text.upper() in RULES:
        return text.upper()
    return _BY_NAME.get(text.lower())


def resolve_prefix(text: str) -> str | None:
    """A code prefix (``"GG4"``) for select/ignore, from a prefix or a rule name.

    >>> resolve_prefix("gg4"), resolve_prefix("graph-retained"), resolve_prefix("XX")
    ('GG4', 'GG201', None)
    """
    exact = resolve(text)
    if exact is not None:
        return exact
    prefix = text.strip().upper()
    if prefix.startswith("G") and any(code.startswith(prefix) for code in RULES):
        return prefix
    return None
