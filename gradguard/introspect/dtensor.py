"""Distributed tensors read on this process alone: a ``DTensor``'s local shard, never a collective.

Under ``fully_shard`` (FSDP2) parameters and their gradients are DTensors
(``torch.distributed.tensor.DTensor``): each process holds a shard of the values in a plain
tensor, the *local tensor*. Reading a DTensor as a whole (``full_tensor()``,
``redistribute``, ``.item()``, printing it) can start a collective, which gradguard's
per-step path never does. So gradguard reads the local shard: its values for the cheap
checks (:func:`local`), and version counters that move with every write this process makes
(:func:`version`). FSDP2 writes in two places: an optimizer's update goes through the
DTensor and moves its own counter, while the gradient that a ``backward()`` adds
(reduce-scattered in FSDP2's post-backward hook) goes into the local tensor and moves only
the local counter.

FSDP2 also swaps a module's parameters between the sharded ``DTensor`` (what optimizers
hold) and an unsharded plain parameter around forward and backward:
:func:`sharded_views` maps the views that a module may hold at any time to the sharded
parameter, so that a parameter keeps one identity and one name.

Example:
    >>> import torch
    >>> t = torch.zeros(3)
    >>> local(t) is t, version(t)
    (True, 0)
    >>> _ = t.add_(1.0)
    >>> version(t)
    1
"""

from __future__ import annotations

import sys
from typing import Any

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_dtensor: type[torch.Tensor] | None = None


def _dtensor_type() -> type[torch.Tensor] | None:
    """The ``DTensor`` class once its module is imported (no ``DTensor`` exists before); never imports it."""
    global _dtensor
    if _dtensor is None:
        module = sys.modules.get("torch.distributed.tensor")
        found = getattr(module, "DTensor", None) if module is not None else None
        if isinstance(found, type) and issubclass(found, torch.Tensor):
            _dtensor = found
    return _dtensor


def _inner(t: torch.Tensor) -> torch.Tensor | None:
    """The local tensor of a ``DTensor``, or ``None`` for any other tensor."""
    if type(t) in _PLAIN:
        return None
    kind = _dtensor_type()
    if kind is None or not isinstance(t, kind):
        return None
    inner = getattr(t, "_local_tensor", None)
    return inner if isinstance(inner, torch.Tensor) else None


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor that holds ``t``'s values on this process: a ``DTensor``'s local shard, else ``t`` itself.

    Reading it starts no collective. A shard may be empty (a tensor with fewer rows than
    processes) and holds only this process's part of the values.
    """
    inner = _inner(t)
    return t if inner is None else inner


def version(t: torch.Tensor) -> int:
    """A counter that goes up whenever ``t``'s values are written in place on this process.

    For a ``DTensor``, the sum of its own version counter and its local tensor's: writes
    through the ``DTensor`` move the first, writes into the local tensor the second.
    """
    inner = _inner(t)
    return t._version if inner is None else t._version + inner._version


def sharded_views(model: torch.nn.Module) -> dict[int, torch.nn.Parameter]:
    """FSDP2: the unsharded views of the model's sharded parameters, by ``id``, mapped to the sharded parameter.

    Empty for a model with no ``fully_shard`` module. Reads FSDP2's bookkeeping, not the
    values (no collective); a version of torch that keeps it otherwise gives an empty map.
    """
    out: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for param in _fsdp_params(module):
            try:
                sharded = param.sharded_param
                views = [vars(param).get(key) for key in ("_unsharded_param", "_sharded_post_forward_param")]
            except Exception:
                continue
            if not isinstance(sharded, torch.nn.Parameter):
                continue
            for view in views:
                if isinstance(view, torch.Tensor) and view is not sharded:
                    out[id(view)] = sharded
    return out


def _fsdp_params(module: torch.nn.Module) -> list[Any]:
    get_state = getattr(type(module), "_get_fsdp_state", None)
    if get_state is None:
        return []
    try:
        state = get_state(module)
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # earlier versions of torch: one group per state
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        return [p for group in groups for p in getattr(group, "fsdp_params", ())]
    except Exception:
        return []
