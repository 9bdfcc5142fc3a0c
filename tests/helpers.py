"""Small helpers shared by the tests."""

from __future__ import annotations

import inspect
import os


def line_of(marker: str, path: str | None = None) -> int:
    """The line number of the only line of ``path`` (default: the caller's file) ending with ``marker``."""
    if path is None:
        path = inspect.stack()[1].filename
    with open(path, encoding="utf-8") as fh:
        hits = [i for i, line in enumerate(fh, start=1) if line.rstrip().endswith(marker)]
    if len(hits) != 1:
        raise AssertionError(f"expected one line with {marker!r} in {path}, found {hits}")
    return hits[0]


def codes(findings) -> list[str]:
    return sorted(f.code for f in findings)


def same_file(location_file: str, path: str) -> bool:
    return os.path.abspath(location_file) == os.path.abspath(path)
