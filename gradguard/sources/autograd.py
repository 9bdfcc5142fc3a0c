"""``backward()`` calls: ``BackwardPre`` and ``BackwardPost`` events.

``Tensor.backward()`` calls ``torch.autograd.backward``, which has no hook; while a guard
consumes these events it is replaced by a thin wrapper (a shared, reference-counted
:class:`~gradguard.sources.patch.Patch`). One event before and one after each call replace
two autograd hooks on every parameter: what a detector needs to know of the gradients
(was this one reset, did backward reach that one) it reads from a few sampled parameters
at these two moments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gradguard.events import BackwardPost, BackwardPre
from gradguard.sources.base import Hub, Source
from gradguard.sources.patch import Patch


def _wrap_backward(original: Callable[..., Any], notify: Callable[..., None]) -> Callable[..., Any]:
    def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        roots = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors or ())
        notify(False, roots)
        result = original(tensors, *args, **kwargs)
        notify(True, roots)
        return result

    return backward


_BACKWARD = Patch(torch.autograd, "backward", _wrap_backward)


class AutogradSource(Source):
    """Events around every ``backward()`` of the process."""

    provides = (BackwardPre, BackwardPost)

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub)
        self._subscribed = False

    def start(self) -> None:
        _BACKWARD.subscribe(self._on_backward)
        self._subscribed = True

    def stop(self) -> None:
        if self._subscribed:
            _BACKWARD.unsubscribe(self._on_backward)
            self._subscribed = False

    def _on_backward(self, post: bool, roots: tuple[Any, ...]) -> None:
        self.hub.backward(post, roots)
