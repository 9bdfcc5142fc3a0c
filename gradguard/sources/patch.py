"""One shared, reference-counted way to replace a function of torch while a guard needs it.

Some signals have no hook in torch (``backward()``, ``torch.from_numpy``, a scheduler's
``step()``). A :class:`Patch` replaces the attribute with a thin wrapper while at least one
listener is subscribed, and puts the original back exactly when the last one leaves. The
wrapper holds its original in a closure, so a reference taken while patched keeps working
as the plain function afterwards, and it calls the listeners only while there are any.
An attribute the owner does not have can be patched too: the wrapper is given
:data:`ABSENT` as the original, and the attribute is deleted again when the last listener
leaves.

Example:
    >>> import types
    >>> ns = types.SimpleNamespace(double=lambda x: 2 * x)
    >>> original = ns.double
    >>> def wrap(fn, notify):
    ...     def double(x):
    ...         out = fn(x)
    ...         notify(x, out)
    ...         return out
    ...     return double
    >>> patch = Patch(ns, "double", wrap)
    >>> seen = []
    >>> patch.subscribe(lambda x, out: seen.append(out))
    >>> ns.double(3), seen, patch.active
    (6, [6], True)
    >>> patch.unsubscribe(patch.listeners[0]); ns.double is original
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

#: The original given to a wrapper of an attribute that the owner does not have.
ABSENT: Any = object()
#: Builds the wrapper from the original and a function that notifies every listener.
Wrapper = Callable[[Callable[..., Any], Callable[..., None]], Callable[..., Any]]


class Patch:
    """A reference-counted replacement of ``owner.name``."""

    def __init__(self, owner: Any, name: str, wrap: Wrapper) -> None:
        self.owner = owner
        self.name = name
        self.wrap = wrap
        self.listeners: list[Callable[..., None]] = []
        self._original: Any = None
        self._owned = False
        self._wrapper: Any = None
        self._generation = 0

    @property
    def active(self) -> bool:
        return self._wrapper is not None

    @property
    def original(self) -> Any:
        """The unpatched attribute (the current one when not patched)."""
        return self._original if self._wrapper is not None else getattr(self.owner, self.name)

    def subscribe(self, listener: Callable[..., None]) -> None:
        """Add a listener; install the wrapper with the first one."""
        if self._wrapper is None:
            original = getattr(self.owner, self.name, ABSENT)
            self._original = original
            self._owned = self.name in vars(self.owner)  # else inherited (torch.Tensor.numpy)
            self._generation += 1
            generation = self._generation

            def notify(*args: Any) -> None:
                if generation == self._generation and self._wrapper is not None:
                    self._notify(*args)  # an old wrapper left in place by someone else stays inert

            wrapper = self.wrap(original, notify)
            if callable(original) and callable(wrapper) and not isinstance(wrapper, type):  # a class keeps its own name
                wrapper = functools.wraps(original)(wrapper)
            self._wrapper = wrapper
            setattr(self.owner, self.name, wrapper)
        self.listeners.append(listener)

    def unsubscribe(self, listener: Callable[..., None]) -> None:
        """Remove a listener; put the original back when none is left."""
        if listener in self.listeners:
            self.listeners.remove(listener)
        if self.listeners or self._wrapper is None:
            return
        if vars(self.owner).get(self.name) is self._wrapper:
            if self._owned:
                setattr(self.owner, self.name, self._original)
            else:
                delattr(self.owner, self.name)
        # else someone wrapped ours since: leave theirs, ours is inert without listeners
        self._wrapper = None
        self._original = None

    def clear_listeners(self) -> None:
        """Forget every listener without touching the attribute (a forked child process)."""
        self.listeners.clear()

    def _notify(self, *args: Any) -> None:
        for listener in list(self.listeners):
            listener(*args)
