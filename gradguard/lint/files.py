"""Which files ``gradguard lint`` reads: the files named, and the Python files and notebooks under folders."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence

from gradguard.errors import ConfigurationError

#: Folders never searched (a path named on the command line is always linted).
SKIPPED = frozenset(
    {".git", ".hg", ".svn", ".venv", "venv", "__pycache__", "node_modules", "build", "dist", ".tox", ".nox",
     ".eggs", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".ipynb_checkpoints", "site-packages"}
)  # fmt: skip
SUFFIXES = (".py", ".ipynb")


def discover(paths: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """The files to lint under ``paths``, each once, in order: files named as they are, folders searched.

    A folder's ``.py`` and ``.ipynb`` files are found recursively, skipping :data:`SKIPPED`
    folders, hidden ones and those matching an ``exclude`` pattern (matched, as with
    :mod:`fnmatch`, against a file's or folder's name and its path). A path that does not
    exist raises :class:`~gradguard.errors.ConfigurationError`.
    """
    if isinstance(paths, str):
        raise ConfigurationError(f"Expected paths to be a list of paths but got the string {paths!r}")
    found: dict[str, None] = {}
    for path in paths:
        if os.path.isfile(path):
            found.setdefault(os.path.normpath(path))
        elif os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(
                    d
                    for d in dirs
                    if d not in SKIPPED
                    and not d.startswith(".")
                    and not d.endswith(".egg-info")
                    and not _excluded(os.path.join(root, d), exclude)
                )
                for name in sorted(files):
                    full = os.path.normpath(os.path.join(root, name))
                    if name.endswith(SUFFIXES) and not _excluded(full, exclude):
                        found.setdefault(full)
        else:
            raise ConfigurationError(f"no such file or folder: {path}")
    return list(found)


def _excluded(path: str, patterns: Sequence[str]) -> bool:
    if not patterns:
        return False
    name = os.path.basename(path)
    rel = display_path(path)
    return any(
        fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel, p.rstrip("/") + "/*")
        for p in patterns
    )


def display_path(path: str) -> str:
    """``path`` relative to the current folder when inside it, with ``/``; else absolute."""
    full = os.path.abspath(path)
    try:
        rel = os.path.relpath(full)
    except ValueError:
        return full
    return full if rel.startswith(os.pardir) else rel.replace(os.sep, "/")
