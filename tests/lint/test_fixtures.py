"""Every static rule against its fixture: the lines that must be flagged beside those that must not.

``fixtures/GGxxx.py`` marks each line that must be flagged with a ``# flag`` comment; every
other line must not be. ``fixtures/GGxxx.txt`` is the golden output (line, column, code,
where and message of each finding), and ``fixtures/GGxxx.fixed.py`` the file after
``--fix`` for a rule with safe fixes. Set ``GRADGUARD_UPDATE_GOLDEN=1`` to rewrite the
golden files after a deliberate change, then review the diff.
"""

from __future__ import annotations

import ast
import os
import pathlib
import re

import pytest

from gradguard.lint import RULES, lint_file, rules

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CODES = [rule.code for rule in RULES]
_UPDATE = os.environ.get("GRADGUARD_UPDATE_GOLDEN") == "1"
_FLAG = re.compile(r"#.*\bflag\b")


def _lint(path: pathlib.Path, code: str, *, fix: bool = False):
    return lint_file(str(path), rules(select=code), fix=fix)


def _golden(findings) -> str:
    return "".join(
        f"{f.location.line}:{f.data['column']}: {f.code} {f.name} {f.where}: {f.message}\n" for f in findings
    )


def _check_golden(path: pathlib.Path, text: str) -> None:
    if _UPDATE:
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"no golden file {path.name}: run with GRADGUARD_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(encoding="utf-8")


@pytest.mark.parametrize("code", CODES)
def test_fixture_flags_exactly_the_marked_lines(code):
    path = FIXTURES / f"{code}.py"
    result = _lint(path, code)
    assert result.error is None
    marked = {n for n, line in enumerate(path.read_text().splitlines(), 1) if _FLAG.search(line)}
    assert marked, "a fixture marks at least one line to flag"
    flagged = {f.location.line for f in result.findings}
    assert {f.code for f in result.findings} == {code}
    assert flagged == marked, f"flagged but not marked: {sorted(flagged - marked)}; missed: {sorted(marked - flagged)}"


@pytest.mark.parametrize("code", CODES)
def test_fixture_golden_output(code):
    result = _lint(FIXTURES / f"{code}.py", code)
    _check_golden(FIXTURES / f"{code}.txt", _golden(result.findings))


FIXABLE = [code for code in CODES if (FIXTURES / f"{code}.fixed.py").exists() or _UPDATE]


@pytest.mark.parametrize("code", FIXABLE)
def test_fix_golden_and_round_trip(code):
    path = FIXTURES / f"{code}.py"
    result = _lint(path, code, fix=True)
    if result.fixed is None and _UPDATE:
        return
    assert result.fixed is not None, "the fixture has a fixable finding"
    ast.parse(result.fixed)
    _check_golden(FIXTURES / f"{code}.fixed.py", result.fixed)
    again = _lint(FIXTURES / f"{code}.fixed.py", code, fix=True)
    assert again.fixed is None, "fixing a fixed file changes nothing"
    assert again.fixable == 0
    # what the fix leaves is exactly what it could not fix
    assert len(again.findings) == len(result.findings)
