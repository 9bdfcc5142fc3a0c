"""Where a report goes: files (JSON, HTML, SARIF) and what is printed, checked before a run."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from typing import Any

from gradguard.errors import ConfigurationError


@dataclasses.dataclass(frozen=True)
class Outputs:
    """The report files to write and the format to print."""

    json: str | None = None
    html: str | None = None
    sarif: str | None = None
    format: str = "text"
    strict: bool = False

    def files(self) -> list[tuple[str, str]]:
        """``(option, path)`` of each file to write."""
        named = (("--json", self.json), ("--html", self.html), ("--sarif", self.sarif))
        return [(option, path) for option, path in named if path is not None]

    def write(self, report: dict[str, Any], *, text_to_stderr: bool, quiet: bool = False) -> bool:
        """Print the report in :attr:`format` and write the files; ``False`` if a file failed.

        With ``text_to_stderr`` (``gradguard run``, whose program owns standard output) the
        text summary and the notes go to standard error, and another format to standard output.
        ``quiet`` (a rank other than 0, whose findings rank 0 prints) writes the files and
        prints nothing but a file that could not be written.
        """
        from gradguard.formats import render
        from gradguard.report import write_json_atomic, write_text_atomic

        notes = sys.stderr
        if text_to_stderr and not quiet:
            print(render(report, "text"), file=sys.stderr)
        if not quiet and (self.format != "text" or not text_to_stderr):
            sys.stdout.write(render(report, self.format).rstrip("\n") + "\n")
            sys.stdout.flush()
        ok = True
        for option, path in self.files():
            try:
                if option == "--json":
                    write_json_atomic(report, path)
                elif option == "--html":
                    from gradguard.report_html import render_html

                    write_text_atomic(render_html(report), path)
                else:
                    write_json_atomic(_sarif(report), path)
            except OSError as exc:
                print(f"gradguard: could not write {path}: {exc.strerror or exc}", file=notes)
                ok = False
                continue
            if not quiet:
                print(f"gradguard: {option[2:].upper()} report written to {path}", file=notes)
        return ok


def _sarif(report: dict[str, Any]) -> dict[str, Any]:
    from gradguard.formats import to_sarif

    return to_sarif(report)


def check_outputs(outputs: Outputs, *, program: str | None) -> None:
    """Raise :class:`ConfigurationError` (one line) unless every report file can be written.

    Checked before the program runs, so that a bad path costs nothing: a folder, a file in a
    folder that cannot be made or written, the program itself, or one path given twice.
    """
    seen: dict[str, str] = {}
    for option, path in outputs.files():
        problem = unwritable(path)
        if problem is not None:
            raise ConfigurationError(f"{option} {path}: {problem}")
        real = os.path.realpath(path)
        if program is not None and real == os.path.realpath(program):
            raise ConfigurationError(f"{option} {path}: that is the program to run")
        if real in seen:
            raise ConfigurationError(f"{seen[real]} and {option} name the same file {path}")
        seen[real] = option


def unwritable(path: str) -> str | None:
    """Why ``path`` cannot be written as a file, or ``None`` if it can.

    >>> unwritable("/")
    'is a directory'
    """
    if path == "" or path.endswith(os.sep):
        return "is a directory" if os.path.isdir(path or ".") else "expected a file name"
    full = os.path.abspath(path)
    if os.path.isdir(full):
        return "is a directory"
    if os.path.exists(full) and not os.access(full, os.W_OK):
        return "is not writable"
    folder = os.path.dirname(full)
    while not os.path.exists(folder):  # the report writer makes missing folders
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is not a directory"
    try:  # permissions alone do not tell (a read-only mount, /proc, a full disk): make a file
        fd, probe = tempfile.mkstemp(prefix=".gradguard-", dir=folder)
    except OSError as exc:
        return f"cannot write in {folder}: {exc.strerror or exc}"
    os.close(fd)
    os.unlink(probe)
    return None
