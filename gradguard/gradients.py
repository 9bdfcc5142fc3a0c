"""What is known of a parameter's gradient between updates, without holding a tensor (GG101's machinery).

A record keeps weak references and version counters: the gradient tensor and its version
when last seen, the parameter's version then, and whether an optimizer step consumed the
gradient as it is. Comparing them before and after a ``backward()`` tells whether backward
is adding to a gradient that an update already applied. An update through ``p.data``
moves no version counter of the parameter; :class:`DataUpdates` tells it by a fingerprint,
a few of the parameter's values copied on its device. A ``DTensor`` (``fully_shard``) is read
on this process alone: its version counters and its local shard's values
(:mod:`~gradguard.introspect.dtensor`), never a collective.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> p.grad = torch.zeros(2)
    >>> rec = GradRecord(p, "p")
    >>> rec.seen(p, p.grad, consumed=True)
    >>> rec.unchanged(p.grad), (p.grad.add_(1.0), rec.unchanged(p.grad))[1]
    (True, False)
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch

from gradguard.findings import Location, format_names
from gradguard.introspect import device
from gradguard.introspect.dtensor import local, version

#: Values of a parameter copied after a ``backward()``, to tell at the next one whether it changed.
FINGERPRINT = 8
#: Parameters fingerprinted after a ``backward()`` at most (a mistake of the loop shows on any of them).
FINGERPRINTED = 8
#: Updates in a row, each followed by a ``backward()`` into the gradient it used, that make a finding.
STREAK = 3


class GradRecord:
    """What is known of one watched parameter's gradient, without holding any tensor."""

    __slots__ = (
        "consumed",
        "grad_ref",
        "grad_version",
        "name",
        "param_ref",
        "param_version",
        "pending",
        "snapshot",
        "snapshot_at",
        "streak",
        "suspect",
        "tainted",
    )

    def __init__(self, param: torch.Tensor, name: str) -> None:
        self.param_ref = weakref.ref(param)
        self.name = name
        self.grad_ref: weakref.ref[torch.Tensor] | None = None
        self.grad_version = -1
        self.param_version = version(param)
        self.consumed = False  # an optimizer step has used the gradient as it is now
        self.suspect = False  # backward is about to add to a gradient an update already applied
        self.tainted = False  # it did: the gradient holds content an update already applied
        self.pending: Any = None  # the gradient held values then: True, or a flag still on the device
        self.snapshot: torch.Tensor | None = None  # a few values of the parameter after a backward() (a copy)
        self.snapshot_at = -1  # that backward()'s number
        self.streak = 0  # updates in a row through .data that backward() then added to the same gradient

    def seen(self, param: torch.Tensor, grad: torch.Tensor | None, *, consumed: bool) -> None:
        """Remember the gradient and the parameter as they are now."""
        if grad is None:
            self.grad_ref = None
            self.grad_version = -1
        else:
            if self.grad_ref is None or self.grad_ref() is not grad:
                self.grad_ref = weakref.ref(grad)
            self.grad_version = version(grad)
        self.param_version = version(param)
        self.consumed = consumed

    def unchanged(self, grad: torch.Tensor | None) -> bool:
        """Whether the gradient is the same tensor, with the same contents, as when last seen."""
        return (
            grad is not None
            and self.grad_ref is not None
            and self.grad_ref() is grad
            and version(grad) == self.grad_version
        )


