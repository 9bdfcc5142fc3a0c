"""What a finding does once found: warn, raise or be collected; select and ignore.

Guards that watch the same thing at once (a script's own ``Guard`` under ``gradguard run``,
two guards on one model) find the same mistakes. Each collects them, but only the first to
see one warns: attached guards share a record of the findings warned while they were
attached (:class:`Shared`), keyed by code and place only, so it holds nothing of the
user's, and it is emptied when the last of them detaches.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import warnings
from collections.abc import Iterable
from typing import Any

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

    @classmethod
    def of(
        cls, action: Action | str, select: Iterable[str] | str | None = None, ignore: Iterable[str] | str | None = None
    ) -> Policy:
        """A policy from what the public API takes: a code or name, several, or ``None``.

        >>> Policy.of("collect", select="GG1").select
        ('GG1',)
        """
        return cls(action, select=_normalise("select", select), ignore=_normalise("ignore", ignore))

    def enabled(self, code: str) -> bool:
        if self.select and not code.startswith(self.select):
            return False
        return not (self.ignore and code.startswith(self.ignore))

    def warns(self, finding: Finding) -> bool:
        """Whether :meth:`apply` warns about ``finding`` (rather than raise it or stay silent).

        >>> from gradguard.findings import Finding, Severity
        >>> f = Finding("GG101", "missing-zero-grad", Severity.WARNING, "applied twice")
        >>> Policy("warn").warns(f), Policy("raise").warns(f), Policy("collect").warns(f)
        (True, False, False)
        """
        if finding.severity < Severity.WARNING:
            return False
        return self.action == Action.WARN or (self.action == Action.RAISE and finding.code == "GG000")

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


_warned: dict[Any, tuple[int, int]] = {}  # a finding's key -> (when, by which share) it was last warned
_open: set[int] = set()  # the shares of the guards attached now
_clock = 0  # counts the warnings and the shares


class Shared:
    """One attached guard's part in the process-wide record of warned findings.

    The record maps a finding's key (code, place, location: strings and numbers) to when
    and by which guard it was last warned. A guard does not warn about a finding that
    another warned while this one was attached, or that a guard still attached warned:
    it is one mistake, seen by several guards. A guard attached later than a warning whose
    guard has gone warns again (its run is another). The record is emptied when the last
    guard taking part closes its share.

    >>> from gradguard.findings import Finding, Severity
    >>> key = Finding("GG101", "missing-zero-grad", Severity.WARNING, "applied twice").key
    >>> a, b = Shared(), Shared()
    >>> a.claim(key), b.claim(key), a.claim(key)
    (True, False, True)
    >>> a.close()
    >>> c = Shared()
    >>> b.claim(key), c.claim(key)  # b was attached when a warned; c was not, and a is gone
    (False, True)
    >>> b.close(); c.close()
    """

    def __init__(self) -> None:
        global _clock
        _clock += 1
        self._id = self._since = _clock
        _open.add(self._id)

    def claim(self, key: Any) -> bool:
        """Whether this guard warns about the finding with ``key`` (and is then recorded as its warner)."""
        global _clock
        seen = _warned.get(key)
        if seen is not None and seen[1] != self._id and (seen[0] > self._since or seen[1] in _open):
            return False
        _clock += 1
        _warned[key] = (_clock, self._id)
        return True

    def close(self) -> None:
        """Leave the record (at detach); the last to leave empties it."""
        _open.discard(self._id)
        if not _open:
            _warned.clear()


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
