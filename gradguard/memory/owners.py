"""The user's containers that keep growing tensors alive, named, with the line that adds to them."""

from __future__ import annotations

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
from gradguard.memory.census import Census, Growth, diff, graph_storages, new_tensors, storage_key, take_census


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
    args = tuple(targets)
    ignore = {id(targets), id(args), *namer.scope_ids}
    target_ids = {id(t) for t in targets}
    owners: dict[int, dict[str, Any]] = {}
    calls = 1
    level = [r for r in gc.get_referrers(*args) if isinstance(r, _CONTAINERS) and id(r) not in ignore]
    ignore.add(id(level))
    for container in level[:8]:
        held = _count_held(container, target_ids)
        if held == 0:
            continue
        named = _named(namer, container)
        path = ""
        if named is None and calls < max_calls:
            calls += 1
            named, path = _climb(container, namer, ignore)
        if named is None:
            continue
        name, location = named
        entry = owners.setdefault(
            id(container),
            {
                "name": name + path,
                "kind": type(container).__name__,
                "location": location.to_dict() if location is not None else None,
                "held": 0,
                "length": len(container),
                "maxlen": getattr(container, "maxlen", None),
            },
        )
        entry["held"] += held
    return sorted(owners.values(), key=lambda o: -o["held"])


def _count_held(container: Any, target_ids: set[int]) -> int:
    values = container.values() if isinstance(container, dict) else container
    try:
        return sum(1 for v in values if id(v) in target_ids)
    except RuntimeError:  # changed size while counting
        return 0


def _climb(container: Any, namer: Namer, ignore: set[int]) -> tuple[tuple[str, Location | None] | None, str]:
    """Name a container through what holds it: ``obj.attr``, ``d['key']`` or ``outer[3]``."""
    parents = [r for r in gc.get_referrers(container) if id(r) not in ignore and not isinstance(r, FrameType)]
    for parent in parents:
        if isinstance(parent, dict):
            key = next((k for k, v in parent.items() if v is container), None)
            if key is None:
                continue
            named = _named(namer, parent)
            if named is not None:
                return named, f"[{key!r}]"
            owner = _instance_of(parent, ignore)
            if owner is not None:
                named = _named(namer, owner)
                if named is not None and isinstance(key, str):
                    line = class_attribute_location(type(owner), key, container) or named[1]
                    return (f"{named[0]}.{key}", line), ""
        elif isinstance(parent, (list, tuple, deque)):
            named = _named(namer, parent)
            if named is not None:
                return named, "[...]"
    return None, ""


def _instance_of(d: dict[str, Any], ignore: set[int]) -> Any:
    for r in gc.get_referrers(d):
        if id(r) not in ignore and getattr(r, "__dict__", None) is d:
            return r
    return None


def explain(before: Census, x: int, namer: Namer) -> list[Growth]:
    """The tensor groups that grew since ``before``, with the containers that hold them, largest first."""
    after = take_census(x)
    growths = diff(before, after)[:8]
    if not growths:
        return []
    graphs: dict[int, set[tuple[str, int]]] = {}  # index of a growth -> storages its graphs keep
    storages: dict[int, set[tuple[str, int]]] = {}  # index of a growth -> its new tensors' storages
    for i, growth in enumerate(growths):
        targets = new_tensors(before, growth.key, limit=8)
        if not targets:
            continue
        storages[i] = {k for k in (storage_key(t)[0] for t in targets) if k is not None}
        if growth.key[4]:  # has grad_fn: what its graph keeps alive
            saved = graph_storages(targets[0])
            growth.graph_bytes = sum(saved.values())
            graphs[i] = set(saved)
        growth.owners = find_owners(targets, namer)
        del targets
    for i, growth in enumerate(growths):
        # tensors kept alive by another group's graphs count once, with the group that holds the graphs
        growth.held_by_graph = any(
            j != i and growths[j].owners and storages.get(i, set()) & kept for j, kept in graphs.items()
        )
    kept = [g for g in growths if not g.held_by_graph and g.per_step_bytes >= 64 * 1024]
    kept.sort(key=lambda g: -g.per_step_bytes)
    return kept


def fill_steps(growths: list[Growth], headroom: tuple[int, int] | None) -> int | None:
    """Steps until full, when all the growth sits in bounded containers that fit in memory."""
    if not growths or not all(g.owners for g in growths):
        return None
    extra = 0.0
    steps = 0
    for g in growths:
        owner = g.owners[0]
        if owner.get("maxlen") is None:
            return None
        room = max(owner["maxlen"] - owner["length"], 0)
        extra += room * max(g.tensor_bytes, 1.0)
        steps = max(steps, int(room / max(g.per_step_count, 1e-9)) + 1)
    if headroom is None or extra >= 0.5 * headroom[0]:
        return None
    return steps
