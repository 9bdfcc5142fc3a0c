"""The user's containers that keep growing tensors alive, named, with the line that adds to them."""

from __future__ import annotations

import dataclasses
import gc
import inspect
from collections import deque
from types import FrameType
from typing import Any

import torch

from gradguard.findings import Location
from gradguard.introspect.frames import code_location, display_path
from gradguard.introspect.naming import Name, Namer
from gradguard.introspect.sites import class_attribute_location, variable_sites
from gradguard.memory.census import (
    Census,
    GroupKey,
    Growth,
    diff,
    graph_storages,
    new_tensors_of,
    storage_key,
    take_census,
)
from gradguard.memory.containers import LRU_CACHE, bound, deep_size, describe_entry, length, new_entries, untracked


def locate(name: Name, obj: Any) -> Location | None:
    """The line that adds to the named container (``name[k] = ...``, ``name.append(...)``), else its assignment."""
    if name.owner is not None and name.attribute is not None:
        cls = type(name.owner)
        found = class_attribute_location(cls, name.attribute, obj)
        if found is not None:
            return found
        try:
            _, first = inspect.getsourcelines(cls)
            return Location(display_path(inspect.getsourcefile(cls) or "?"), first, cls.__name__)
        except (OSError, TypeError):
            return None
    frame = name.frame
    if frame is None:
        return None
    sites = variable_sites(frame.f_code, name.text)
    line = sites.mutation(obj)
    if line is None:
        assigned = sorted(sites.plain + sites.augmented + sites.created)
        line = assigned[0] if assigned else frame.f_lineno
    return code_location(frame.f_code, line)


def _named(namer: Namer, obj: Any) -> tuple[str, Location | None] | None:
    name = namer.name(obj)
    return None if name is None else (name.text, locate(name, obj))


_CONTAINERS = (list, dict, deque, set, tuple)


def find_owners(targets: list[torch.Tensor], namer: Namer, *, max_calls: int = 12) -> list[dict[str, Any]]:
    """The named containers that hold ``targets``: a dict, list or deque of the user's.

    Climbs at most two levels (a tuple in a list, a list in an object's attribute) and
    calls ``gc.get_referrers`` at most ``max_calls`` times.
    """
    return _holders(targets, namer, max_calls=max_calls).owners


@dataclasses.dataclass
class _Holders:
    owners: list[dict[str, Any]]
    containers: list[int]  # ids of the named containers (the outer one, when climbed)
    variables_only: bool  # referred to by variables only: locals of a running function, a module's globals


def _holders(
    targets: list[torch.Tensor],
    namer: Namer,
    *,
    max_calls: int = 12,
    climbed: list[tuple[tuple[str, Location | None], str, Any]] | None = None,
) -> _Holders:
    args = tuple(targets)
    ignore = {id(targets), id(args), *namer.scope_ids}
    target_ids = {id(t) for t in targets}
    owners: dict[int, dict[str, Any]] = {}
    calls = 1
    referrers = [r for r in gc.get_referrers(*args) if r is not targets and r is not args]
    # a temporary of the loop (this step's batch, of a shape not seen at the first census) is
    # held by variables only: a frame, or a namespace the namer reads (a script's globals)
    variables_only = bool(referrers) and all(isinstance(r, FrameType) or id(r) in ignore for r in referrers)
    level = [r for r in referrers if isinstance(r, _CONTAINERS) and id(r) not in ignore]
    del referrers
    ignore.add(id(level))
    climbed = [] if climbed is None else climbed  # shared by the groups of one census
    for container in level[:8]:
        held = _count_held(container, target_ids)
        if held == 0:
            continue
        named = _named(namer, container)
        path, outer = "", container
        if named is None:
            # tuples of one replay buffer: found the buffer once, it holds the others too
            known = next((c for c in climbed if c[1] == "[...]" and _count_held(c[2], {id(container)})), None)
            if known is not None:
                named, path, outer = known
            elif calls < max_calls:
                calls += 1
                named, path, outer = _climb(container, namer, ignore)
                if named is not None:
                    climbed.append((named, path, outer))
        if named is None:
            continue
        name, location = named
        entry = owners.setdefault(
            id(outer),
            {
                "name": name + path,
                "kind": type(container).__name__,
                "location": location.to_dict() if location is not None else None,
                "held": 0,
                "length": len(outer),
                "maxlen": bound(outer),
            },
        )
        entry["held"] += held
    ranked = sorted(owners.items(), key=lambda kv: -kv[1]["held"])
    return _Holders([o for _, o in ranked], [k for k, _ in ranked], variables_only)


