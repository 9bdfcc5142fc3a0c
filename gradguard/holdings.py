"""What an optimizer holds, read the same way by GG403, GG405 and GG406: one mistake, one finding.

Two mistakes show from several sides at once:

- **A layer replaced after the optimizer was made.** The new layer is in no optimizer
  (GG403), and the optimizer keeps the old layer's tensors, which get no gradient any more.
  The finding is GG403's: :func:`left_behind` finds those old tensors, and GG405 and GG406
  leave them out.
- **An optimizer that updates nothing**, made from tensors that are all frozen or never get
  a gradient (a frozen backbone), so that every ``step()`` is a no-op. The finding is
  GG406's, which also names the trainable parameters that no optimizer holds: GG403 and
  GG405 stay quiet while :func:`updates_nothing` holds for an optimizer of the run.

Each detector keeps its own :class:`GradientSeen`, fed from its own events; nothing passes
between detectors.

Example:
    >>> import torch
    >>> frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    >>> opt = torch.optim.SGD([frozen], lr=0.1)
    >>> seen = GradientSeen()
    >>> for _ in range(CONFIRM):
    ...     seen.look(opt)
    >>> seen.idle(opt), seen.undecided(opt)
    (True, False)
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gradguard.run import Run

#: Steps of an optimizer with no gradient on any tensor it holds that make it one that updates nothing.
CONFIRM = 3


class _Seen:
    __slots__ = ("busy", "groups", "idle", "looks", "probe", "ref")

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.ref = weakref.ref(optimizer)
        self.busy = False  # a tensor it holds had a gradient at one of its steps
        self.idle = 0  # full looks that found no gradient anywhere
        self.looks = 0
        self.groups = -1
        self.probe = False  # the last look found no gradient: look again after the next backward()


class GradientSeen:
    """Per optimizer: whether any tensor it holds has had a gradient at one of its steps.

    Call :meth:`look` at each step of an optimizer (after the gradients of that step are
    made). An optimizer once seen with a gradient is *busy* for good and costs nothing more.
    One not yet seen so is looked at in full (every tensor of every group) at its first
    :data:`CONFIRM` looks, then only at looks 4, 8, 16, ... and when its number of param
    groups changes: the full look at an optimizer that updates nothing stays rare.
    """

    def __init__(self) -> None:
        self._by_id: dict[int, _Seen] = {}

    def look(self, optimizer: torch.optim.Optimizer) -> None:
        seen = self._get(optimizer)
        if seen is None:
            if len(self._by_id) > 64:
                self._by_id = {k: s for k, s in self._by_id.items() if s.ref() is not None}
            seen = self._by_id[id(optimizer)] = _Seen(optimizer)
        if seen.busy:
            return
        seen.looks += 1
        groups = len(optimizer.param_groups)
        if seen.idle >= CONFIRM and groups == seen.groups and seen.looks & (seen.looks - 1):
            return  # settled: looked at again at looks that are powers of two, or when groups change
        seen.groups = groups
        if _has_grad(optimizer):
            seen.busy = True
        else:
            seen.idle += 1
            seen.probe = True

    def after_backward(self) -> None:
        """A ``backward()`` returned: an optimizer whose last look found no gradient is looked at again.

        Gradients reset between ``backward()`` and ``step()`` (GG102's mistake) are gone by the
        step, but a ``backward()`` did reach the optimizer's tensors: it is busy.
        """
        for seen in self._by_id.values():
            if seen.probe:
                seen.probe = False
                optimizer = seen.ref()
                if optimizer is not None and _has_grad(optimizer):
                    seen.busy = True

    def busy(self, optimizer: torch.optim.Optimizer) -> bool:
        """A tensor of ``optimizer`` had a gradient at one of its steps."""
        seen = self._get(optimizer)
        return seen is not None and seen.busy

    def idle(self, optimizer: torch.optim.Optimizer) -> bool:
        """Looked at :data:`CONFIRM` times or more, and no tensor of ``optimizer`` ever had a gradient."""
        seen = self._get(optimizer)
        return seen is not None and not seen.busy and seen.idle >= CONFIRM

    def undecided(self, optimizer: torch.optim.Optimizer) -> bool:
        """Neither busy nor idle yet."""
        seen = self._get(optimizer)
        return seen is None or (not seen.busy and seen.idle < CONFIRM)

    def _get(self, optimizer: torch.optim.Optimizer) -> _Seen | None:
        seen = self._by_id.get(id(optimizer))
        return seen if seen is not None and seen.ref() is optimizer else None


def _has_grad(optimizer: torch.optim.Optimizer) -> bool:
    return any(p.grad is not None for group in optimizer.param_groups for p in group["params"])


def held(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of ``optimizer``'s param groups, once each."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def unowned(run: Run) -> list[str]:
    """The names of the watched models' trainable parameters that no watched optimizer holds."""
    return [name for name, p in run.named_parameters() if p.requires_grad and run.owner(p) is None]


def left_behind(run: Run, params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors of ``params`` that a replaced layer left in its optimizer.

    Known for a replacement the guard saw (:meth:`Run.replaced`). A tensor outside every
    watched model that the guard never saw in one (its layer was replaced before the guard
    started) counts too when the models hold a trainable parameter that no optimizer holds:
    the new layer. Reads every parameter of the models: for a decision, not for each step.
    """
    if not run.models():
        return []
    inside = {id(p) for _, p in run.named_parameters()}
    outside = [p for p in params if id(p) not in inside]
    if not outside:
        return []
    known = [p for p in outside if run.replaced(p)]
    if len(known) < len(outside) and unowned(run):
        return outside
    return known


def updates_nothing(run: Run, seen: GradientSeen, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is GG406's: it never had a gradient, and no replaced layer's tensors explain it."""
    return seen.idle(optimizer) and not left_behind(run, held(optimizer))
