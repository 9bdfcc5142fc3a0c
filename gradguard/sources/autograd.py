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
from gradguard.sources.base import PatchSource
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


class AutogradSource(PatchSource):
    """Events around every ``backward()`` of the process."""

    patches = (_BACKWARD,)
    provides = (BackwardPre, BackwardPost)

    def notify(self, post: bool, roots: tuple[Any, ...]) -> None:
        self.hub.backward(post, roots)