def _count_held(container: Any, target_ids: set[int]) -> int:
    values = container.values() if isinstance(container, dict) else container
    try:
        return sum(1 for v in values if id(v) in target_ids)
    except RuntimeError:  # changed size while counting
        return 0


def _climb(container: Any, namer: Namer, ignore: set[int]) -> tuple[tuple[str, Location | None] | None, str, Any]:
    """Name a container through what holds it: ``obj.attr``, ``d['key']`` or ``outer[3]``; and that holder."""
    parents = [r for r in gc.get_referrers(container) if id(r) not in ignore and not isinstance(r, FrameType)]
    for parent in parents:
        if isinstance(parent, dict):
            key = next((k for k, v in parent.items() if v is container), None)
            if key is None:
                continue
            named = _named(namer, parent)
            if named is not None:
                return named, f"[{key!r}]", container
            owner = _instance_of(parent, ignore)
            if owner is not None:
                named = _named(namer, owner)
                if named is not None and isinstance(key, str):
                    line = class_attribute_location(type(owner), key, container) or named[1]
                    return (f"{named[0]}.{key}", line), "", container
        elif isinstance(parent, (list, tuple, deque)):
            named = _named(namer, parent)
            if named is not None:
                return named, "[...]", parent  # a tuple in a replay buffer: the buffer bounds it
        else:  # an object whose attributes Python keeps without a dict of their own (3.11+)
            key = _attribute_of(parent, container)
            named = _named(namer, parent) if key is not None else None
            if named is not None and key is not None:
                line = class_attribute_location(type(parent), key, container) or named[1]
                return (f"{named[0]}.{key}", line), "", container
    return None, "", container


def _attribute_of(owner: Any, obj: Any) -> str | None:
    try:
        attrs = owner.__dict__
    except Exception:
        return None
    if not isinstance(attrs, dict):
        return None
    return next((k for k, v in attrs.items() if v is obj and isinstance(k, str)), None)


def _instance_of(d: dict[str, Any], ignore: set[int]) -> Any:
    for r in gc.get_referrers(d):
        if id(r) not in ignore and getattr(r, "__dict__", None) is d:
            return r
    return None


@dataclasses.dataclass
class Explanation:
    """What the census found: the growths that explain a memory growth, largest first, and the
    bounded caches that filled meanwhile with entries Python cannot measure (a bounded
    ``lru_cache`` keeps its results out of reach)."""

    growths: list[Growth]
    filling: list[Growth]

    @property
    def per_step_bytes(self) -> float:
        return sum(g.per_step_bytes for g in self.growths)


_MIN_PER_STEP = 64 * 1024  # a growth smaller than this per step explains nothing worth a finding


def explain(before: Census, x: int, namer: Namer) -> Explanation:
    """What grew since ``before``: tensor groups and containers, with what holds them, largest first.

    A tensor group counts when something keeps its new tensors (a container, an object, the
    autograd graph of another group, memory outside Python) and either two of them or
    more are new or the container that holds them grew: a temporary of the step (a batch
    of a shape the first census did not see) is held by a variable only, and does not. A
    container counts by what its new entries weigh, tensors left out.
    """
    after = take_census(x, before, untracked(namer))
    steps = max(x - before.step, 1)
    grown, after.grown = after.grown, []
    added = {id(obj): n for obj, n in grown}
    entries, filling, caches = _entry_growths(grown, steps, namer)
    del grown
    growths = diff(before, after)[:8]
    graphs: dict[int, set[tuple[str, int]]] = {}  # index of a growth -> storages its graphs keep
    storages: dict[int, set[tuple[str, int]]] = {}  # index of a growth -> its new tensors' storages
    counted: list[Growth] = []
    owner_ids: set[int] = set()
    news = new_tensors_of(before, [g.key for g in growths], limit=8)
    climbed: list[tuple[tuple[str, Location | None], str, Any]] = []
    for i, growth in enumerate(growths):
        targets = news.pop(growth.key, [])
        if not targets:
            if growth.count_delta >= 2:
                counted.append(growth)
            continue
        storages[i] = {k for k in (storage_key(t)[0] for t in targets) if k is not None}
        if growth.key[4]:  # has grad_fn: what its graph keeps alive
            saved = graph_storages(targets[0])
            growth.graph_bytes = sum(saved.values())
            graphs[i] = set(saved)
        holders = _holders(targets, namer, climbed=climbed)
        del targets
        growth.owners = holders.owners
        for owner, container in zip(growth.owners, holders.containers, strict=True):
            if container in added:
                owner["added"] = added[container]  # entries the container gained: its rate
        if not growth.owners and not holders.variables_only and caches:
            growth.owners = [dict(c) for c in caches]  # held where Python cannot see: a cache that grew
        owner_ids.update(holders.containers)
        if holders.variables_only:
            continue  # a temporary of the loop
        if growth.count_delta >= 2 or any("added" in o for o in growth.owners):
            counted.append(growth)
    for i, growth in enumerate(growths):
        # tensors kept alive by another group's graphs count once, with the group that holds the graphs
        growth.held_by_graph = any(
            j != i and growths[j].owners and storages.get(i, set()) & kept for j, kept in graphs.items()
        )
    kept = [g for g in counted if not g.held_by_graph and g.per_step_bytes >= _MIN_PER_STEP]
    kept += [g for g, container in entries if container not in owner_ids]  # tensors are counted as tensors
    kept.sort(key=lambda g: -g.per_step_bytes)
    return Explanation(kept, filling)


