"""A source file as the linter sees it: its text, syntax tree, parents, and where each line came from.

A notebook is linted as one module made of its code cells, so a rule sees an optimizer built
in one cell and a layer replaced in another; :attr:`Source.cells` maps each line back to
its cell.

Example:
    >>> src = Source("t.py", "for x in xs:\\n    total += x\\n")
    >>> node = src.tree.body[0].body[0]
    >>> src.function_of(node), src.segment(node.target), src.span(node.target)
    ('<module>', 'total', (17, 22))
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import gc
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class Edit:
    """Replace ``text[start:end]`` of a :class:`Source` with ``replacement`` (character offsets)."""

    start: int
    end: int
    replacement: str


@dataclasses.dataclass(frozen=True)
class Fix:
    """A safe rewrite of the source: what it does (``title``) and its edits, all on one line each."""

    title: str
    edits: tuple[Edit, ...]


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


#: Fields that never hold a node worth visiting: names and numbers, and the shared singleton
#: contexts and operators (``ast.Load()``, ``ast.Add()``), which are read from their parent.
_NOT_CHILDREN = frozenset({"ctx", "op", "ops", "id", "attr", "name", "arg", "kind", "level", "module", "conversion",
                           "is_async", "simple", "type_comment", "type_ignores"})  # fmt: skip
_CHILD_FIELDS: dict[type, tuple[str, ...]] = {}


def index(tree: ast.AST, parents: dict[ast.AST, ast.AST]) -> None:
    """Number ``tree``'s nodes (see :func:`_index_deep`), recursively: fast, except in very deep trees."""
    order: list[ast.AST] = []
    fields_of = _CHILD_FIELDS

    def visit(node: ast.AST) -> None:
        node._gg_i, node._gg_order = len(order), order  # type: ignore[attr-defined]
        order.append(node)
        fields = fields_of.get(node.__class__)
        if fields is None:
            fields = fields_of[node.__class__] = tuple(f for f in node._fields if f not in _NOT_CHILDREN)
        for name in fields:
            value = getattr(node, name, None)
            if value.__class__ is list:
                for item in value:
                    if isinstance(item, ast.AST):
                        parents[item] = node
                        visit(item)
            elif isinstance(value, ast.AST):
                parents[value] = node
                visit(value)
        node._gg_end = len(order)  # type: ignore[attr-defined]

    try:
        visit(tree)
    except RecursionError:  # an expression nested deeper than the interpreter's stack allows
        parents.clear()
        _index_deep(tree, parents)


def _index_deep(tree: ast.AST, parents: dict[ast.AST, ast.AST]) -> None:
    """Number ``tree``'s nodes in depth-first order, once, so that walking any subtree is a slice.

    Each node gets ``_gg_order`` (the list of all nodes, shared), ``_gg_i`` (its place in it)
    and ``_gg_end`` (where its subtree ends); ``parents`` maps each node to its parent.
    :func:`gradguard.lint.syntax.walk` and ``walk_scope`` read them: rules walk subtrees
    many times, and a slice costs far less than :func:`ast.walk`. Contexts and operators
    are not numbered (they are shared singletons: read them from their parent).
    """
    order: list[ast.AST] = []
    stack: list[ast.AST | int] = [tree]  # a node to number, or the place of one whose subtree ends here
    fields_of = _CHILD_FIELDS
    while stack:
        node = stack.pop()
        if isinstance(node, int):
            order[node]._gg_end = len(order)  # type: ignore[attr-defined]
            continue
        node._gg_i, node._gg_order = len(order), order  # type: ignore[attr-defined]
        stack.append(len(order))
        order.append(node)
        fields = fields_of.get(node.__class__)
        if fields is None:
            fields = fields_of[node.__class__] = tuple(f for f in node._fields if f not in _NOT_CHILDREN)
        children: list[ast.AST] = []
        for name in fields:
            value = getattr(node, name, None)
            if value.__class__ is list:
                children.extend(item for item in value if isinstance(item, ast.AST))
            elif isinstance(value, ast.AST):
                children.append(value)
        for child in reversed(children):
            parents[child] = node
            stack.append(child)


