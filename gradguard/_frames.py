"""Find the user's own frame on the stack, skipping gradguard, torch and frameworks."""

from __future__ import annotations

import inspect
import os
import sys
import sysconfig
from types import FrameType

from gradguard.findings import Location

_PKG_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _library_prefixes() -> tuple[str, ...]:
    prefixes = [_PKG_DIR]
    for name in ("torch", "lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics"):
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            prefixes.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    stdlib = sysconfig.get_paths().get("stdlib")
    if stdlib:
        prefixes.append(os.path.abspath(stdlib) + os.sep)
    return tuple(prefixes)


_GENERATED = ("<frozen", "<eval_with_key", "<built-in", "<torch")

_prefix_cache: tuple[int, tuple[str, ...]] = (-1, ())
_file_cache: dict[str, bool] = {}


def _is_library_file(filename: str) -> bool:
    global _prefix_cache
    known = _file_cache.get(filename)
    if known is not None:
        return known
    if _prefix_cache[0] != len(sys.modules):
        _prefix_cache = (len(sys.modules), _library_prefixes())
    if filename.startswith("<"):
        result = filename.startswith(_GENERATED)  # frozen importlib, torch.fx; not <stdin>, <string>
    else:
        result = os.path.abspath(filename).startswith(_prefix_cache[1])
    _file_cache[filename] = result
    return result


def user_frame(start: FrameType | None = None) -> FrameType | None:
    """The innermost frame that belongs to the user's code, or ``None``."""
    frame: FrameType | None = start if start is not None else sys._getframe(1)
    while frame is not None:
        if not _is_library_file(frame.f_code.co_filename):
            return frame
        frame = frame.f_back
    return None


def user_location(start: FrameType | None = None) -> Location | None:
    """The file and line of the innermost user frame, or ``None`` if there is none."""
    frame = user_frame(start if start is not None else sys._getframe(1))
    if frame is None:
        return None
    return Location(_display_path(frame.f_code.co_filename), frame.f_lineno, frame.f_code.co_name)


def _display_path(filename: str) -> str:
    try:
        rel = os.path.relpath(filename)
    except ValueError:  # another drive on Windows
        return filename
    return filename if rel.startswith(".." + os.sep) else rel


def name_in_frame(obj: object, frame: FrameType | None) -> str | None:
    """The name of a local or global variable of ``frame`` bound to ``obj`` (by identity)."""
    if frame is None:
        return None
    for scope in (frame.f_locals, frame.f_globals):
        for name, value in scope.items():
            if value is obj and not name.startswith("__"):
                return name
    return None


_SNAPSHOT_LOCALS = sys.version_info < (3, 13)
_CO_OPTIMIZED = inspect.CO_OPTIMIZED


def frame_variables(frame: FrameType) -> list[tuple[str, object]]:
    """A frame's local variables, read without keeping them alive afterwards.

    Before Python 3.13, ``frame.f_locals`` of a function fills a snapshot dictionary that
    the frame keeps, which would hold the user's tensors alive after the user dropped them.
    The snapshot is emptied again, but only when nothing else holds it: a dictionary the
    user took with ``locals()`` is never touched. The frame refills it at its next access.
    """
    scope = frame.f_locals
    items = [(k, v) for k, v in scope.items() if isinstance(k, str)]
    if (
        _SNAPSHOT_LOCALS
        and frame.f_code.co_flags & _CO_OPTIMIZED
        and type(scope) is dict
        and sys.getrefcount(scope) <= 3  # the frame, `scope` and getrefcount's argument
    ):
        scope.clear()
    return items
