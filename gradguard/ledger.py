"""The findings of a guard: merged by code and place, immutable, and what each new one does.

Example:
    >>> from gradguard.findings import Finding, Severity
    >>> from gradguard.policy import Policy
    >>> ledger = Ledger(Policy("collect"))
    >>> f = Finding("GG101", "missing-zero-grad", Severity.WARNING, "applied twice", where="opt")
    >>> ledger.record(f) is f, ledger.record(f), ledger.findings[0].count
    (True, None, 2)
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from gradguard import suppress
from gradguard.errors import ConfigurationError
from gradguard.findings import Finding, Severity
from gradguard.introspect.frames import user_location
from gradguard.policy import Policy, Shared

_REVISABLE = frozenset({"severity", "message", "hint", "data"})


class Ledger:
    """Findings in the order first seen; a finding seen again, or revised, is a new object."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._findings: dict[tuple[Any, ...], Finding] = {}
        self._restored: set[tuple[Any, ...]] = set()  # from a checkpoint, not seen again in this run yet
        self._suppressed: dict[tuple[Any, ...], Finding] = {}  # dropped by a comment at their line
        self.callbacks: list[Callable[[Finding], None]] = []
        #: Goes up with every change to the findings, a count included (what a report writer polls).
        self.version = 0
        self._shared: Shared | None = None  # this guard's part in the record of warned findings, while attached

    @property
    def findings(self) -> list[Finding]:
        return list(self._findings.values())

    @property
    def suppressed(self) -> list[Finding]:
        """Findings dropped by a ``# gradguard: ignore[...]`` comment at their location."""
        return list(self._suppressed.values())

    def record(self, finding: Finding) -> Finding | None:
        """Merge into the findings; return the finding if it is new.

        A finding restored from a checkpoint that happens again counts as new once: a resumed
        run warns about what is still wrong. A finding that a comment at its line ignores is
        kept aside, never published.
        """
        self.version += 1
        hidden = self._suppressed.get(finding.key)
        if hidden is not None or (finding.key not in self._findings and suppress.suppressed(finding)):
            count = hidden.count + finding.count if hidden is not None else finding.count
            self._suppressed[finding.key] = dataclasses.replace(finding, count=count)
            return None
        known = self._findings.get(finding.key)
        if known is not None:
            merged = self._findings[finding.key] = dataclasses.replace(known, count=known.count + finding.count)
            if finding.key in self._restored:
                self._restored.discard(finding.key)
                return merged
            return None
        self._findings[finding.key] = finding
        return finding

    def restore(self, finding: Finding) -> None:
        """A finding from a checkpoint: kept unless the same one is already known."""
        if finding.key not in self._findings:
            self.version += 1
            self._findings[finding.key] = finding
            self._restored.add(finding.key)

    def revise(self, finding: Finding, **changes: Any) -> Finding:
        """Replace a published finding by a revised one, keeping its place, first step and count."""
        self.version += 1
        hidden = self._suppressed.get(finding.key)
        if hidden is not None and set(changes) <= _REVISABLE:
            revised = self._suppressed[finding.key] = dataclasses.replace(hidden, **changes)
            return revised
        known = self._findings.get(finding.key)
        if known is None:
            raise ConfigurationError(f"Expected a finding of this guard but got {finding}")
        if not set(changes) <= _REVISABLE:
            raise ConfigurationError(f"Expected changes among {sorted(_REVISABLE)} but got {sorted(changes)}")
        revised = dataclasses.replace(known, **changes)
        self._findings[finding.key] = revised
        self.notify(revised)
        return revised

    def escalates(self, finding: Finding, changes: Mapping[str, Any]) -> bool:
        """Whether a revision raises an info finding to a warning or an error (then the policy applies)."""
        known = self._findings.get(finding.key)
        severity = changes.get("severity")
        return known is not None and known.severity == Severity.INFO and severity not in (None, Severity.INFO)

    def publish(self, new: list[Finding]) -> None:
        """Tell the callbacks, then apply the policy (warn or raise) to findings seen for the first time."""
        for f in new:
            self.notify(f)
        self.apply(new)

    def apply(self, findings: list[Finding]) -> None:
        """Apply the policy; while shared, a finding another attached guard warned is not warned again.

        It stays among the findings; only the warning is skipped (raising never is).
        """
        shared = self._shared
        if shared is not None:
            findings = [f for f in findings if not self.policy.warns(f) or shared.claim(f.key)]
        self.policy.apply(findings)

    def share(self) -> None:
        """Take part in the process-wide record of warned findings (a guard does while attached)."""
        if self._shared is None:
            self._shared = Shared()

    def unshare(self) -> None:
        """Leave the record of warned findings."""
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.close()

    def notify(self, finding: Finding) -> None:
        for callback in list(self.callbacks):
            with contextlib.suppress(Exception):  # a report writer must never break training
                callback(finding)

    def internal_error(self, what: str, exc: BaseException, code: str | None, step: int) -> list[Finding]:
        """``GG000``: gradguard's own failure, reported once, never raised."""
        if not self.policy.enabled("GG000"):
            return []
        kind = "detector" if code is not None else "gradguard's"
        finding = Finding(
            code="GG000",
            name="internal-error",
            severity=Severity.WARNING,
            message=(
                f"{kind} {what} failed with {type(exc).__name__}: {exc}; "
                "it is disabled for the rest of the run, and training goes on"
            ),
            hint="Report this to gradguard with the traceback in data; ignore the rule meanwhile",
            location=user_location(),
            where=what,
            step=step,
            data={
                "detector": code,
                "component": what,
                "exception": f"{type(exc).__name__}: {exc}",
                "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            },
        )
        recorded = self.record(finding)
        return [recorded] if recorded is not None else []


class Autosave:
    """Rewrites a report while a run goes on, so that one killed without warning leaves it current.

    :meth:`poll` is called at the end of every iteration with the step (or iteration) and the
    ledger's :attr:`Ledger.version`. It writes at steps 1, 2, 4, 8, ... and, in between, at
    most every ``every_s`` seconds, and only when the step or the findings changed since the
    last write. Between writes it costs an integer and a clock comparison; a failed write is
    dropped (the next one may succeed), never raised into training.

    >>> times, written = iter([0.0, 1.0, 2.0, 3.0, 20.0]), []
    >>> save = Autosave(lambda: written.append(1), every_s=15.0, clock=lambda: next(times))
    >>> for step in (1, 2, 3, 3):
    ...     save.poll(step, 0)
    >>> len(written)  # steps 1 and 2 (powers of two); step 3 once 15 s have passed
    3
    """

    def __init__(
        self, write: Callable[[], None], *, every_s: float = 15.0, clock: Callable[[], float] = time.monotonic
    ):
        self._write = write
        self._every_s = float(every_s)
        self._clock = clock
        self._next = 1  # the next power of two
        self._due = clock() + self._every_s
        self._written: tuple[int, int] | None = None

    def poll(self, step: int, version: int) -> None:
        """Write if due: at a power of two, or ``every_s`` after the last look, if anything changed."""
        if step < self._next:
            now = self._clock()
            if now < self._due:
                return
        else:
            now = self._clock()
            while self._next <= step:
                self._next *= 2
        self._due = now + self._every_s
        self.flush(step, version)

    def flush(self, step: int, version: int) -> None:
        """Write now, unless nothing changed since the last write."""
        if self._written == (step, version):
            return
        self._written = (step, version)
        with contextlib.suppress(Exception):  # a report writer must never break training
            self._write()
