"""What is known of a parameter's gradient between updates, without holding a tensor (GG101's machinery).

A record keeps weak references and version counters: the gradient tensor and its version
when last seen, the parameter's version then, and whether an optimizer step consumed the
gradient as it is. Comparing them before and after a ``backward()`` tells whether backward
is adding to a gradient that an update already applied.

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
from typing import Any

import torch


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
        "suspect",
        "tainted",
    )

    def __init__(self, param: torch.Tensor, name: str) -> None:
        self.param_ref = weakref.ref(param)
        self.name = name
        self.grad_ref: weakref.ref[torch.Tensor] | None = None
        self.grad_version = -1
        self.param_version = param._version
        self.consumed = False  # an optimizer step has used the gradient as it is now
        self.suspect = False  # backward is about to add to a gradient an update already applied
        self.tainted = False  # it did: the gradient holds content an update already applied
        self.pending: Any = None  # the gradient held values then: True, or a flag still on the device

    def seen(self, param: torch.Tensor, grad: torch.Tensor | None, *, consumed: bool) -> None:
        """Remember the gradient and the parameter as they are now."""
        if grad is None:
            self.grad_ref = None
            self.grad_version = -1
        else:
            if self.grad_ref is None or self.grad_ref() is not grad:
                self.grad_ref = weakref.ref(grad)
            self.grad_version = grad._version
        self.param_version = param._version
        self.consumed = consumed

    def unchanged(self, grad: torch.Tensor | None) -> bool:
        """Whether the gradient is the same tensor, with the same contents, as when last seen."""
        return (
            grad is not None
            and self.grad_ref is not None
            and self.grad_ref() is grad
            and (grad._version == self.grad_version)
        )


def param_lists(optimizer: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    """The parameter list of each param group (the groups a rotation samples from)."""
    return [group["params"] for group in optimizer.param_groups]
