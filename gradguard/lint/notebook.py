"""Jupyter notebooks: their code cells as one Python module, and fixes written back into the cells.

Cells are read with :mod:`json` (the notebook format is plain JSON). IPython syntax is kept
out of the module: a line magic (``%time``), a shell line (``!pip``), ``x = !ls``, a help
line (``obj?``) and every line of a cell magic (``%%bash``) become ``pass`` at the same
indentation, so the lines keep their numbers and the module parses. Fixes never touch
those lines, and a cell whose lines no fix changed is written back as it was.

Example:
    >>> nb = Notebook("n.ipynb", r'{"cells": [{"cell_type": "code", "source": ["%time x = 1\\n", "y = 2"]}]}')
    >>> nb.text
    'pass\\ny = 2\\n'
    >>> nb.cells
    [(1, 1), (1, 2)]
"""

from __future__ import annotations

import json
import re
from typing import Any

_MAGIC = re.compile(r"^\s*(?:[%!]|[\w.]+\s*=\s*[%!])|\?\s*$")


class Notebook:
    """A notebook's code cells as one module (``text``), with each line's (cell, line in cell) in ``cells``.

    Raises ``ValueError`` for text that is not a notebook.
    """

    def __init__(self, path: str, raw: str) -> None:
        self.path = path
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a notebook: invalid JSON ({exc})") from None
        if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
            raise ValueError("not a notebook: no list of cells")
        self.data: dict[str, Any] = data
        self.indent = _indent(raw)
        self.cells: list[tuple[int, int]] = []
        self._lines: list[str] = []  # the module's lines
        self._magic: list[bool] = []
        self._originals: list[str] = []  # each line as the cell has it
        self._owners: list[int] = []  # index into data["cells"] of each line
        if not _is_python(data):
            self.text = ""
            return
        for index, cell in enumerate(data["cells"]):
            if not isinstance(cell, dict) or cell.get("cell_type") != "code":
                continue
            lines = _source(cell).splitlines()
            cell_magic = bool(lines) and lines[0].lstrip().startswith("%%")
            for number, line in enumerate(lines, start=1):
                magic = cell_magic or bool(_MAGIC.search(line))
                indent = line[: len(line) - len(line.lstrip())] if not cell_magic else ""
                self._lines.append(f"{indent}pass" if magic else line)
                self._magic.append(magic)
                self._originals.append(line)
                self._owners.append(index)
                self.cells.append((index + 1, number))
        self.text = "".join(line + "\n" for line in self._lines)

    def render(self, text: str) -> str:
        """The notebook's JSON with the module's lines replaced by those of ``text`` (same number of lines)."""
        new = text.split("\n")
        if new and new[-1] == "":
            new.pop()
        if len(new) != len(self._lines):
            raise ValueError("a fix changed the number of lines of a notebook")
        changed: dict[int, None] = {}
        for i, line in enumerate(new):
            if line != self._lines[i] and not self._magic[i]:
                changed[self._owners[i]] = None
        for index in changed:
            cell = self.data["cells"][index]
            old = _source(cell).splitlines(keepends=True)
            at = [i for i, owner in enumerate(self._owners) if owner == index]
            lines = []
            for k, i in enumerate(at):
                ending = old[k][len(old[k].rstrip("\r\n")) :] if k < len(old) else ""
                lines.append((self._originals[i] if self._magic[i] else new[i]) + ending)
            cell["source"] = lines if isinstance(cell.get("source"), list) else "".join(lines)
        return json.dumps(self.data, indent=self.indent, ensure_ascii=False) + "\n"


def _source(cell: dict[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def _is_python(data: dict[str, Any]) -> bool:
    metadata = data.get("metadata") or {}
    language = (metadata.get("kernelspec") or {}).get("language") or (metadata.get("language_info") or {}).get("name")
    return language is None or str(language).lower() == "python"


def _indent(raw: str) -> int:
    """The indentation the notebook's JSON was written with (nbformat writes 1)."""
    match = re.search(r"\n( +)\"", raw)
    return len(match.group(1)) if match else 1
