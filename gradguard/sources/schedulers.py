"""Learning-rate scheduler steps: ``SchedulerStep`` events.

``scheduler.step()`` has no hook. While a detector consumes this event, the ``step`` of each
scheduler class of ``torch.optim.lr_scheduler`` that defines its own is wrapped (shared,
reference-counted patches). A scheduler that steps others (``SequentialLR``,
``ChainedScheduler``) makes one event, for itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from gradguard.events import SchedulerStep
from gradguard.sources.base import PatchSource
from gradguard.sources.patch import Patch

_depth = threading.local()


def _wrap_step(original: Callable[..., Any], notify: Callable[..., None]) -> Callable[..., Any]:
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        depth = getattr(_depth, "value", 0)
        _depth.value = depth + 1
        try:
            result = original(self, *args, **kwargs)
        finally:
            _depth.value = depth
        if not depth:
            notify(self)
        return result

    return step


def _scheduler_classes() -> list[type]:
    module = torch.optim.lr_scheduler
    base = getattr(module, "LRScheduler", None) or module._LRScheduler
    out = []
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and "step" in vars(value)
            and (issubclass(value, base) or value.__name__ == "ReduceLROnPlateau")
        ):
            out.append(value)
    return out


_PATCHES = [Patch(cls, "step", _wrap_step) for cls in _scheduler_classes()]


class SchedulerSource(PatchSource):
    """Events after every ``lr_scheduler.step()`` of the process."""

    patches = _PATCHES
    provides = (SchedulerStep,)

    def notify(self, scheduler: Any) -> None:
        if self.hub.wants(SchedulerStep):
            self.hub.emit(SchedulerStep(scheduler))
