"""The finding model: what a detector reports, as plain data."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any


class Severity(str, enum.Enum):
    """How serious a finding is. A ``str`` enum, so ``severity == "warning"`` holds.

    >>> Severity.WARNING == "warning"
    True
    >>> Severity("error") > Severity.INFO
    True
    """

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, str):
            return NotImplemented
        return self.rank < Severity(other).rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, str):
            return NotImplemented
        return self.rank <= Severity(other).rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, str):
            return NotImplemented
        return self.rank > Severity(other).rank

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, str):
            return NotImplemented
        return self.rank >= Severity(other).rank

    def __str__(self) -> str:
        return self.value


_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2}


@dataclasses.dataclass(frozen=True)
class Location:
    """A place in the user's source: file, line and function.

    >>> str(Location("train.py", 12, "main"))
    'train.py:12'
    """

    file: str
    line: int
    function: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "function": self.function}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Location:
        return cls(str(data["file"]), int(data["line"]), str(data.get("function", "")))


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem found in a training run. Immutable: a revision is a new finding.

    ``message`` says what happened, with the measured values; ``hint`` says how to fix it,
    in the imperative. ``location`` is the user's file and line (never gradguard's or
    torch's), ``where`` the parameter, module or variable concerned, ``step`` the step it
    was first seen at and ``count`` how many times it was seen. ``data`` is the evidence, a
    read-only mapping. The guard makes the later versions of a finding (seen again,
    revised) with :func:`dataclasses.replace`; a finding already handed out never changes.

    >>> f = Finding("GG101", "missing-zero-grad", Severity.WARNING,
    ...             message="gradients applied twice", hint="call optimizer.zero_grad()",
    ...             location=Location("train.py", 20), where="fc.weight", step=2)
    >>> str(f)
    'train.py:20: GG101 missing-zero-grad [warning] fc.weight: gradients applied twice'
    >>> f.severity == "warning"
    True
    >>> f.data["x"] = 1
    Traceback (most recent call last):
    ...
    TypeError: 'mappingproxy' object does not support item assignment
    """

    code: str
    name: str
    severity: Severity
    message: str
    hint: str = ""
    location: Location | None = None
    where: str = ""
    step: int = 0
    count: int = 1
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.data, MappingProxyType):
            object.__setattr__(self, "data", MappingProxyType(dict(self.data)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Finding.from_dict, (self.to_dict(),))

    @property
    def key(self) -> tuple[str, str, Location | None]:
        """Findings with the same key are one finding seen several times."""
        return (self.code, self.where, self.location)

    def __str__(self) -> str:
        place = f"{self.location}: " if self.location is not None else ""
        where = f" {self.where}:" if self.where else ":"
        times = f" (seen {self.count} times)" if self.count > 1 else ""
        return f"{place}{self.code} {self.name} [{self.severity.value}]{where} {self.message}{times}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "name": self.name,
            "severity": self.severity.value,
            "message": self.message,
            "hint": self.hint,
            "location": self.location.to_dict() if self.location is not None else None,
            "where": self.where,
            "step": self.step,
            "count": self.count,
            "data": dict(self.data),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        loc = data.get("location")
        return cls(
            code=str(data["code"]),
            name=str(data["name"]),
            severity=Severity(data["severity"]),
            message=str(data["message"]),
            hint=str(data.get("hint", "")),
            location=Location.from_dict(loc) if loc else None,
            where=str(data.get("where", "")),
            step=int(data.get("step", 0)),
            count=int(data.get("count", 1)),
            data=dict(data.get("data") or {}),
        )


def format_names(names: list[str], limit: int = 3) -> str:
    """Names for a message: the first few, then how many more.

    >>> format_names(["a", "b", "c", "d", "e"])
    'a, b, c and 2 more'
    >>> format_names(["a"])
    'a'
    """
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"


@dataclasses.dataclass(frozen=True)
class Revision:
    """A detector's revision of a finding it published: new values for some of its fields.

    A handler returns it among its findings; the guard applies it with :meth:`Guard.revise`,
    which keeps the finding's place, first step and count, and replaces the published
    finding with a new one (the old object never changes).

    >>> f = Finding("GG301", "memory-growth", Severity.WARNING, "grows")
    >>> Revision(f, {"severity": Severity.INFO}).changes["severity"]
    <Severity.INFO: 'info'>
    """

    finding: Finding
    changes: Mapping[str, Any]
