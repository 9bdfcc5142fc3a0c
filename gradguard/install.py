"""Process-wide watching through PyTorch's global hooks: ``install()`` / ``uninstall()``.

One guard is installed at a time. Installing again (a script that calls ``install()``
itself under ``gradguard run``, or a library and its caller both) joins the guard already
there: it is returned, its own options stay, and each join is undone by one
``uninstall()``, the last of which removes the guard.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from gradguard.policy import Action, Policy
from gradguard.sampling import PER_GROUP, Budget

if TYPE_CHECKING:
    from gradguard.guard import DetectorSpec, Guard

_installed: Guard | None = None
_joins: list[str | None] = []  # each join not yet undone, with the JSON path it asked for


def install(
    *,
    detectors: Sequence[DetectorSpec] | None = None,
    policy: str | Policy = "warn",
    select: Iterable[str] | str | None = None,
    ignore: Iterable[str] | str | None = None,
    json_path: str | os.PathLike[str] | None = None,
    budget: Budget | int | None = PER_GROUP,
) -> Guard:
    """Watch every model and optimizer this process uses, with no change to its code.

    Models are found at their first forward, optimizers at their first ``step()``. The
    arguments are those of :class:`Guard`.
    Returns the installed :class:`Guard`; :func:`uninstall` removes it. A guard that could
    not attach (gradguard's own failure, its ``GG000`` finding in :attr:`Guard.findings`) is
    returned unattached, and nothing is installed.

    If a guard is installed already (``gradguard run``, or an earlier ``install()``), this
    call joins it: the same guard is returned and keeps the options it was installed with.
    Options asked for here that differ from them are noted in the report's ``notes``, with
    no warning; a ``json_path`` given here is written when this join is undone.

    Example:
        >>> import gradguard
        >>> guard = gradguard.install(policy="collect")
        >>> gradguard.install() is guard  # joins the guard installed
        True
        >>> gradguard.uninstall() is guard  # undoes the join: still installed
        True
        >>> gradguard.installed() is guard
        True
        >>> gradguard.uninstall() is guard
        True
        >>> gradguard.installed() is None
        True
    """
    from gradguard.guard import Guard

    global _installed
    if _installed is not None:
        asked = policy if isinstance(policy, Policy) else Policy.of(policy, select, ignore)
        _join(_installed, detectors, asked, Budget.of(budget))
        _joins.append(os.fspath(json_path) if json_path is not None else None)
        return _installed
    guard = Guard(
        detectors=detectors,
        policy=policy,
        select=select,
        ignore=ignore,
        json_path=json_path,
        global_hooks=True,
        budget=budget,
    )
    guard.attach()  # all or nothing: on bad input it raises, and nothing is left in place
    if guard.attached:  # else gradguard's own failure, reported as GG000: nothing is installed
        _installed = guard
    return guard


def uninstall(*, force: bool = False) -> Guard | None:
    """Undo the last :func:`install` and return the guard (``None`` if none was installed).

    Undoing a join leaves the guard installed (and writes the ``json_path`` that join asked
    for); undoing the first install removes the guard's hooks. ``force`` removes the guard
    whatever joins are left, as its owner (``gradguard run``) does at the end of a run.
    """
    global _installed
    guard = _installed
    if guard is not None and _joins and not force:
        json_path = _joins.pop()
        if json_path is not None:
            guard.write_json(json_path)
        return guard
    _installed = None
    _joins.clear()
    if guard is not None:
        guard.detach()
    return guard


def installed() -> Guard | None:
    """The guard that :func:`install` put in place, if any."""
    return _installed


def _join(guard: Guard, detectors: Sequence[DetectorSpec] | None, policy: Policy, budget: Budget) -> None:
    """Note each option asked for that the guard installed does not have (a default asks for nothing)."""
    default, kept = Policy(), guard.policy
    asked: list[str] = []
    if detectors is not None:
        asked.append(f"detectors={list(detectors)!r}")
    if policy.action not in (kept.action, default.action):
        asked.append(f"policy={Action(policy.action).value!r}")
    for name in ("select", "ignore"):
        value = getattr(policy, name)
        if value and value != getattr(kept, name):
            asked.append(f"{name}={list(value)!r}")
    if budget not in (guard.budget, Budget()):
        asked.append(f"budget={budget.per_group!r}" if budget == Budget.of(budget.per_group) else f"budget={budget!r}")
    if asked:
        guard.notes.append(
            f"install({', '.join(asked)}) joined the guard already installed, which keeps its own options "
            f"(policy={Action(kept.action).value!r}, select={list(kept.select)!r}, ignore={list(kept.ignore)!r})"
        )