class Source:
    """A parsed source. ``SyntaxError`` escapes the constructor when the text does not parse.

    ``cells`` (notebooks) gives, for each line (1-based, index ``line - 1``), its cell
    (1-based) and its line in that cell.
    """

    def __init__(self, path: str, text: str, *, cells: list[tuple[int, int]] | None = None) -> None:
        self.path = path
        self.text = text
        flags = ast.PyCF_ONLY_AST | (ast.PyCF_ALLOW_TOP_LEVEL_AWAIT if cells is not None else 0)
        collecting = gc.isenabled()
        gc.disable()  # a tree is many objects and no cycle: collections while it is made would only cost
        try:
            self.tree: ast.Module = compile(text, path, "exec", flags, dont_inherit=True)
        finally:
            if collecting:
                gc.enable()
        self.cells = cells
        self._parents: dict[ast.AST, ast.AST] = {}
        index(self.tree, self._parents)
        #: Analyses that several rules use, made once per source (keyed by their class).
        self.shared: dict[type, object] = {}

    def release(self) -> None:
        """Drop the index and the shared analyses: the tree's nodes no longer refer to one another
        through them, so the tree is freed as soon as it is unused, without waiting for the cycle collector."""
        order = getattr(self.tree, "_gg_order", None)
        if order is not None:
            order.clear()
        self._parents.clear()
        self.shared.clear()

    # ---------------------------------------------------------------- structure

    def parent(self, node: ast.AST) -> ast.AST | None:
        return self._parents.get(node)

    def ancestors(self, node: ast.AST) -> Iterator[ast.AST]:
        """The nodes that hold ``node``, innermost first."""
        parents = self._parents
        parent = parents.get(node)
        while parent is not None:
            yield parent
            parent = parents.get(parent)

    def scope_of(self, node: ast.AST) -> ast.AST:
        """The function, lambda or class whose body holds ``node``, or the module."""
        for parent in self.ancestors(node):
            if isinstance(parent, _SCOPES):
                return parent
        return self.tree

    def function_of(self, node: ast.AST) -> str:
        """The qualified name of the function that holds ``node`` (``Trainer.fit``), or ``<module>``."""
        names = [p.name for p in self.ancestors(node) if isinstance(p, _SCOPES) and not isinstance(p, ast.Lambda)]
        return ".".join(reversed(names)) or "<module>"

    # ---------------------------------------------------------------- text
    @functools.cached_property
    def lines(self) -> list[str]:
        """The source's lines, with their endings (made when first asked for: most files have no finding)."""
        return self.text.splitlines(keepends=True)

    @functools.cached_property
    def _starts(self) -> list[int]:
        starts = [0]
        for line in self.lines:
            starts.append(starts[-1] + len(line))
        return starts

    def offset(self, line: int, col: int) -> int:
        """The character offset of ``line`` (1-based) and ``col`` (UTF-8 bytes, as :mod:`ast` counts)."""
        text = self.lines[line - 1] if line - 1 < len(self.lines) else ""
        return self._starts[line - 1] + len(text.encode("utf-8")[:col].decode("utf-8", errors="ignore"))

    def span(self, node: ast.AST) -> tuple[int, int]:
        """The character offsets of ``node``'s text."""
        start = self.offset(node.lineno, node.col_offset)  # type: ignore[attr-defined]
        end = self.offset(node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]
        return start, end

    def segment(self, node: ast.AST) -> str:
        start, end = self.span(node)
        return self.text[start:end]

    def column(self, node: ast.AST) -> int:
        """``node``'s column, 1-based, in characters."""
        line = node.lineno  # type: ignore[attr-defined]
        return self.offset(line, node.col_offset) - self._starts[line - 1] + 1  # type: ignore[attr-defined]

    def line_text(self, line: int) -> str:
        return self.lines[line - 1] if 0 < line <= len(self.lines) else ""

    def place(self, line: int) -> tuple[int, int | None]:
        """The line to show for ``line``, and its cell in a notebook (else ``None``)."""
        if self.cells is None or not 0 < line <= len(self.cells):
            return line, None
        cell, in_cell = self.cells[line - 1]
        return in_cell, cell
