"""The typed events that feed the detectors: every input a detector sees is one of these.

Sources (``gradguard.sources``) turn what torch and the user's program do into events;
integrations and the gradient accumulator publish the events only they know of (epochs,
accumulation windows). The guard delivers each event to the detectors that declared it in
``consumes``, and builds no event that no detector consumes.

Events are short-lived: a handler may read the objects an event carries, but must not keep
them (keep a weak reference, a version counter or a name instead).

Example:
    >>> from gradguard.events import StepEnd, provided
    >>> StepEnd(step=3)
    StepEnd(step=3)
    >>> StepEnd in provided()
    True
"""

from __future__ import annotations

import dataclasses
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gradguard.findings import Location


@dataclasses.dataclass(frozen=True)
class Event:
    """Base class of every event."""


# --------------------------------------------------------------------------- the run
@dataclasses.dataclass(frozen=True)
class ModelAdded(Event):
    """A root module became known (given to the guard, or found at its first forward)."""

    module: torch.nn.Module


@dataclasses.dataclass(frozen=True)
class OptimizerAdded(Event):
    """An optimizer became known (given to the guard, or found at its first step)."""

    optimizer: torch.optim.Optimizer


@dataclasses.dataclass(frozen=True)
class Close(Event):
    """The guard is detaching: the last word of every detector."""


# --------------------------------------------------------------------------- torch
@dataclasses.dataclass(frozen=True)
class ForwardPre(Event):
    """A root module's forward is about to run (an iteration starts)."""

    module: torch.nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ForwardPost(Event):
    """A root module's forward returned ``output``."""

    module: torch.nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any


@dataclasses.dataclass(frozen=True)
class BackwardPre(Event):
    """``backward()`` (``torch.autograd.backward``) is about to run from ``tensors``."""

    tensors: tuple[torch.Tensor, ...]


@dataclasses.dataclass(frozen=True)
class BackwardPost(Event):
    """``backward()`` returned: the gradients it produced are accumulated."""

    tensors: tuple[torch.Tensor, ...]


@dataclasses.dataclass(frozen=True)
class StepPre(Event):
    """``optimizer.step()`` is about to run."""

    optimizer: torch.optim.Optimizer


@dataclasses.dataclass(frozen=True)
class StepPost(Event):
    """``optimizer.step()`` returned."""

    optimizer: torch.optim.Optimizer


@dataclasses.dataclass(frozen=True)
class GradReset(Event):
    """``zero_grad()`` of an optimizer or a module is about to reset its gradients.

    ``owner`` is the optimizer (unwrapped from a framework's wrapper) or the module whose
    ``zero_grad()`` was called; ``frame`` is the user's frame that called it, or ``None``.
    """

    owner: torch.optim.Optimizer | torch.nn.Module
    frame: FrameType | None


@dataclasses.dataclass(frozen=True)
class StepEnd(Event):
    """A training step ended: every optimizer that steps has stepped, the counter went up."""

    step: int


@dataclasses.dataclass(frozen=True)
class IterationEnd(Event):
    """An iteration of the program ended, whatever the shape of its loop.

    ``by`` tells what marked it: ``"step"`` (a training step ended, as :class:`StepEnd`),
    ``"backward"`` (a ``backward()`` outside any ``optimizer.step()``, in a run whose
    optimizers do not step: updates by hand), or ``"forward"`` (a watched model called again
    with neither backward nor step since: evaluation or inference). ``index`` counts the
    iterations of the run, ``step`` is the training step counter at that moment.
    """

    index: int
    step: int
    by: str


@dataclasses.dataclass(frozen=True)
class SchedulerStep(Event):
    """``lr_scheduler.step()`` returned."""

    scheduler: Any


@dataclasses.dataclass(frozen=True)
class NumpyAlias(Event):
    """The user's code made a tensor and a numpy array that share memory.

    ``how`` is ``"torch.from_numpy"``, ``"torch.as_tensor"``, ``"Tensor.numpy"`` or a legacy
    constructor (``"torch.Tensor"``, ``"torch.FloatTensor"``..., a subclass's name); ``frame``
    is the user's frame that made the call. ``as_tensor`` and the constructors are reported
    for any ndarray argument: whether they copied is for the consumer to tell.
    """

    array: np.ndarray
    tensor: torch.Tensor
    how: str
    frame: FrameType


@dataclasses.dataclass(frozen=True)
class AttributeSet(Event):
    """The user's code set a misspelt ``requires_grad`` on a tensor: ``p.requres_grad = False``.

    Watched are the near misses of ``requires_grad`` that the program's own files assign,
    from the moment a file that assigns one is first seen. ``frame`` is the user's frame that
    made the assignment, or ``None`` for an attribute set before its name was watched (found
    then on the watched parameters).
    """

    tensor: torch.Tensor
    name: str
    value: Any
    frame: FrameType | None


# --------------------------------------------------------------------------- integrations
@dataclasses.dataclass(frozen=True)
class EpochStart(Event):
    """An epoch of ``stage`` (``"train"``, ``"validate"``, ...) starts; from an integration."""

    stage: str
    epoch: int


@dataclasses.dataclass(frozen=True)
class EpochEnd(Event):
    """An epoch of ``stage`` ended; from an integration."""

    stage: str
    epoch: int


@dataclasses.dataclass(frozen=True)
class AccumulatorWindow(Event):
    """A gradient accumulator was made (``count == 0``) or applied a window with a step.

    ``model`` is the model it drives (or ``None``), ``steps`` its micro-batches per window,
    ``micro_batch_size`` its samples per micro-batch if known, ``created_at`` the user's line
    that made it.
    """

    model: torch.nn.Module | None
    steps: int
    count: int
    micro_batch_size: int | None
    created_at: Location | None


def provided() -> tuple[type[Event], ...]:
    """Every concrete event type, in declaration order."""
    return (
        ModelAdded,
        OptimizerAdded,
        Close,
        ForwardPre,
        ForwardPost,
        BackwardPre,
        BackwardPost,
        StepPre,
        StepPost,
        GradReset,
        StepEnd,
        IterationEnd,
        SchedulerStep,
        NumpyAlias,
        AttributeSet,
        EpochStart,
        EpochEnd,
        AccumulatorWindow,
    )
