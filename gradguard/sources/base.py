"""What a source is, and what it may ask of the guard that runs it."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from torch.utils.hooks import RemovableHandle

from gradguard.events import Event

if TYPE_CHECKING:
    import torch

    from gradguard.run import Run
    from gradguard.sources.patch import Patch


class Hub(Protocol):
    """The guard, as its sources see it."""

    run: Run

    def wants(self, event: type[Event]) -> bool:
        """Whether any detector consumes ``event`` (build no event nobody consumes)."""

    def emit(self, event: Event) -> None:
        """Deliver an event to the detectors that consume it."""

    def add_model(self, module: torch.nn.Module) -> None:
        """Watch a root module found by a source."""

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Watch an optimizer found by a source."""

    def forward_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A watched root's forward starts (an iteration)."""

    def forward_post(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """A watched root's forward returned."""

    def step_pre(self, optimizer: torch.optim.Optimizer) -> None:
        """A watched optimizer's step() starts."""

    def step_post(self, optimizer: torch.optim.Optimizer) -> None:
        """A watched optimizer's step() returned."""

    def backward(self, post: bool, tensors: tuple[Any, ...]) -> None:
        """backward() starts (``post`` false) or returned."""

    def module_changed(self, module: torch.nn.Module) -> None:
        """A module got a parameter or a submodule: derived caches may be stale."""

    def module_replacing(self, module: torch.nn.Module, name: str, old: torch.nn.Module | torch.Tensor) -> None:
        """``module.<name>``, a submodule or parameter, is about to be replaced by another."""

    def source_failed(self, source: Source, exc: BaseException) -> None:
        """A source's own code raised: stop it, report GG000, let training go on."""


class Hooks:
    """The hooks a source put on each object, the object held weakly, removed together.

    ``on_remove`` is told of each handle removed (the module source forgets its ids).
    """

    def __init__(self, on_remove: Callable[[RemovableHandle], None] | None = None) -> None:
        self._by_id: dict[int, tuple[weakref.ref[Any], list[RemovableHandle]]] = {}
        self._on_remove = on_remove

    def __contains__(self, obj: object) -> bool:
        known = self._by_id.get(id(obj))
        return known is not None and known[0]() is obj

    def add(self, obj: Any, handles: list[RemovableHandle]) -> None:
        self._by_id[id(obj)] = (weakref.ref(obj), handles)

    def objects(self) -> list[Any]:
        """The live objects that carry hooks."""
        return [obj for obj in (ref() for ref, _ in list(self._by_id.values())) if obj is not None]

    def remove(self, obj: object) -> None:
        known = self._by_id.pop(id(obj), None)
        if known is not None:
            self._remove(known[1])

    def remove_all(self) -> None:
        for _ref, handles in self._by_id.values():
            self._remove(handles)
        self._by_id.clear()

    def _remove(self, handles: list[RemovableHandle]) -> None:
        for handle in handles:
            handle.remove()
            if self._on_remove is not None:
                self._on_remove(handle)


class Source:
    """Turns one kind of signal from torch or the program into events.

    The guard starts a source when a detector consumes one of the events it ``provides``
    (or always, for the sources the guard itself needs), and stops it on detach: a stopped
    source has removed every hook and patch, and holds no user object.
    """

    provides: ClassVar[tuple[type[Event], ...]] = ()
    #: started for every guard (its step and iteration counters need it)
    always: ClassVar[bool] = False

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def start(self) -> None:
        """Register hooks or patches."""

    def stop(self) -> None:
        """Remove every hook and patch; drop every reference to user objects."""

    def refresh(self) -> None:
        """A cheap look for changes no hook reports; the guard calls it at each step of the warm-up, then every 8th."""


class PatchSource(Source):
    """A source whose signal comes from patched functions: it listens to them while started."""

    patches: ClassVar[Sequence[Patch]] = ()

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub)
        self._subscribed: list[Patch] = []  # in order; a start that failed half-way is undone by stop()

    def start(self) -> None:
        for patch in self.patches:
            patch.subscribe(self.notify)
            self._subscribed.append(patch)

    def stop(self) -> None:
        failed: BaseException | None = None
        while self._subscribed:
            try:
                self._subscribed.pop().unsubscribe(self.notify)
            except Exception as exc:  # the other patches are put back all the same
                failed = failed or exc
        if failed is not None:
            raise failed

    def notify(self, *args: Any) -> None:
        """What the patched functions report; turned into events."""
        raise NotImplementedError
