"""Misspelt ``requires_grad`` assignments on tensors: ``AttributeSet`` events.

``p.requres_grad = False`` calls no function that could be wrapped, and replacing
``Tensor.__setattr__`` would slow every attribute store of every tensor (``p.grad = None``
in each ``zero_grad()``). Instead the program's own source files are read, once each, for
the near misses of ``requires_grad`` they assign: when the source starts, and at the
guard's periodic look whenever the process has imported a module, changed its ``__main__``
or got a notebook cell since the last one (otherwise that look compares three counters and
stops). Only for a name found there does a data descriptor of that name stand on
``torch.Tensor`` (a shared, reference-counted patch): it stores the value on the tensor as
Python would have, and reports the store when the caller is the user's code, not torch
(``torch.load`` restoring a tensor's attributes). Every other attribute, and every tensor
of a program that misspells nothing, is left alone. A name first found after the program
may have used it is looked for once on the watched parameters.
"""

from __future__ import annotations

import functools
import linecache
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch

from gradguard.events import AttributeSet
from gradguard.introspect.frames import is_library_file, program_files
from gradguard.introspect.spelling import misspelt_assignments
from gradguard.sources.base import Hub, Source
from gradguard.sources.patch import ABSENT, Patch


class _Watched:
    """Stands on ``torch.Tensor`` for one name: a plain instance attribute that reports its stores."""

    def __init__(self, name: str, inherited: Any, notify: Callable[..., None]) -> None:
        self.name = name
        self.inherited = inherited  # what tensors without the attribute answer (a method), or ABSENT
        self.notify = notify

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        inherited = self.inherited
        if obj is None:  # on the class, as a property answers (torch.compile reads every name of dir(Tensor))
            return self if inherited is ABSENT else _bind(inherited, None, owner)
        attrs = obj.__dict__
        if self.name in attrs:
            return attrs[self.name]
        if inherited is ABSENT:
            raise AttributeError(f"'{type(obj).__name__}' object has no attribute '{self.name}'")
        return _bind(inherited, obj, type(obj))

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = value
        self.notify(obj, self.name, value, sys._getframe(1))

    def __delete__(self, obj: Any) -> None:
        try:
            del obj.__dict__[self.name]
        except KeyError:
            raise AttributeError(self.name) from None


def _bind(attribute: Any, obj: Any, owner: type | None) -> Any:
    bind = getattr(type(attribute), "__get__", None)
    return attribute if bind is None else bind(attribute, obj, owner)


def _watch(name: str, original: Any, notify: Callable[..., None]) -> Any:
    inherited = ABSENT
    if original is not ABSENT:  # ``requires_grad_``, the method: found raw in the class that defines it
        inherited = next(vars(k)[name] for k in torch.Tensor.__mro__ if name in vars(k))
    return _Watched(name, inherited, notify)


_PATCHES: dict[str, Patch] = {}


def _patch(name: str) -> Patch:
    patch = _PATCHES.get(name)
    if patch is None:
        patch = _PATCHES[name] = Patch(torch.Tensor, name, functools.partial(_watch, name))
    return patch


def watched() -> list[str]:
    """The attribute names watched on tensors right now.

    >>> watched()
    []
    """
    return sorted(name for name, patch in _PATCHES.items() if patch.active)


def _forget_in_child() -> None:
    for patch in _PATCHES.values():
        patch.clear_listeners()  # a forked worker reports nothing: nobody would see it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class AttributeSource(Source):
    """Events for each misspelt ``requires_grad`` the user's code sets on a tensor."""

    provides = (AttributeSet,)

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub)
        self._files: set[str] = set()
        self._names: set[str] = set()
        self._stamp: tuple[int, int, int] = (-1, -1, -1)

    def start(self) -> None:
        self._look(sweep=False)  # what is set already, the guard's first checks see

    def stop(self) -> None:
        for name in self._names:
            _patch(name).unsubscribe(self.notify)
        self._names.clear()
        self._files.clear()
        self._stamp = (-1, -1, -1)

    def refresh(self) -> None:
        self._look(sweep=True)

    def notify(self, tensor: torch.Tensor, name: str, value: Any, frame: Any) -> None:
        try:
            user = not is_library_file(frame.f_code.co_filename)  # not torch.load restoring a tensor's state
        except Exception as exc:
            self.hub.source_failed(self, exc)
            return
        if user and self.hub.wants(AttributeSet):
            self.hub.emit(AttributeSet(tensor, name, value, frame))

    # ------------------------------------------------------------------ internals
    def _look(self, sweep: bool) -> None:
        stamp = (len(sys.modules), id(sys.modules.get("__main__")), len(linecache.cache))
        if stamp == self._stamp:
            return
        self._stamp = stamp
        new: list[str] = []
        for filename in program_files():
            if filename in self._files:
                continue
            self._files.add(filename)
            for name in misspelt_assignments(filename):
                if name not in self._names:
                    self._names.add(name)
                    _patch(name).subscribe(self.notify)
                    new.append(name)
        if sweep and new:
            self._sweep(new)

    def _sweep(self, names: list[str]) -> None:
        """Report the watched parameters that got one of ``names`` before it was watched."""
        run = self.hub.run
        params: Iterable[torch.Tensor] = [p for _, p in run.named_parameters()] + [
            p for opt in run.optimizers() for group in opt.param_groups for p in group["params"]
        ]
        seen: set[int] = set()
        for param in params:
            attrs = getattr(param, "__dict__", None)
            if not attrs or id(param) in seen:
                continue
            seen.add(id(param))
            for name in names:
                if name in attrs:
                    self.hub.emit(AttributeSet(param, name, attrs[name], None))
