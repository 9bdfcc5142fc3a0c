"""Python containers in a census: which ones grow, what their new entries are, and their size.

The garbage collector lists every tensor, but never a numpy array, an int or a string: the
census cannot count those one by one the way it counts tensors. It can see the container
that keeps them: a list, dict, deque or set whose length grows between the two censuses,
or a ``functools.lru_cache`` whose size does. The size of what it gains is estimated from
a few of its new entries, tensors left out (the census counts them on their own).

Example:
    >>> records = list(range(100))
    >>> length(records), bound(collections.deque(maxlen=5))
    (100, 5)
    >>> describe_entry(np.zeros((256, 1024))), describe_entry([1.5] * 1000)
    ('numpy array [256, 1024] float64', 'list of 1000 float')
    >>> deep_size(np.zeros((256, 1024))) >= 2 * 2**20
    True
"""

from __future__ import annotations

import collections
import functools
import gc
import itertools
import sys
import types
from typing import Any

import numpy as np
import torch

from gradguard.introspect.naming import Namer

#: Containers shorter than this at the first census are not followed (most dicts are small).
MIN_LENGTH = 4
LRU_CACHE: Any = type(functools.lru_cache(maxsize=1)(len))
_SEQUENCES = (list, tuple, collections.deque, set, frozenset)


def is_container_type(tp: type) -> bool:
    """A mutable container a program can keep appending to (subclasses too), or an lru_cache."""
    return tp is LRU_CACHE or issubclass(tp, (list, dict, set, collections.deque))


def untracked(namer: Namer) -> list[Any]:
    """The containers the user's variables hold that the garbage collector does not list.

    CPython stops tracking a dict whose keys and values are all atomic (numbers, strings,
    numpy arrays): ``cache[step] = array`` fills one. They are looked for among the
    variables of the user's frames and their attributes, and the attributes of the models'
    modules.
    """
    found: dict[int, Any] = {}

    def visit(value: Any, depth: int) -> None:
        tp = type(value)
        if is_container_type(tp):
            if not gc.is_tracked(value):
                found[id(value)] = value
        elif depth > 0 and not issubclass(tp, (type, types.ModuleType, types.FunctionType)):
            try:
                attrs = value.__dict__
            except Exception:
                return
            if isinstance(attrs, dict):
                for attr in list(attrs.values()):
                    visit(attr, depth - 1)

    for scope, _ in namer.scopes:
        for value in list(scope.values()):
            visit(value, 1)
    for model in namer.models:
        for module in model.modules():
            for value in list(vars(module).values()):
                visit(value, 0)
    return list(found.values())


def length(obj: Any) -> int | None:
    """How many entries a container holds (an lru_cache: its current size)."""
    try:
        if type(obj) is LRU_CACHE:
            return int(obj.cache_info().currsize)
        return len(obj)
    except Exception:  # a user subclass with a broken __len__, a cache without cache_info
        return None


def bound(obj: Any) -> int | None:
    """The most entries it can hold: a deque's ``maxlen``, an lru_cache's ``maxsize``; else None."""
    try:
        if type(obj) is LRU_CACHE:
            size = obj.cache_info().maxsize
            return None if size is None else int(size)
        size = getattr(obj, "maxlen", None) if isinstance(obj, collections.deque) else None
        return None if size is None else int(size)
    except Exception:
        return None


def new_entries(obj: Any, added: int, limit: int = 4) -> list[Any]:
    """A few of the entries a container gained: the last ones of a list, deque or dict.

    A set has no order (any entries), and a bounded lru_cache keeps its results where
    Python cannot read them (none).
    """
    count = max(1, min(added, limit))
    try:
        if type(obj) is LRU_CACHE:
            if bound(obj) is not None:
                return []
            tables = [r for r in gc.get_referents(obj) if type(r) is dict and len(r) == length(obj)]
            return list(itertools.islice(reversed(tables[0].values()), count)) if tables else []
        if isinstance(obj, dict):
            return list(itertools.islice(reversed(obj.values()), count))
        if isinstance(obj, (list, collections.deque)):
            return [obj[-1 - i] for i in range(min(count, len(obj)))]
        if isinstance(obj, set):
            return list(itertools.islice(iter(obj), count))
    except Exception:  # changed while read
        return []
    return []


def deep_size(obj: Any, depth: int = 4, budget: int = 256) -> float:
    """Estimated bytes an object keeps in Python's memory, tensors left out.

    Looks ``depth`` levels down; a long container is measured on a sample of at most 8
    entries and scaled up, so the cost is bounded by ``budget`` objects whatever the size.
    Numpy arrays count their data when they own it.
    """
    seen: set[int] = set()
    left = [budget]

    def size(o: Any, level: int) -> float:
        if id(o) in seen or left[0] <= 0:
            return 0.0
        seen.add(id(o))
        left[0] -= 1
        tp = type(o)
        if issubclass(tp, torch.Tensor):
            return 0.0
        try:
            own = float(sys.getsizeof(o))
        except Exception:
            return 0.0
        if level <= 0 or issubclass(tp, (np.ndarray, str, bytes, bytearray, int, float)):
            return own
        try:
            return own + inner(o, level)
        except Exception:  # a container that changed while read, a __len__ that fails
            return own

    def inner(o: Any, level: int) -> float:
        sample: list[Any]
        if isinstance(o, dict):
            n, sample = len(o), list(itertools.islice(o.items(), 8))
            total = sum(size(k, level - 1) + size(v, level - 1) for k, v in sample)
        elif isinstance(o, _SEQUENCES):
            n = len(o)
            if isinstance(o, (list, tuple)) and n > 8:
                sample = [o[i * n // 8] for i in range(8)]  # spread over the whole container
            else:
                sample = list(itertools.islice(iter(o), 8))
            total = sum(size(v, level - 1) for v in sample)
        else:
            attrs = getattr(o, "__dict__", None)
            return size(attrs, level - 1) if isinstance(attrs, dict) else 0.0
        return total * n / len(sample) if sample else 0.0

    return size(obj, depth)


def describe_entry(obj: Any) -> str:
    """A short noun phrase for one entry: ``numpy array [256, 1024] float64``, ``list of 2000 int``."""
    try:
        return _describe(obj)
    except Exception:  # a user type whose __len__ or __iter__ fails
        return f"{type(obj).__name__} object"


def _describe(obj: Any) -> str:
    tp = type(obj)
    if isinstance(obj, np.ndarray):
        return f"numpy array [{', '.join(str(s) for s in obj.shape)}] {obj.dtype}"
    if issubclass(tp, torch.Tensor):
        return "tensor"
    if isinstance(obj, (list, tuple, collections.deque, set, frozenset)):
        first = next(iter(obj), None)
        what = f" {type(first).__name__}" if first is not None else " entries"
        return f"{tp.__name__} of {len(obj)}{what}"
    if isinstance(obj, dict):
        return f"{tp.__name__} of {len(obj)} entries"
    return f"{tp.__name__} object"
