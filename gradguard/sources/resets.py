"""Gradient resets through ``zero_grad()``: ``GradReset`` events.

``optimizer.zero_grad()`` and ``model.zero_grad()`` have no hook. While a detector consumes
this event, ``torch.optim.Optimizer.zero_grad`` and ``torch.nn.Module.zero_grad`` are
wrapped (shared, reference-counted patches): each call reports the optimizer (unwrapped
from Lightning's or Accelerate's wrapper) or the module about to reset its gradients, with
the user's frame that called it, then resets them as before. A ``zero_grad()`` called from
inside another one (a module whose own ``zero_grad`` calls its optimizer's) makes one event,
for the outer call. Hand-written resets (``p.grad = None``) make none.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import torch

from gradguard.events import GradReset
from gradguard.introspect.frames import user_frame
from gradguard.sources.base import PatchSource
from gradguard.sources.optimizers import inner_optimizer
from gradguard.sources.patch import Patch

_depth = threading.local()
_is_compiling = torch.compiler.is_compiling


def _wrap_zero_grad(original: Callable[..., Any], notify: Callable[..., None]) -> Callable[..., Any]:
    def zero_grad(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _is_compiling():
            return original(self, *args, **kwargs)
        depth = getattr(_depth, "value", 0)
        if not depth:
            notify(self, sys._getframe(1))
        _depth.value = depth + 1
        try:
            return original(self, *args, **kwargs)
        finally:
            _depth.value = depth

    return zero_grad


PATCHES = (
    Patch(torch.optim.Optimizer, "zero_grad", _wrap_zero_grad),
    Patch(torch.nn.Module, "zero_grad", _wrap_zero_grad),
)


class GradResetSource(PatchSource):
    """Events before every ``zero_grad()`` of an optimizer or a module of the process."""

    patches = PATCHES
    provides = (GradReset,)

    def notify(self, owner: Any, caller: Any) -> None:
        if not self.hub.wants(GradReset):
            return
        try:
            if isinstance(owner, torch.optim.Optimizer):
                owner = inner_optimizer(owner) or owner
            event = GradReset(owner, user_frame(caller))
        except Exception as exc:  # never into the user's zero_grad()
            self.hub.source_failed(self, exc)
            return
        self.hub.emit(event)  # the guard turns a detector's failure into GG000; a finding may be raised
