"""What a finding does once found: warn, raise or be collected; select and ignore."""

from __future__ import annotations

import dataclasses
import enum
import os
import warnings
from collections.abc import Iterable

from gradguard.errors import ConfigurationError, FindingError, FindingWarning
from gradguard.findings import Finding, Severity
from gradguard.introspect.frames import user_location
from gradguard.rules import RULES, resolve_prefix


class Action(str, enum.Enum):
    WARN = "warn"
    RAISE = "raise"
    COLLECT = "collect"


@dataclasses.dataclass(frozen=True)
class Policy:
    """The rules that turn findings into warnings, errors or silence.

    ``select`` and ``ignore`` take code prefixes (``"GG4"``) or rule names
    (``"missing-zero-grad"``). Info-level findings are only ever collected.

    >>> p = Policy("collect", select=("GG1",))
    >>> p.enabled("GG101"), p.enabled("GG201")
    (True, False)
    >>> Policy("warn", ignore=("missing-zero-grad",)).enabled("GG101")
    False
    """

    action: Action | str = Action.WARN
    select: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "action", Action(self.action))
        except ValueError:
            raise ConfigurationError(
                f"Expected policy to be one of 'warn', 'raise', 'collect' but got {self.action!r}"
            ) from None
        object.__setattr__(self, "select", _normalise("select", self.select))
        object.__setattr__(self, "ignore", _normalise("ignore", self.ignore))

    def enabled(self, code: str) -> bool:
        if self.select and not code.startswith(self.select):
            return False
        return not (self.ignore and code.startswith(self.ignore))

    def apply(self, new: list[Finding]) -> None:
        """Warn about or raise the findings that were just seen for the first time."""
        loud = [f for f in new if f.severity >= Severity.WARNING]
        if not loud or self.action == Action.COLLECT:
            return
        if self.action == Action.RAISE:
            # An internal error must never stop training: it is only warned about.
            user = [f for f in loud if f.code != "GG000"]
            for finding in loud:
                if finding.code == "GG000":
                    _warn(finding)
            if user:
                raise FindingError(user)
            return
        for finding in loud:
            _warn(finding)


def _warn(finding: Finding) -> None:
    # Point the warning at the user's code, never at gradguard's.
    location = finding.location or user_location()
    filename = location.file if location else "<gradguard>"
    warnings.warn_explicit(
        FindingWarning(finding),
        category=FindingWarning,
        filename=filename,
        lineno=location.line if location else 0,
        module=os.path.splitext(os.path.basename(filename))[0],
    )


def _normalise(arg: str, values: Iterable[str] | str | None) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            code = resolve_prefix(part)
            if code is None:
                known = ", ".join(f"{c} ({n})" for c, n in RULES.items())
                raise ConfigurationError(
                    f"Expected {arg} to hold code prefixes or rule names but got {part!r}; known rules: {known}"
                )
            out.append(code)
    return tuple(out)
