"""Project settings: the ``[tool.gradguard]`` table of ``pyproject.toml``.

The command line reads the table of the nearest ``pyproject.toml`` that has one, searching
from the current folder up; its own options win over the table. Report paths in the table
are relative to the folder of that ``pyproject.toml``. Example::

    [tool.gradguard]
    select = ["GG1", "GG2", "GG4"]
    ignore = ["GG301"]
    strict = true              # exit 3 when a warning or error is found
    policy = "warn"            # or "raise", "collect"
    format = "github"          # what `gradguard run` prints at the end: text, json, sarif, github
    json = "reports/gradguard.json"   # false: no JSON report
    html = "reports/gradguard.html"
    sarif = "reports/gradguard.sarif"
    budget = 4                 # or "all"
    lint = true                # `gradguard run` also lints the program's files (as --lint)
    exclude = ["tests/data/*"] # files and folders `gradguard lint` leaves out (fnmatch patterns)
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from typing import Any

from gradguard.errors import ConfigurationError
from gradguard.policy import Policy
from gradguard.sampling import PER_GROUP

FORMATS = ("text", "json", "sarif", "github")
DEFAULT_JSON = "gradguard-report.json"
_KEYS = ("select", "ignore", "strict", "policy", "format", "json", "html", "sarif", "budget", "lint", "exclude")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of a run, from ``pyproject.toml`` or the defaults.

    >>> Config().json, Config().format, Config().budget
    ('gradguard-report.json', 'text', 4)
    """

    select: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    strict: bool = False
    policy: str = "warn"
    format: str = "text"
    json: str | None = DEFAULT_JSON
    html: str | None = None
    sarif: str | None = None
    budget: int | None = PER_GROUP
    lint: bool = False
    #: Patterns of the paths ``gradguard lint`` leaves out, as written in the table.
    exclude: tuple[str, ...] = ()
    #: The ``pyproject.toml`` these settings came from, if any.
    source: str | None = None


def find_pyproject(start: str | os.PathLike[str] | None = None) -> str | None:
    """The nearest ``pyproject.toml`` with a ``[tool.gradguard]`` table, from ``start`` up."""
    folder = os.path.abspath(os.fspath(start) if start is not None else os.getcwd())
    while True:
        candidate = os.path.join(folder, "pyproject.toml")
        if os.path.isfile(candidate) and "tool.gradguard" in _read_text(candidate):
            return candidate
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """The settings of ``path`` (a ``pyproject.toml``), or of the nearest one, or the defaults.

    Unknown keys and values of the wrong kind raise :class:`ConfigurationError`, naming the
    file, the key, the value and what is accepted.
    """
    found = os.fspath(path) if path is not None else find_pyproject()
    if found is None:
        return Config()
    try:
        data = _toml().loads(_read_text(found))
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigurationError(f"{found}: not valid TOML: {exc}") from None
    table = data.get("tool", {}).get("gradguard")
    if table is None:
        if path is not None:
            raise ConfigurationError(f"{found}: expected a [tool.gradguard] table")
        return Config()
    return parse_table(table, found)


def parse_table(table: Mapping[str, Any], source: str) -> Config:
    """Check a ``[tool.gradguard]`` table and turn it into a :class:`Config`.

    >>> parse_table({"select": "GG1", "json": False, "budget": "all"}, "pyproject.toml").select
    ('GG1',)
    >>> parse_table({"selct": ["GG1"]}, "pyproject.toml")
    Traceback (most recent call last):
    ...
    gradguard.errors.ConfigurationError: pyproject.toml [tool.gradguard]: unknown key 'selct'; expected one of ...
    """
    where = f"{source} [tool.gradguard]"
    if not isinstance(table, Mapping):
        raise ConfigurationError(f"{where}: expected a table but got {table!r}")
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise ConfigurationError(f"{where}: unknown key {unknown[0]!r}; expected one of {', '.join(_KEYS)}")
    base = os.path.dirname(os.path.abspath(source))
    values: dict[str, Any] = {"source": source}
    for key in ("select", "ignore"):
        if key in table:
            values[key] = _codes(where, key, table[key])
    for key in ("strict", "lint"):
        if key in table:
            if not isinstance(table[key], bool):
                raise ConfigurationError(f"{where}: expected {key} to be true or false but got {table[key]!r}")
            values[key] = table[key]
    if "exclude" in table:
        items = [table["exclude"]] if isinstance(table["exclude"], str) else table["exclude"]
        if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
            raise ConfigurationError(f"{where}: expected exclude to be a list of path patterns but got {items!r}")
        values["exclude"] = tuple(items)
    if "policy" in table:
        values["policy"] = _choice(where, "policy", table["policy"], ("warn", "raise", "collect"))
    if "format" in table:
        values["format"] = _choice(where, "format", table["format"], FORMATS)
    for key in ("json", "html", "sarif"):
        if key in table:
            values[key] = _path(where, key, table[key], base)
    if "budget" in table:
        values["budget"] = parse_budget(table["budget"], f"{where}: budget")
    return Config(**values)


def parse_budget(value: Any, what: str = "budget") -> int | None:
    """A budget: a positive number of tensors, or ``"all"`` (``None``).

    >>> parse_budget("all"), parse_budget("8"), parse_budget(2)
    (None, 8, 2)
    """
    if value == "all":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"Expected {what} to be a positive number of tensors or 'all' but got {value!r}")
    return value


def _codes(where: str, key: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ConfigurationError(f"{where}: expected {key} to be a list of codes or rule names but got {value!r}")
    try:
        Policy("collect", **{key: tuple(items)})  # the same check as --select / --ignore
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None
    return tuple(items)


def _choice(where: str, key: str, value: Any, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise ConfigurationError(f"{where}: expected {key} to be one of {', '.join(accepted)} but got {value!r}")
    return str(value)


def _path(where: str, key: str, value: Any, base: str) -> str | None:
    if value is False:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{where}: expected {key} to be a path or false but got {value!r}")
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{path}: not UTF-8 text: {exc}") from None


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    import tomli  # the same parser, for Python 3.10

    return tomli
