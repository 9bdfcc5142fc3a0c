"""The user's own frames on the stack: skipping gradguard, torch, frameworks and the stdlib.

Example:
    >>> import sys
    >>> def train():
    ...     return user_location(sys._getframe())
    >>> train().function
    'train'
"""

from __future__ import annotations

import inspect
import linecache
import os
import sys
import sysconfig
from types import CodeType, FrameType, ModuleType

from gradguard.findings import Location

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_LIBRARIES = ("torch", "lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "accelerate")
_SITE = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


def _library_prefixes() -> tuple[str, ...]:
    prefixes = [_PKG_DIR]
    for name in _LIBRARIES:
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


def is_library_file(filename: str) -> bool:
    """Whether a file belongs to gradguard, torch, a training framework or the stdlib."""
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


def is_installed_file(filename: str) -> bool:
    """Whether a file is a library's (as :func:`is_library_file`) or any installed package's."""
    return is_library_file(filename) or any(s in filename for s in _SITE)


def user_frame(start: FrameType | None = None) -> FrameType | None:
    """The innermost frame that belongs to the user's code, or ``None``."""
    frame: FrameType | None = start if start is not None else sys._getframe(1)
    while frame is not None:
        if not is_library_file(frame.f_code.co_filename):
            return frame
        frame = frame.f_back
    return None


def user_frames(limit: int = 40, *, start: FrameType | None = None, installed: bool = True) -> list[FrameType]:
    """The user's frames, innermost first.

    With ``installed=False`` the frames of installed packages (``site-packages``) are left
    out too, except the innermost user frame: the training loop's own frames.
    """
    first = user_frame(start if start is not None else sys._getframe(1))
    out: list[FrameType] = []
    frame = first
    depth = 0
    while frame is not None and len(out) < limit and depth < 256:
        filename = frame.f_code.co_filename
        skip = is_library_file(filename) if installed else is_installed_file(filename)
        if frame is first or not skip:
            out.append(frame)
        frame = frame.f_back
        depth += 1
    return out


def user_files() -> list[str]:
    """The user's source files on the stack now, innermost first, then the main script."""
    files: list[str] = []
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not is_library_file(filename) and not filename.startswith("<") and filename not in files:
            files.append(filename)
        frame = frame.f_back
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main and not is_library_file(main) and main not in files:
        files.append(main)
    return files


def program_files() -> list[str]:
    """Every source file of the user's program that the process knows of, each once.

    The user's files on the stack now (:func:`user_files`), then the ``.py`` files of the
    imported modules that belong neither to a library nor to an installed package, then the
    sources that only :mod:`linecache` holds (notebook cells, which have no file).
    """
    files = user_files()
    seen = set(files)
    for module in list(sys.modules.values()):
        if not isinstance(module, ModuleType):
            continue
        filename = object.__getattribute__(module, "__dict__").get("__file__")  # never loads a lazy module
        if isinstance(filename, str) and filename.endswith(".py") and filename not in seen:
            seen.add(filename)
            if not is_installed_file(filename):
                files.append(filename)
    for filename, entry in list(linecache.cache.items()):
        if len(entry) == 4 and entry[1] is None and filename not in seen and not is_installed_file(filename):
            seen.add(filename)
            files.append(filename)
    return files


_MODULES: tuple[int, list[ModuleType]] = (-1, [])


def user_modules() -> list[ModuleType]:
    """The imported modules of the user's program (not a library's, not an installed package's).

    Computed again only when the number of imported modules changes.
    """
    global _MODULES
    count = len(sys.modules)
    if _MODULES[0] != count:
        found = []
        for module in list(sys.modules.values()):
            if not isinstance(module, ModuleType):
                continue
            filename = object.__getattribute__(module, "__dict__").get("__file__")  # never loads a lazy module
            if (
                isinstance(filename, str)
                and filename.endswith(".py")
                and not is_library_file(filename)
                and not is_installed_file(filename)
            ):
                found.append(module)
        _MODULES = (count, found)
    return list(_MODULES[1])


def user_location(start: FrameType | None = None) -> Location | None:
    """The file and line of the innermost user frame, or ``None`` if there is none."""
    frame = user_frame(start if start is not None else sys._getframe(1))
    if frame is None:
        return None
    return frame_location(frame)


def frame_location(frame: FrameType) -> Location:
    """Where a frame is now: its file, current line and function."""
    return Location(display_path(frame.f_code.co_filename), frame.f_lineno, frame.f_code.co_name)


def code_location(code: CodeType, line: int | None = None) -> Location:
    """A line of a code object (its first line by default)."""
    return Location(display_path(code.co_filename), line or code.co_firstlineno, code.co_name)


def display_path(filename: str) -> str:
    """A path relative to the working directory when it is below it, else as it is."""
    try:
        rel = os.path.relpath(filename)
    except ValueError:  # another drive on Windows
        return filename
    return filename if rel.startswith(".." + os.sep) else rel


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
