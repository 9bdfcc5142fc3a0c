"""The exceptions and warnings gradguard raises."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradguard.findings import Finding


class GradGuardWarning(UserWarning):
    """Base class of every warning gradguard issues. Messages start with the code."""


class FindingWarning(GradGuardWarning):
    """A finding reported under the ``warn`` policy; ``.finding`` holds it."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(str(finding) if finding.location is None else _strip_location(finding))
        self.finding = finding


class NothingWatchedWarning(GradGuardWarning):
    """A :class:`~gradguard.Guard` given no model (and not global) saw the loop run: it watches none of it.

    Issued once per guard, at the first iteration it sees end, pointing at the user's line
    (a ``backward()`` or ``step()``). Not a finding: nothing is wrong with the training.
    """


class EmptyWindowWarning(GradGuardWarning):
    """A gradient-accumulation window whose ``num_items`` add up to 0 made no optimizer step.

    Issued once per accumulator; :attr:`~gradguard.GradientAccumulator.skipped_windows`
    counts such windows.
    """


class GradGuardError(Exception):
    """Base class of the errors gradguard raises."""


class FindingError(GradGuardError):
    """Findings reported under the ``raise`` policy; ``.findings`` holds them."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = list(findings)
        super().__init__("\n".join(str(f) for f in self.findings))


class ConfigurationError(GradGuardError, ValueError):
    """Bad input to gradguard's public API."""


def _strip_location(finding: Finding) -> str:
    # The warning machinery prints the file and line itself.
    text = str(finding)
    prefix = f"{finding.location}: "
    return text[len(prefix) :] if text.startswith(prefix) else text
