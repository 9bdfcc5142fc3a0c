"""Small questions about syntax trees that several rules ask.

Example:
    >>> call = ast.parse("torch.optim.SGD(model.parameters(), lr=0.1)").body[0].value
    >>> dotted(call.func), dotted(call.args[0].func), method(call.args[0])
    ('torch.optim.SGD', 'model.parameters', 'parameters')
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
LOOPS = (ast.For, ast.AsyncFor, ast.While)


def dotted(node: ast.AST | None) -> str | None:
    """``a.b.c`` for a chain of names and attributes, else ``None``."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def method(node: ast.AST) -> str | None:
    """The name a call calls: ``step`` for ``opt.step()`` and ``f`` for ``f()``."""
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def receiver(node: ast.AST) -> str | None:
    """The dotted name a method is called on: ``self.opt`` for ``self.opt.step()``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return dotted(node.func.value)
    return None


def walk(node: ast.AST) -> list[ast.AST]:
    """Every node under ``node``, itself first, in depth-first order (a slice of the file's index).

    The same nodes as :func:`ast.walk`, found without visiting them again when the tree was
    indexed by :class:`~gradguard.lint.source.Source`.
    """
    order = getattr(node, "_gg_order", None)
    if order is None:
        return list(ast.walk(node))
    return order[node._gg_i : node._gg_end]  # type: ignore[attr-defined]


def walk_scope(node: ast.AST) -> list[ast.AST]:
    """Every node under ``node`` (itself included) that is not inside a nested function, lambda or class."""
    order = getattr(node, "_gg_order", None)
    if order is None:
        return _walk_scope(node)
    out = [node]
    i, end = node._gg_i + 1, node._gg_end  # type: ignore[attr-defined]
    while i < end:
        child = order[i]
        if isinstance(child, SCOPES):
            i = getattr(child, "_gg_end", i + 1)
            continue
        out.append(child)
        i += 1
    return out


def _walk_scope(node: ast.AST) -> list[ast.AST]:
    out = []
    stack = [node]
    while stack:
        current = stack.pop()
        out.append(current)
        stack.extend(child for child in ast.iter_child_nodes(current) if not isinstance(child, SCOPES))
    return out


def calls(node: ast.AST) -> Iterator[ast.Call]:
    """The calls under ``node`` in its own scope."""
    for child in walk_scope(node):
        if isinstance(child, ast.Call):
            yield child


def assigned_names(target: ast.AST) -> Iterator[str]:
    """The names a target binds: ``a`` and ``b`` in ``a, (b, c.d) = ...`` (not ``c.d``)."""
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, (ast.Tuple, ast.List)):
        for element in target.elts:
            yield from assigned_names(element)
    elif isinstance(target, ast.Starred):
        yield from assigned_names(target.value)
