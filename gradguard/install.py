"""Process-wide watching through PyTorch's global hooks: ``install()`` / ``uninstall()``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from gradguard.sampling import PER_GROUP, Budget

if TYPE_CHECKING:
    from gradguard.guard import DetectorSpec, Guard

_installed: Guard | None = None


def install(
    *,
    detectors: Sequence[DetectorSpec] | None = None,
    policy: str = "warn",
    select: Iterable[str] | str | None = None,
    ignore: Iterable[str] | str | None = None,
    json_path: str | os.PathLike[str] | None = None,
    budget: Budget | int | None = PER_GROUP,
) -> Guard:
    """Watch every model and optimizer this process uses, with no change to its code.

    Models are found at their first forward, optimizers at their first ``step()``. The
    arguments are those of :class:`Guard`.
    Returns the installed :class:`Guard`; :func:`uninstall` removes it.

    Example:
        >>> import gradguard
        >>> guard = gradguard.install(policy="collect")
        >>> gradguard.installed() is guard
        True
        >>> gradguard.uninstall() is guard
        True
    """
    from gradguard.guard import Guard

    global _installed
    if _installed is not None:
        raise RuntimeError("gradguard is already installed; call gradguard.uninstall() first")
    guard = Guard(
        detectors=detectors,
        policy=policy,
        select=select,
        ignore=ignore,
        json_path=json_path,
        global_hooks=True,
        budget=budget,
    )
    guard.attach()
    _installed = guard
    return guard


def uninstall() -> Guard | None:
    """Remove the installed guard's hooks and return it (``None`` if none was installed)."""
    global _installed
    guard, _installed = _installed, None
    if guard is not None:
        guard.detach()
    return guard


def installed() -> Guard | None:
    """The guard that :func:`install` put in place, if any."""
    return _installed
