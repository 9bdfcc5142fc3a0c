"""Bounded walks over autograd graphs.

A walk starts at ``grad_fn`` nodes and follows ``next_functions``, each node once, and stops
after ``limit`` nodes: it never costs more than that, however long the history behind a
tensor. No tensor value is read.

Example:
    >>> import torch
    >>> x = torch.ones(2, requires_grad=True)
    >>> y = (x * 2).sum()
    >>> [type(n).__name__ for n in walk([y.grad_fn], limit=10)]
    ['SumBackward0', 'MulBackward0', 'AccumulateGrad']
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


def walk(roots: Iterable[Any], limit: int, descend: Callable[[Any], bool] | None = None) -> list[Any]:
    """The nodes reachable from ``roots``, each once, at most ``limit`` of them, depth first.

    A node for which ``descend(node)`` is false is listed but its inputs are not followed.
    The returned list keeps the node objects alive, so their ids stay unique while it is used.
    """
    seen: set[int] = set()
    out: list[Any] = []
    stack = [r for r in roots if r is not None]
    stack.reverse()
    while stack and len(out) < limit:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        out.append(node)
        if descend is not None and not descend(node):
            continue
        nexts = [nxt for nxt, _ in getattr(node, "next_functions", ()) if nxt is not None]
        nexts.reverse()
        stack.extend(nexts)
    return out


def graph_tensors(value: Any, depth: int, edge_items: int = 4) -> Iterator[torch.Tensor]:
    """Tensors in ``value``: itself, or the items at both ends of a list, tuple, dict or deque."""
    if isinstance(value, torch.Tensor):
        yield value
        return
    if depth <= 0:
        return
    items = _edges(value, edge_items)
    for item in items:
        yield from graph_tensors(item, depth - 1, edge_items)


def _edges(value: Any, n: int) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value) if len(value) <= 2 * n else [*value[:n], *value[-n:]]
    if isinstance(value, dict):
        values = value.values()
        if len(value) <= 2 * n:
            return list(values)
        try:
            tail = list(itertools.islice(reversed(values), n))
        except TypeError:  # a mapping whose values cannot be reversed
            tail = []
        return [*itertools.islice(values, n), *tail]
    if isinstance(value, deque):
        if len(value) <= 2 * n:
            return list(value)
        return [*itertools.islice(value, n), *itertools.islice(reversed(value), n)]
    return []


_SAVED_NAMES: dict[type, tuple[str, ...]] = {}


def saved_tensors(node: Any) -> Iterator[torch.Tensor]:
    """The tensors a node saved for backward (freed ones and non-tensors skipped)."""
    names = _SAVED_NAMES.get(type(node))
    if names is None:
        names = tuple(a for a in dir(node) if a.startswith("_saved_"))
        _SAVED_NAMES[type(node)] = names
    for name in names:
        try:
            value = getattr(node, name)
        except Exception:  # freed by an earlier backward
            continue
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, torch.Tensor):
                yield v
