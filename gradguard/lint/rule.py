"""What a lint rule is: static metadata and one method, :meth:`LintRule.check`, that yields hits."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from gradguard.lint.source import Fix, Source


@dataclasses.dataclass(frozen=True)
class Hit:
    """One place a rule flags: the node (its line and column), what is wrong, and a safe fix if any.

    ``lines`` are the other lines the finding concerns (the loop, the ``backward()`` and the
    ``step()`` of a missing reset), so that a runtime finding at any of them is recognised
    as the same mistake. ``data`` is evidence, JSON-safe.
    """

    node: ast.AST
    message: str
    where: str = ""
    fix: Fix | None = None
    lines: tuple[int, ...] = ()
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class LintRule:
    """A static rule: the same code and name as the runtime detector of the same mistake.

    Subclasses set ``code``, ``name``, ``hint`` (the fix, in the imperative) and
    ``static_form`` (a paragraph for the rule page: what the source check looks for, and
    what it leaves to the run), and implement :meth:`check`. A rule is precise first: it
    flags only what cannot be right; what needs the run to decide is left to the run.
    """

    code: ClassVar[str]
    name: ClassVar[str]
    hint: ClassVar[str]
    static_form: ClassVar[str]
    #: Words one of which a source must contain for the rule to find anything in it (empty: any source).
    words: ClassVar[tuple[str, ...]] = ()

    def relevant(self, text: str) -> bool:
        """Whether the rule could find anything in ``text``: a cheap test, so most files are not even parsed."""
        return not self.words or any(word in text for word in self.words)

    def check(self, source: Source) -> Iterable[Hit]:
        """The hits in one source."""
        raise NotImplementedError