def _entry_growths(
    grown: list[tuple[Any, int]], steps: int, namer: Namer, *, limit: int = 64
) -> tuple[list[tuple[Growth, int]], list[Growth], list[dict[str, Any]]]:
    """Named containers that gained entries: those that weigh enough (with their ids), bounded
    caches whose entries cannot be read, and the owner entries of every lru_cache that grew."""
    out: list[tuple[Growth, int]] = []
    filling: list[Growth] = []
    caches: list[dict[str, Any]] = []
    ignore = {id(grown), *namer.scope_ids}
    grown = sorted(grown, key=lambda g: -g[1])[:limit]
    ignore.add(id(grown))
    key: GroupKey = ((), "", "", False, False)
    for obj, added in grown:
        is_cache = type(obj) is LRU_CACHE
        sample = new_entries(obj, added)
        each = sum(deep_size(e) for e in sample) / len(sample) if sample else 0.0
        growth = Growth(key, added, int(added * each), steps, kind="entries")
        growth.entry = describe_entry(sample[0]) if sample else ""
        del sample
        if not is_cache and growth.per_step_bytes < _MIN_PER_STEP:
            continue  # too light to matter: not worth naming (naming is a walk of the heap)
        named: tuple[str, Location | None] | None = _named(namer, obj)
        path = ""
        if named is None and not is_cache:
            named, path, _ = _climb(obj, namer, ignore)
        if named is None:
            continue
        location = named[1]
        if is_cache:
            code = getattr(getattr(obj, "__wrapped__", None), "__code__", None)
            location = code_location(code, code.co_firstlineno) if code is not None else location
        growth.owners = [
            {
                "name": named[0] + path,
                "kind": "lru_cache" if is_cache else type(obj).__name__,
                "location": location.to_dict() if location is not None else None,
                "held": added,
                "added": added,
                "length": length(obj),
                "maxlen": bound(obj),
            }
        ]
        if is_cache:
            caches.append(growth.owners[0])
            if growth.bytes_delta == 0 and bound(obj) is not None:
                filling.append(growth)  # a bounded cache keeps its entries out of Python's reach
        if growth.per_step_bytes >= _MIN_PER_STEP:
            out.append((growth, id(obj)))
    return out, filling, caches


def fill_steps(growths: list[Growth], headroom: tuple[int, int] | None, rate: float = 0.0) -> int | None:
    """Steps until full, when all the growth sits in bounded containers that fit in memory.

    Each container fills at the entries it gained per step (else its growth's tensors per
    step); entries of unknown size (a bounded ``lru_cache``'s) are taken to fill at
    ``rate`` bytes per step, the rate of the memory growth.
    """
    if not growths or not all(g.owners for g in growths):
        return None
    bounded: dict[str, list[float]] = {}  # container -> [room, entries per step, bytes per step]
    for g in growths:
        owner = g.owners[0]
        if owner.get("maxlen") is None or owner.get("length") is None:
            return None
        per_step = owner["added"] / max(g.steps, 1) if "added" in owner else g.per_step_count
        room = max(owner["maxlen"] - owner["length"], 0)
        entry = bounded.setdefault(owner["name"], [room, per_step, 0.0])
        entry[2] += g.per_step_bytes if g.bytes_delta > 0 else rate
    extra = 0.0
    steps = 0
    for room, per_step, nbytes in bounded.values():
        fill = room / max(per_step, 1e-9)
        steps = max(steps, int(fill) + 1)
        extra += fill * nbytes
    if headroom is None or extra >= 0.5 * headroom[0]:
        return None
    return steps
