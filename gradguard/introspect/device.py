"""A boolean computed on an accelerator, read only once the device has produced it.

On the CPU a check is answered at once. On a CUDA device the flag is copied to pinned host
memory behind an event, and read at a later call once the event has completed: the training
loop never waits for the GPU.

Example:
    >>> import torch
    >>> holds_values(torch.zeros(3)), holds_values(torch.tensor([0.0, 2.0]))
    (False, True)
"""

from __future__ import annotations

from typing import Any

import torch

from gradguard.introspect.dtensor import local


class DeviceFlag:
    """A 0-dim boolean tensor on a CUDA device, on its way to the host."""

    __slots__ = ("event", "host")

    def __init__(self, flag: torch.Tensor) -> None:
        self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
        self.host.copy_(flag.reshape(()), non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(flag.device))

    def ready(self) -> bool:
        """Whether the device has produced the value (never waits)."""
        return bool(self.event.query())

    def value(self) -> bool:
        """The value; waits for the device only if it is not ready yet (the end of a run)."""
        self.event.synchronize()
        return bool(self.host.item())


def flag(value: torch.Tensor) -> bool | DeviceFlag:
    """A boolean tensor as a ``bool`` (CPU and other host devices) or a :class:`DeviceFlag` (CUDA)."""
    if value.device.type == "cuda":
        return DeviceFlag(value)
    return bool(value)


def holds_values(t: torch.Tensor) -> Any:
    """Whether a tensor holds any non-zero value: ``True``/``False``, or a pending :class:`DeviceFlag`.

    Sparse and meta tensors, and devices other than CPU and CUDA, answer ``True`` unread. A
    ``DTensor`` answers for its local shard, read on this process alone (no collective): an
    empty shard, or one that holds only zeros while other processes' shards hold values,
    answers ``False``.
    """
    t = local(t)
    if t.is_sparse or t.device.type not in ("cpu", "cuda"):
        return True
    return flag(t.ne(0).any())


def resolve(value: Any, *, wait: bool) -> bool | None:
    """A flag's value: ``None`` while a device flag is not ready and ``wait`` is false."""
    if isinstance(value, DeviceFlag):
        if not wait and not value.ready():
            return None
        return value.value()
    return bool(value)
