"""``gradguard lint``: the mistakes that the source shows, found before the run, with safe fixes.

The rules share the runtime detectors' codes and names, so ``select``/``ignore``,
``# gradguard: ignore[CODE]`` comments and reports treat both alike. Only what the
source decides reliably is flagged; the rest is left to the run. Nothing here imports
torch.

Example:
    >>> from gradguard.lint import lint_text
    >>> source = '''
    ... for x, y in loader:
    ...     loss = loss_fn(model(x), y)
    ...     loss.backward()
    ...     history.append(loss)
    ... '''
    >>> [(f.code, f.location.line, f.where) for f in lint_text(source, "t.py")]
    [('GG201', 5, 'history')]
"""

from __future__ import annotations

from gradguard.lint.engine import FileResult, LintResult, discover, lint_file, lint_paths, lint_text, rules
from gradguard.lint.rule import Hit, LintRule
from gradguard.lint.rules import RULES
from gradguard.lint.source import Edit, Fix, Source

__all__ = [
    "RULES",
    "Edit",
    "FileResult",
    "Fix",
    "Hit",
    "LintResult",
    "LintRule",
    "Source",
    "discover",
    "lint_file",
    "lint_paths",
    "lint_text",
    "rules",
]
