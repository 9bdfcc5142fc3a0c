"""Which variable, attribute or container of the user's holds an object.

Everything compares by identity (``is``), never by value, and reads a frame's locals with
:func:`~gradguard.introspect.frames.frame_variables`, so that looking never keeps the
user's tensors alive.

Example:
    >>> import sys
    >>> def loop():
    ...     history = [object()]
    ...     return name_in_frame(sys._getframe(), history[0], containers=True)
    >>> loop()
    'history'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from types import FrameType
from typing import Any

import torch

from gradguard.introspect.frames import frame_variables

_SCAN_CONTAINER = 10_000  # longest list or dict searched for an item


@dataclasses.dataclass(frozen=True)
class Name:
    """A name for an object, and where to look for the line that fills it.

    ``frame`` is the frame whose variable holds it; ``owner`` the object whose attribute
    ``attribute`` holds it (a module of the model, or ``self`` of a frame).
    """

    text: str
    frame: FrameType | None = None
    owner: Any = None
    attribute: str | None = None


def name_in_frame(
    frame: FrameType | None,
    *targets: Any,
    globals_: bool = False,
    attributes: bool = True,
    containers: bool = False,
) -> str | None:
    """The name of a variable of ``frame`` bound to one of ``targets``.

    Locals first, then (``globals_``) the module's globals, then (``attributes``)
    ``self.<attr>`` of a method's ``self``, then (``containers``) a list, tuple or dict
    variable that holds one of them.
    """
    if frame is None:
        return None
    wanted = [t for t in targets if t is not None]
    if not wanted:
        return None
    scopes = [frame_variables(frame)]
    if globals_ and frame.f_globals is not frame.f_locals:
        scopes.append([(k, v) for k, v in frame.f_globals.items() if isinstance(k, str)])
    for scope in scopes:
        for name, value in scope:
            if not name.startswith("__") and any(value is t for t in wanted):
                return name
    names = dict(scopes[0])
    if attributes:
        attrs = getattr(names.get("self"), "__dict__", None)
        if isinstance(attrs, dict):
            for name, value in attrs.items():
                if any(value is t for t in wanted):
                    return f"self.{name}"
    if containers:
        for name, value in names.items():
            if any(_holds(value, t) for t in wanted):
                return name
    return None


def _holds(container: Any, target: Any) -> bool:
    if isinstance(container, (list, tuple)) and len(container) <= _SCAN_CONTAINER:
        items: Iterable[Any] = container
    elif isinstance(container, dict) and len(container) <= _SCAN_CONTAINER:
        items = container.values()
    else:
        return False
    return any(item is target for item in items)


class Namer:
    """Names many objects by the variables of some frames and the attributes of some models."""

    def __init__(self, frames: list[FrameType], models: list[torch.nn.Module]) -> None:
        self.models = models
        #: each frame's variables (a copy), then the globals of each frame's module
        self.scopes: list[tuple[dict[str, Any], FrameType]] = []
        for frame in frames:
            self.scopes.append((dict(frame_variables(frame)), frame))
        seen: set[int] = set()
        for frame in frames:
            if frame.f_globals is not frame.f_locals and id(frame.f_globals) not in seen:
                seen.add(id(frame.f_globals))
                self.scopes.append((frame.f_globals, frame))
        #: the dictionaries above: referrers of every object they hold, to be ignored
        self.scope_ids: set[int] = {id(scope) for scope, _ in self.scopes} | seen

    def name(self, obj: Any) -> Name | None:
        """A variable of the frames, or an attribute of a model's module, that holds ``obj``."""
        for scope, frame in self.scopes:
            for key, value in list(scope.items()):
                if value is obj and isinstance(key, str):
                    return Name(key, frame=frame)
        for model in self.models:
            found = self._in_model(model, obj)
            if found is not None:
                return found
        return None

    def _in_model(self, model: torch.nn.Module, obj: Any) -> Name | None:
        for path, module in model.named_modules():
            for attr, value in vars(module).items():
                if value is obj:
                    prefix = self.model_name(model)
                    return Name(".".join(p for p in (prefix, path, attr) if p), owner=module, attribute=attr)
        return None

    def model_name(self, model: torch.nn.Module) -> str:
        """The variable that holds the model (``model`` when none is found)."""
        for scope, _ in self.scopes:
            for key, value in list(scope.items()):
                if value is model and key != "self" and isinstance(key, str):
                    return key
        return "model"
