"""The source lines that fill a variable or set an attribute, read from the user's source with ``ast``.

A finding points at the line that *causes* it: ``total_loss += loss``, ``history.append(out)``,
``cache[step] = x``, ``p.requres_grad = False``. These functions parse the user's file once
(cached) and look in the scope of a code object for the statements that store into a name.

Example:
    >>> import sys
    >>> def loop():
    ...     total = 0.0
    ...     history = []
    ...     for step in range(2):
    ...         total += step
    ...         history.append(step)
    ...     return sys._getframe().f_code
    >>> code = loop()
    >>> sites = variable_sites(code, "total")
    >>> sites.augmented == [code.co_firstlineno + 4], sites.plain, sites.created == [code.co_firstlineno + 1]
    (True, [], True)
    >>> [kind for _, kind in variable_sites(code, "history").mutated]
    ['append']
"""

from __future__ import annotations

import ast
import dataclasses
import linecache
from collections import deque
from collections.abc import Iterator
from types import CodeType

from gradguard.findings import Location
from gradguard.introspect.frames import display_path, is_library_file

#: Methods that add to a container.
MUTATORS = frozenset({"append", "extend", "insert", "appendleft", "extendleft", "add", "update", "setdefault"})
#: How each kind of container is added to, to prefer the line that fits the container.
_BY_KIND: dict[type, frozenset[str]] = {
    dict: frozenset({"[]", "update", "setdefault"}),
    list: frozenset({"append", "extend", "insert", "+="}),
    deque: frozenset({"append", "appendleft", "extend", "extendleft", "insert", "+="}),
    set: frozenset({"add", "update", "|="}),
}
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


@dataclasses.dataclass
class Sites:
    """The lines, in source order, that store into one name.

    ``augmented``: ``name += ...``; ``plain``: ``name = <expression>``; ``created``: ``name = 0``,
    ``name = []`` (a constant or an empty container, which never holds a graph); ``mutated``:
    ``(line, how)`` for ``name.append(...)`` (how: the method), ``name[k] = ...`` (``"[]"``),
    ``name |= ...``.
    """

    augmented: list[int] = dataclasses.field(default_factory=list)
    plain: list[int] = dataclasses.field(default_factory=list)
    created: list[int] = dataclasses.field(default_factory=list)
    mutated: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    def mutation(self, container: object = None) -> int | None:
        """The last line that adds to the name, preferring the ways that fit ``container``'s type."""
        fits = next((ways for kind, ways in _BY_KIND.items() if isinstance(container, kind)), None)
        if fits is not None:
            lines = [line for line, how in self.mutated if how in fits]
            if lines:
                return lines[-1]
        return self.mutated[-1][0] if self.mutated else None

    def best(self, *, container: bool) -> int | None:
        """For a container the line that adds to it, else an augmented, then a plain assignment."""
        if container and self.mutated:
            return self.mutated[-1][0]
        for lines in (self.augmented, self.plain):
            if lines:
                return lines[-1]
        return None


# --------------------------------------------------------------------------- parsing
_TREES: dict[str, tuple[int, ast.Module | None]] = {}


def _tree(filename: str) -> ast.Module | None:
    lines = linecache.getlines(filename)
    size = sum(len(line) for line in lines)
    cached = _TREES.get(filename)
    if cached is not None and cached[0] == size:
        return cached[1]
    tree: ast.Module | None = None
    if lines:
        try:
            tree = ast.parse("".join(lines), filename)
        except (SyntaxError, ValueError):
            tree = None
    if len(_TREES) > 256:
        _TREES.clear()
    _TREES[filename] = (size, tree)
    return tree


def scope_node(code: CodeType) -> ast.AST | None:
    """The function, class or module of the user's source that compiled to ``code``."""
    tree = _tree(code.co_filename)
    if tree is None:
        return None
    if code.co_name == "<module>":
        return tree
    first = code.co_firstlineno
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            lines = {node.lineno, *(d.lineno for d in node.decorator_list)}
            if first in lines and node.name == code.co_name:
                return node
        elif isinstance(node, ast.Lambda) and code.co_name == "<lambda>" and node.lineno == first:
            return node
    return None


def _nodes(scope: ast.AST, *, nested: bool) -> Iterator[ast.AST]:
    """The nodes of a scope; those of nested functions and classes only with ``nested``."""
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop(0)
        yield node
        if nested or not isinstance(node, _SCOPES):
            stack[:0] = list(ast.iter_child_nodes(node))


# --------------------------------------------------------------------------- matching
def _is_target(node: ast.AST, name: str, attribute: bool) -> bool:
    if attribute:
        return isinstance(node, ast.Attribute) and node.attr == name
    return isinstance(node, ast.Name) and node.id == name


def _flat(target: ast.expr) -> Iterator[ast.expr]:
    if isinstance(target, (ast.Tuple, ast.List)):
        for item in target.elts:
            yield from _flat(item)
    elif isinstance(target, ast.Starred):
        yield from _flat(target.value)
    else:
        yield target


def _creates_nothing(value: ast.AST | None) -> bool:
    """A constant or an empty container: a store that cannot put a graph anywhere."""
    if value is None or isinstance(value, ast.Constant):
        return True
    if isinstance(value, (ast.List, ast.Tuple, ast.Set)):
        return not value.elts
    if isinstance(value, ast.Dict):
        return not value.keys
    return False


