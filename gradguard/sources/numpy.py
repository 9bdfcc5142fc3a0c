"""Tensors that share memory with a numpy array: ``NumpyAlias`` events.

``torch.from_numpy``, ``torch.as_tensor`` and ``Tensor.numpy`` are C functions with no
hook. While a detector consumes this event they are replaced by thin wrappers (shared,
reference-counted patches) that call the original and report the alias just made when the
caller is the user's code. Calls from torch itself (``DataLoader`` collation,
``Tensor.__array__``), gradguard or a framework are not reported, and a forked
``DataLoader`` worker reports nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gradguard.events import NumpyAlias
from gradguard.introspect.frames import is_library_file
from gradguard.sources.base import PatchSource
from gradguard.sources.patch import Patch


def _wrap_from_numpy(original: Callable[..., torch.Tensor], notify: Callable[..., None]) -> Callable[..., Any]:
    def from_numpy(ndarray: Any) -> torch.Tensor:
        tensor = original(ndarray)
        frame = sys._getframe(1)
        if not is_library_file(frame.f_code.co_filename):
            notify(ndarray, tensor, "torch.from_numpy", frame)
        return tensor

    return from_numpy


def _wrap_as_tensor(original: Callable[..., torch.Tensor], notify: Callable[..., None]) -> Callable[..., Any]:
    def as_tensor(*args: Any, **kwargs: Any) -> torch.Tensor:
        tensor = original(*args, **kwargs)
        data = args[0] if args else kwargs.get("data")
        if isinstance(data, np.ndarray):
            frame = sys._getframe(1)
            if not is_library_file(frame.f_code.co_filename):
                notify(data, tensor, "torch.as_tensor", frame)
        return tensor

    return as_tensor


def _wrap_numpy(original: Callable[..., np.ndarray], notify: Callable[..., None]) -> Callable[..., Any]:
    def numpy(self: torch.Tensor, *args: Any, **kwargs: Any) -> np.ndarray:
        array = original(self, *args, **kwargs)
        frame = sys._getframe(1)
        if not is_library_file(frame.f_code.co_filename):
            notify(array, self, "Tensor.numpy", frame)
        return array

    return numpy


PATCHES = (
    Patch(torch, "from_numpy", _wrap_from_numpy),
    Patch(torch, "as_tensor", _wrap_as_tensor),
    Patch(torch.Tensor, "numpy", _wrap_numpy),
)


def original(name: str) -> Callable[..., Any]:
    """The unpatched ``from_numpy``, ``as_tensor`` or ``numpy``."""
    return next(p for p in PATCHES if p.name == name).original


def patched() -> bool:
    """Whether the alias-reporting wrappers are installed right now.

    >>> patched()
    False
    """
    return any(p.active for p in PATCHES)


def _forget_in_child() -> None:
    for patch in PATCHES:
        patch.clear_listeners()  # a forked worker reports nothing: nobody would see it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class NumpySource(PatchSource):
    """Events for each alias between a tensor and a numpy array made by the user's code."""

    patches = PATCHES
    provides = (NumpyAlias,)

    def notify(self, array: np.ndarray, tensor: torch.Tensor, how: str, frame: Any) -> None:
        self.hub.emit(NumpyAlias(array, tensor, how, frame))