def param_lists(optimizer: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    """The parameter list of each param group (the groups a rotation samples from)."""
    return [group["params"] for group in optimizer.param_groups]


def few_values(t: torch.Tensor) -> torch.Tensor | None:
    """A view of at most ``FINGERPRINT`` values spread over a tensor, or ``None`` where none is cheap.

    A ``DTensor``'s values are taken from its local shard (no collective).

    >>> few_values(torch.arange(20.0)).tolist()
    [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0]
    """
    t = local(t)
    n = t.numel()
    if t.layout != torch.strided or t.device.type not in ("cpu", "cuda") or not t.is_contiguous() or not n:
        return None
    step = max(1, n // FINGERPRINT)
    return torch.as_strided(t.detach(), (min(FINGERPRINT, -(-n // step)),), (step,))


def _alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


class DataUpdates:
    """Updates that move no version counter (``p.data.add_(...)``), told by a fingerprint of the parameter.

    After a ``backward()`` a few values of each of up to ``FINGERPRINTED`` watched parameters
    are copied, on their device. Before the very next ``backward()``, when the gradient is
    still the same tensor and the parameter's version counter did not move, they are
    compared with the parameter's values: changed values with a gradient that still holds
    values at the same places is an update after which backward() adds to the gradient that
    update used; changed values over a zeroed gradient is a reset. Each comparison is a
    device flag, read once the device has produced it, so the loop never waits. A record's
    ``streak`` counts such updates in a row.
    """

    def __init__(self) -> None:
        self._checks: deque[list[Any]] = deque()  # [record, parameter changed, gradient held, location]

    def clear(self) -> None:
        self._checks.clear()

    def snap(self, records: list[GradRecord], backwards: int) -> None:
        """After ``backward()`` number ``backwards``: copy a few values of the first parameters that have a gradient."""
        for i, rec in enumerate(records):
            if i >= FINGERPRINTED:
                rec.snapshot = None
                continue
            param = rec.param_ref()
            few = few_values(param) if param is not None and param.grad is not None else None
            rec.snapshot = few.clone() if few is not None else None
            rec.snapshot_at = backwards

    def check(self, records: Iterable[GradRecord], backwards: int) -> bool:
        """Before ``backward()`` number ``backwards``: compare with the copies made after the one before.

        Returns whether any comparison was queued (then :meth:`locate` says where).
        """
        queued = False
        for rec in records:
            snapshot, rec.snapshot = rec.snapshot, None
            param = rec.param_ref()
            if snapshot is None or param is None or rec.snapshot_at != backwards - 1:
                continue
            grad = param.grad
            if (
                grad is None
                or rec.grad_ref is None
                or rec.grad_ref() is not grad
                or version(param) != rec.param_version
            ):
                rec.streak = 0  # reset (None or a new tensor), or an update that its version counter shows
                continue
            now, held = few_values(param), few_values(grad)
            if now is None or held is None or not _alike(now, snapshot):
                continue  # .data replaced by a tensor of another shape, type or device: not comparable
            self._checks.append([rec, device.flag(now.ne(snapshot).any()), device.flag(held.any()), None])
            queued = True
        while len(self._checks) > 1024:  # a device far behind: forget the oldest
            self._checks.popleft()
        return queued

    def locate(self, location: Location | None) -> None:
        """Where the comparisons just queued were made (the user's ``backward()`` line)."""
        for check in reversed(self._checks):
            if check[3] is not None:
                break
            check[3] = location

    def resolve(self, *, wait: bool) -> list[tuple[GradRecord, Location | None]]:
        """The records whose streak reached ``STREAK`` by the comparisons the device has answered."""
        out: list[tuple[GradRecord, Location | None]] = []
        while self._checks:
            rec, changed, held, location = self._checks[0]
            changed, held = device.resolve(changed, wait=wait), device.resolve(held, wait=wait)
            if changed is None or held is None:
                break
            self._checks.popleft()
            if changed and held:  # updated, and the gradient that update used is still there
                rec.streak += 1
                if rec.streak >= STREAK:
                    out.append((rec, location))
            elif changed:  # updated, and the gradient zeroed: a reset
                rec.streak = 0
        return out


HAND_WRITTEN_HINT = "Reset the gradient after each hand-written update: p.grad = None (or p.grad.zero_())"


def hand_written(names: list[str], streak: int | None) -> tuple[str, dict[str, Any]]:
    """The message and evidence of hand-written updates on gradients never reset.

    ``streak`` is the number of updates in a row seen through ``.data`` (no version counter
    moves), or ``None`` for updates that moved the parameters' version counters.
    """
    data: dict[str, Any] = {"parameters": names[:100], "num_parameters": len(names), "optimizer": None}
    if streak is None:
        message = (
            f"backward() adds to the gradient of {format_names(names)}, which the last update of that "
            "parameter already applied and nothing reset since: the next update applies it again"
        )
        return message, data
    message = (
        f"backward() adds to the gradient of {format_names(names)}, which was not reset though the "
        f"parameter changed since the last backward(), {streak} times in a row: each update through "
        ".data (which no version counter shows) applies the sum of every earlier gradient"
    )
    return message, {**data, "updates_in_a_row": streak, "through": ".data"}