def _collect(scope: ast.AST, name: str, attribute: bool, nested: bool) -> Sites:
    sites = Sites()
    for node in _nodes(scope, nested=nested):
        if isinstance(node, ast.AugAssign):
            target: ast.expr = node.target
            if _is_target(target, name, attribute):
                if isinstance(node.op, ast.BitOr):
                    sites.mutated.append((node.lineno, "|="))
                else:
                    sites.augmented.append(node.lineno)
                    if isinstance(node.op, ast.Add):
                        sites.mutated.append((node.lineno, "+="))
            elif isinstance(target, ast.Subscript) and _is_target(target.value, name, attribute):
                sites.mutated.append((node.lineno, "[]"))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets: list[ast.expr] = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in (t for top in targets for t in _flat(top)):
                if _is_target(target, name, attribute):
                    (sites.created if _creates_nothing(node.value) else sites.plain).append(node.lineno)
                elif isinstance(target, ast.Subscript) and _is_target(target.value, name, attribute):
                    sites.mutated.append((node.lineno, "[]"))
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            if any(_is_target(t, name, attribute) for t in _flat(node.target)):
                sites.plain.append(node.lineno)
        elif isinstance(node, ast.NamedExpr):
            if _is_target(node.target, name, attribute):
                sites.plain.append(node.lineno)
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in MUTATORS and _is_target(func.value, name, attribute):
                sites.mutated.append((node.lineno, func.attr))
    sites.augmented.sort()
    sites.plain.sort()
    sites.created.sort()
    sites.mutated.sort()
    return sites


_CACHE: dict[tuple[CodeType, str, bool], Sites] = {}


def variable_sites(code: CodeType, name: str) -> Sites:
    """Where the function (or module) of ``code`` stores into the variable ``name``.

    In a module, the functions it defines count too: a global list filled by a function.
    """
    return _cached(code, name, attribute=False)


def attribute_sites(code: CodeType, attr: str) -> Sites:
    """Where the function of ``code`` (nested functions included) stores into ``<x>.attr``."""
    return _cached(code, attr, attribute=True)


def call_sites(code: CodeType, callee: str) -> list[int]:
    """The lines of the function (or module) of ``code`` that call ``callee(...)`` or ``<x>.callee(...)``.

    >>> import sys, torch
    >>> def make():
    ...     opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ...     return sys._getframe().f_code
    >>> code = make()
    >>> call_sites(code, "SGD") == [code.co_firstlineno + 1], call_sites(code, "Adam")
    (True, [])
    """
    scope = scope_node(code)
    if scope is None:
        return []
    lines: list[int] = []
    for node in _nodes(scope, nested=isinstance(scope, ast.Module)):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Name) and func.id == callee) or (
                isinstance(func, ast.Attribute) and func.attr == callee
            ):
                lines.append(node.lineno)
    return sorted(lines)


def _cached(code: CodeType, name: str, *, attribute: bool) -> Sites:
    key = (code, name, attribute)
    sites = _CACHE.get(key)
    if sites is None:
        scope = scope_node(code)
        if scope is None:
            sites = Sites()
        else:
            sites = _collect(scope, name, attribute, nested=attribute or isinstance(scope, ast.Module))
        if len(_CACHE) > 4096:
            _CACHE.clear()
        _CACHE[key] = sites
    return sites


def class_codes(cls: type) -> list[CodeType]:
    """The code of the methods of the user's classes in ``cls``'s MRO (up to torch's)."""
    codes: list[CodeType] = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            break
        for fn in vars(klass).values():
            code = getattr(fn, "__code__", None)
            if isinstance(code, CodeType) and not is_library_file(code.co_filename):
                codes.append(code)
    return codes


def class_attribute_location(cls: type, attr: str, container: object = None) -> Location | None:
    """The line in the user's classes of ``cls`` (its MRO) that adds to, else sets, ``self.<attr>``."""
    codes = class_codes(cls)
    for prefer_mutation in (True, False):
        for code in codes:
            sites = attribute_sites(code, attr)
            line = sites.mutation(container) if prefer_mutation else sites.best(container=False)
            if line is not None:
                return Location(display_path(code.co_filename), line, cls.__name__)
    return None


def attribute_assignments(filename: str, attr: str) -> list[int]:
    """Every line of a file that assigns ``<x>.attr = ...`` or calls ``setattr(<x>, "attr", ...)``."""
    tree = _tree(filename)
    if tree is None:
        return []
    lines: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(_is_target(t, attr, True) for top in targets for t in _flat(top)):
                lines.append(node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "setattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value == attr
        ):
            lines.append(node.lineno)
    return sorted(set(lines))


def code_at(code: CodeType, line: int) -> CodeType:
    """The innermost function of ``code`` (itself, or one defined in it, in a class too) that holds ``line``.

    A module's sites include the lines of the functions it defines; a location names the
    function the line is in, not ``<module>``.
    """
    for const in code.co_consts:
        if isinstance(const, CodeType):
            inner = code_at(const, line)
            if inner is not const or any(lineno == line for _, _, lineno in const.co_lines()):
                return inner
    return code
