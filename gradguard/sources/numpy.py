"""Tensors that share memory with a numpy array: ``NumpyAlias`` events.

``torch.from_numpy``, ``torch.as_tensor`` and ``Tensor.numpy`` are C functions with no
hook. While a detector consumes this event they are replaced by thin wrappers (shared,
reference-counted patches) that call the original and report the alias just made when the
caller is the user's code. Calls from torch itself (``DataLoader`` collation,
``Tensor.__array__``), gradguard or a framework are not reported, and a forked
``DataLoader`` worker reports nothing.

The legacy constructors alias too: ``torch.Tensor(a)`` and ``torch.FloatTensor(a)``,
``torch.LongTensor(a)``... share ``a``'s memory when its dtype is theirs. Neither can be
wrapped like a function:

- ``torch.Tensor`` is the base class of every tensor. It gets an ``__init__`` while
  attached: Python calls it after ``torch.Tensor(...)`` or ``Subclass(...)`` has built the
  tensor, with the same arguments, and never for the tensors torch makes itself (they are
  allocated in C, without ``tp_init``). Setting ``__new__`` instead would leave
  ``torch.Tensor`` on a slower slot for good once deleted; deleting ``__init__`` restores
  ``object``'s exactly.
- ``torch.FloatTensor`` and its kin are immutable C types. The module attributes are
  replaced by stand-ins (:class:`TypedConstructor`) that build through the original and
  answer ``isinstance``, ``issubclass``, ``==``, ``hash``, attributes, ``x.type(T)`` and
  pickling by name as it does; ``torch.set_default_tensor_type`` is given the original.
  ``torch.cuda.*Tensor`` cannot alias host memory and is left alone.
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


def _wrap_tensor_init(original: Callable[..., None], notify: Callable[..., None]) -> Callable[..., None]:
    def __init__(self: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if not (args or kwargs):
            return  # super().__init__() from a subclass (FakeTensor...)
        if type(self).__init__ is not __init__:
            original(self, *args, **kwargs)  # a subclass's __init__ passed arguments up: object's TypeError
            return
        data = args[0] if args else kwargs.get("data")
        if isinstance(data, np.ndarray):
            frame = sys._getframe(1)
            if not is_library_file(frame.f_code.co_filename):
                how = "torch.Tensor" if type(self) is torch.Tensor else type(self).__qualname__
                notify(data, self, how, frame)

    return __init__


class TypedConstructor(type):
    """The class of the stand-ins for ``torch.FloatTensor`` and kin while attached (see :func:`_wrap_typed`).

    Calling one calls the original and reports an ndarray argument; everything else is
    answered by the original.
    """

    # Named as torch's own metaclass of these classes: torch.compile recognises ``x.type(T)``
    # by that name and traces it, where an unknown class would break the graph.
    __module__ = "torch"
    __qualname__ = "tensortype"

    original: Any
    notify: Callable[..., None]
    how: str

    def __call__(cls, *args: Any, **kwargs: Any) -> torch.Tensor:
        tensor = cls.original(*args, **kwargs)
        data = args[0] if args else kwargs.get("data")
        if isinstance(data, np.ndarray):
            frame = sys._getframe(1)
            if not is_library_file(frame.f_code.co_filename):
                cls.notify(data, tensor, cls.how, frame)
        return tensor

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, cls.original)

    def __subclasscheck__(cls, sub: Any) -> bool:
        return sub is cls or issubclass(sub, cls.original)

    def __getattr__(cls, name: str) -> Any:
        return getattr(cls.original, name)  # dtype, is_cuda, is_sparse

    def __dir__(cls) -> list[str]:
        return dir(cls.original)

    def __eq__(cls, other: object) -> bool:
        return other is cls or other is cls.original  # dicts keyed by the real class still find it

    def __hash__(cls) -> int:
        return hash(cls.original)

    def __repr__(cls) -> str:
        return repr(cls.original)

    @property
    def __name__(cls) -> str:  # type: ignore[override]  # its own name is dotted, for x.type(T), read from C
        return str(cls.original.__name__)


def _wrap_typed(original: Any, notify: Callable[..., None]) -> TypedConstructor:
    """The stand-in for a legacy constructor: it builds through it, and answers as it does.

    >>> import torch
    >>> stand_in = _wrap_typed(torch.FloatTensor, lambda *args: None)
    >>> stand_in([1.0, 2.0]), isinstance(torch.zeros(1), stand_in), stand_in == torch.FloatTensor
    (tensor([1., 2.]), True, True)
    >>> stand_in, stand_in.dtype, torch.zeros(1, dtype=torch.int64).type(stand_in).dtype
    (<class 'torch.FloatTensor'>, torch.float32, torch.float32)
    """
    name = f"{original.__module__}.{original.__qualname__}"
    attrs = {
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "__doc__": original.__doc__,
        "__slots__": (),
        "original": original,
        "notify": staticmethod(notify),
        "how": name,
    }
    return TypedConstructor(name, (), attrs)  # named "torch.FloatTensor": what x.type(T) reads


def _wrap_set_default_tensor_type(original: Callable[..., None], notify: Callable[..., None]) -> Callable[..., None]:
    def _set_default_tensor_type(t: Any) -> None:
        original(t.original if isinstance(t, TypedConstructor) else t)  # C wants the real class

    return _set_default_tensor_type


#: The legacy CPU constructors that can alias an array (numpy has no bfloat16).
TYPED = (
    "FloatTensor",
    "DoubleTensor",
    "HalfTensor",
    "LongTensor",
    "IntTensor",
    "ShortTensor",
    "CharTensor",
    "ByteTensor",
    "BoolTensor",
)

PATCHES = (
    Patch(torch, "from_numpy", _wrap_from_numpy),
    Patch(torch, "as_tensor", _wrap_as_tensor),
    Patch(torch.Tensor, "numpy", _wrap_numpy),
    Patch(torch.Tensor, "__init__", _wrap_tensor_init),
    *(Patch(torch, name, _wrap_typed) for name in TYPED),
    Patch(torch._C, "_set_default_tensor_type", _wrap_set_default_tensor_type),
)


def original(name: str) -> Callable[..., Any]:
    """The unpatched ``from_numpy``, ``as_tensor``, ``numpy``, ``FloatTensor``..."""
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
