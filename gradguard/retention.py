"""Stamps on autograd graphs, and the span of history that a held value reaches (GG201's machinery).

Each model output gets a stamp in its ``grad_fn.metadata``: the epoch (step or iteration) it
was made in, and the oldest epoch whose graph the model's inputs brought into the call. A
bounded walk from what a variable holds then tells how many epochs of history it keeps
alive, without reading any tensor.

Example:
    >>> import torch
    >>> x = torch.ones(2, requires_grad=True)
    >>> y = x * 2
    >>> stamp([y], (7, 3, 0, 3, 0))
    >>> rounds, groups = spans([(y + 1).grad_fn], token=7, limit=16)
    >>> rounds.lo, rounds.hi, rounds.epochs
    (3, 3, 1)
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Callable, Iterable
from types import CodeType, FrameType, ModuleType
from typing import Any

import torch

from gradguard.findings import Location
from gradguard.introspect import sites
from gradguard.introspect.frames import code_location, frame_location, frame_variables
from gradguard.introspect.graph import graph_tensors, walk
from gradguard.introspect.naming import name_in_frame

KEY = "gradguard.GG201"  # the key of the stamp in grad_fn.metadata
TOKENS = itertools.count(1)  # tells the stamps of one detector from another's
HOLDERS = (torch.Tensor, list, tuple, dict, deque)

#: (token, round, group, origin round, origin group)
Stamp = tuple[int, int, int, int, int]


@dataclasses.dataclass
class Span:
    """The epochs (steps or iterations) whose graphs a held value reaches.

    ``first`` and ``hi`` are the oldest and newest stamps met in the walk; ``lo`` also
    follows the stamps' origins, the oldest graph that a model's inputs brought into its
    call; ``carried`` is set when some input brought in a graph older than its call.
    """

    lo: int
    hi: int
    first: int
    carried: bool = False

    @property
    def epochs(self) -> int:
        """How many epochs of history stay reachable."""
        return self.hi - self.lo + 1

    @property
    def stamped(self) -> int:
        """How many epochs the stamps met span (a graph fed back counts once)."""
        return self.hi - self.first + 1

    def outgrows(self, before: Span) -> bool:
        """Whether this holds the stamps of several epochs, more than when ``before`` was seen."""
        return before.stamped >= 2 and self.stamped >= 2 and self.first <= before.first and self.hi > before.hi

    def merge(self, other: Span) -> None:
        self.lo = min(self.lo, other.lo)
        self.hi = max(self.hi, other.hi)
        self.first = min(self.first, other.first)
        self.carried = self.carried or other.carried


@dataclasses.dataclass
class Place:
    """A variable, container or attribute that holds graphs, as a check saw it."""

    key: tuple[Any, ...]
    where: str
    kind: str  # "variable", "list", "tuple", "dict", "deque" or "attribute"
    span: Span
    frame: FrameType | None = None
    owner: Any = None  # for an attribute: the object that has it
    line: Location | None = None  # where the check saw it (the frame's line then)

    def seen_in(self, frame: FrameType) -> None:
        self.frame = frame
        self.line = frame_location(frame)


def frame_key(frame: FrameType, name: str) -> tuple[Any, ...]:
    """A variable of a function, the same at each call of the function."""
    code = frame.f_code
    return ("frame", code.co_filename, code.co_firstlineno, code.co_name, name)


def held_places(
    frames: list[FrameType],
    modules: list[tuple[torch.nn.Module, str, torch.nn.Module]],
    span: Callable[[Any], Span | None],
    globals_: list[ModuleType] | None = None,
) -> list[Place]:
    """What holds stamped graphs: the frames' variables and closures, ``self``'s attributes,
    the globals of the program's modules, the models' modules' attributes.

    ``modules`` are ``(model, path, submodule)``; ``span(value)`` is the history a value
    reaches, or ``None``.
    """
    globals_ = [m for m in (globals_ or ()) if all(vars(m) is not f.f_globals for f in frames)]
    places: list[Place] = []
    by_object: dict[int, int] = {}  # a container passed down to a helper: one place, where it is filled
    for frame in frames:
        for name, value in frame_variables(frame):
            if isinstance(value, HOLDERS):
                if name.startswith("__"):
                    continue
                known = by_object.get(id(value))
                if known is not None:
                    if _fills(frame, name) and not _fills(places[known].frame, places[known].where):
                        places[known] = Place(frame_key(frame, name), name, kind(value), places[known].span)
                        places[known].seen_in(frame)
                    continue
                found = span(value)
                if found is not None:
                    if not isinstance(value, torch.Tensor):
                        by_object[id(value)] = len(places)
                    places.append(Place(frame_key(frame, name), name, kind(value), found))
                    places[-1].seen_in(frame)
            elif name == "self" and not isinstance(value, torch.nn.Module):
                for attr, inner in object_attrs(value):
                    found = span(inner)
                    if found is not None:
                        key = ("self", type(value).__qualname__, attr)
                        places.append(Place(key, f"self.{attr}", "attribute", found, owner=value))
                        places[-1].seen_in(frame)
    for frame in frames:  # state kept in the cells of a closure the frame holds (a logging callback)
        for _name, value in frame_variables(frame):
            closure = getattr(value, "__closure__", None) if callable(value) else None
            code = getattr(value, "__code__", None)
            if not closure or code is None or len(closure) > 16:
                continue
            for var, cell in zip(code.co_freevars, closure, strict=False):
                inner = _cell_contents(cell)
                if isinstance(inner, HOLDERS) and not isinstance(inner, torch.Tensor) and id(inner) not in by_object:
                    found = span(inner)
                    if found is not None:
                        by_object[id(inner)] = len(places)
                        line = sites.variable_sites(code, var).best(container=True) or code.co_firstlineno
                        cell_key = ("closure", code.co_filename, code.co_firstlineno, var)
                        places.append(Place(cell_key, var, kind(inner), found, line=code_location(code, line)))
    for module in globals_:  # module globals of the program's files, filled by their functions
        for name, value in list(vars(module).items()):
            if name.startswith("__") or not isinstance(value, HOLDERS) or id(value) in by_object:
                continue
            found = span(value)
            if found is not None:
                by_object[id(value)] = len(places)
                global_key = ("global", module.__name__, name)
                places.append(Place(global_key, name, kind(value), found, line=_global_site(module, name)))
    top = frames[0] if frames else None
    for model, sub_name, sub in modules:
        for attr, value in object_attrs(sub):
            found = span(value)
            if found is not None:
                base = name_in_frame(top, model, attributes=False) or type(model).__name__
                path = ".".join(p for p in (base, sub_name, attr) if p)
                places.append(Place(("attr", path), path, "attribute", found, owner=sub))
                if top is not None:
                    places[-1].seen_in(top)
    return places


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _global_site(module: ModuleType, name: str) -> Location | None:
    """The line of a module's own function that fills its global ``name``."""
    filename = getattr(module, "__file__", None)
    fallback = None
    for value in list(vars(module).values()):
        code = getattr(value, "__code__", None)
        if not isinstance(code, CodeType) or code.co_filename != filename:
            continue
        found = sites.variable_sites(code, name)
        if found.mutated:
            return code_location(code, found.mutation())
        fallback = fallback or (code_location(code, found.best(container=True)) if found.best(container=True) else None)
    return fallback


def _fills(frame: FrameType | None, name: str) -> bool:
    """Whether the function of ``frame`` adds to its variable ``name`` (``name.append(...)``, ...)."""
    return frame is not None and bool(sites.variable_sites(frame.f_code, name).mutated)


def inputs_history(inputs: list[Any], token: int, limit: int, floor: int = 0) -> list[tuple[Any, Span, Span]]:
    """The inputs of a call that bring stamped graphs into it, with the rounds and the groups they reach."""
    found: list[tuple[Any, Span, Span]] = []
    for value in inputs:
        roots = [t.grad_fn for t in graph_tensors(value, depth=2) if t.grad_fn is not None]
        spanned = spans(roots, token, limit, floor=floor) if roots else None
        if spanned is not None:
            found.append((value, *spanned))
    return found


def carried_places(frame: FrameType | None, module_type: type, carried: list[tuple[Any, Span]]) -> list[Place]:
    """The places of states fed back into a model: the caller's variable, else "an input of" the model."""
    places = []
    for value, span in carried:
        name = name_in_frame(frame, value, attributes=False)
        if name is None or frame is None:
            key = ("input", module_type.__qualname__)
            place = Place(key, f"an input of {module_type.__name__}", "variable", span)
        else:
            place = Place(frame_key(frame, name), name, kind(value), span)
        if frame is not None:
            place.seen_in(frame)
        places.append(place)
    return places


def stamp(outputs: Iterable[torch.Tensor], value: Stamp) -> None:
    """Stamp the graphs of a call's outputs."""
    for t in outputs:
        node: Any = t.grad_fn
        node.metadata[KEY] = value


def stamp_new(roots: list[Any], token: int, value: Stamp, limit: int = 8) -> None:
    """Stamp the top of a graph given to ``backward()``: the roots and the nodes just below them.

    A framework may scale the user's loss before its backward (``loss / accumulate``): the
    loss the user keeps is then a node below the root. The walk stops at nodes that already
    carry a stamp of ``token``, and at two levels below the roots.
    """
    level = [r for r in roots if r is not None]
    seen: set[int] = set()
    for _ in range(3):
        below: list[Any] = []
        for node in level:
            if id(node) in seen or len(seen) >= limit or type(node).__name__ == "AccumulateGrad":
                continue
            seen.add(id(node))
            mark = node.metadata.get(KEY)
            if mark is not None and mark[0] == token:
                continue
            node.metadata[KEY] = value
            below.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
        level = below


def reaches_before(roots: list[Any], token: int, group: int, limit: int) -> bool:
    """Whether a bounded walk from ``roots`` meets the graph of a group before ``group``."""
    found = False

    def descend(node: Any) -> bool:
        nonlocal found
        mark = node.metadata.get(KEY)
        if mark is not None and mark[0] == token:
            found = found or mark[4] < group
            return False
        return not found and type(node).__name__ != "AccumulateGrad"

    walk(roots, limit, descend)
    return found


def spans(
    roots: list[Any], token: int, limit: int, budget: list[int] | None = None, floor: int = 0
) -> tuple[Span, Span] | None:
    """The rounds and the groups whose stamps a bounded walk from ``roots`` meets.

    The walk stops at a stamped node (its origin sums up the history behind it) and at
    parameters. ``budget[0]`` is reduced by the nodes walked. Rounds before ``floor`` count
    as ``floor``.
    """
    found: dict[int, Stamp] = {}

    def descend(node: Any) -> bool:
        mark = node.metadata.get(KEY)
        if mark is not None and mark[0] == token:
            found[id(node)] = mark
            return False
        return type(node).__name__ != "AccumulateGrad"

    nodes = walk(roots, limit, descend)
    if budget is not None:
        budget[0] -= len(nodes)
    rounds: Span | None = None
    groups: Span | None = None
    for _, rnd, grp, origin_round, origin_group in found.values():
        rnd, origin_round = max(rnd, floor), max(origin_round, floor)
        r = Span(origin_round, rnd, rnd, carried=origin_round < rnd)
        g = Span(origin_group, grp, grp, carried=origin_group < grp)
        if rounds is None or groups is None:
            rounds, groups = r, g
        else:
            rounds.merge(r)
            groups.merge(g)
    if rounds is None or groups is None:
        return None
    return rounds, groups


def kind(value: Any) -> str:
    """How a finding calls a holder: ``list``, ``tuple``, ``dict``, ``deque`` or ``variable``."""
    for name, tp in (("list", list), ("tuple", tuple), ("dict", dict), ("deque", deque)):
        if isinstance(value, tp):
            return name
    return "variable"


def object_attrs(obj: Any) -> list[tuple[str, Any]]:
    """An object's own public attributes that may hold graphs (for a module: not its
    parameters, buffers or children, which live in private dictionaries)."""
    try:
        attrs = vars(obj)
    except TypeError:
        return []
    return [(k, v) for k, v in attrs.items() if isinstance(k, str) and k[:1] != "_" and isinstance(v, HOLDERS)]


def locate(place: Place, frames: list[FrameType]) -> Location | None:
    """The line that fills a place: for a container the line that adds to it, else its assignment."""
    if place.kind == "attribute":
        attr = place.where.rsplit(".", 1)[-1]
        codes = [f.f_code for f in frames]
        if place.owner is not None:
            codes += sites.class_codes(type(place.owner))
        for prefer_mutation in (True, False):  # a line that appends to it anywhere, else an assignment
            for code in codes:
                found = sites.attribute_sites(code, attr)
                line = found.mutation() if prefer_mutation else found.best(container=False)
                if line is not None:
                    return code_location(sites.code_at(code, line), line)
        return place.line
    if place.frame is None:
        return place.line
    code = place.frame.f_code
    found = sites.variable_sites(code, place.where)
    return code_location(code, found.best(container=place.kind in ("list", "dict", "deque")) or place.frame.f_lineno)


def describe(place: Place, unit: str, evaluation: bool = False, offset: int = 0) -> tuple[str, str, dict[str, Any]]:
    """A finding's message, hint and evidence for a place that keeps graphs of several epochs.

    ``unit`` is ``"step"`` or ``"iteration"``; ``evaluation`` says the graphs come from model
    calls with no ``backward()`` between them (an evaluation loop run with autograd on);
    ``offset`` is subtracted from the epochs shown.
    """
    name = place.where
    span = Span(place.span.lo - offset, place.span.hi - offset, place.span.first - offset, place.span.carried)
    data = {
        "variable": name,
        "kind": place.kind,
        "steps_spanned": span.epochs,
        "first_step": span.lo,
        "last_step": span.hi,
        "unit": unit,
        "carried": span.carried,
    }
    if evaluation:
        data["evaluation"] = True
    if place.kind in ("list", "tuple", "dict", "deque") and not span.carried:
        holder = f"{place.kind} `{name}`"
    elif place.kind == "attribute":
        holder = f"attribute `{name}`"
    else:
        holder = f"`{name}`"
    if span.carried:
        message = (
            f"{holder} carries the autograd graph of {unit} {span.lo} into {unit} {span.hi}: the state fed "
            f"back into the model was never detached, so its graph spans {span.epochs} {unit}s and grows "
            f"with each one"
        )
        if place.kind == "tuple":
            hint = f"Detach the carried state at each batch: `{name} = tuple(h.detach() for h in {name})`"
        else:
            hint = f"Detach the carried state at each batch: `{name} = {name}.detach()`"
        if evaluation:
            hint += ", or evaluate under `torch.no_grad()`"
        return message, hint, data
    message = (
        f"{holder} holds autograd graphs of {span.epochs} {unit}s ({unit}s {span.lo} to {span.hi}) and "
        f"more at each {unit}: every one stays in memory with what it saved for backward"
    )
    if evaluation:
        hint = "Evaluate under `with torch.no_grad():` (or torch.inference_mode()), or keep out.detach()"
    elif place.kind in ("list", "tuple", "dict", "deque", "attribute"):
        hint = f"Keep numbers, not graph tensors: `{name}.append(loss.item())` (or loss.detach())"
    else:
        hint = f"Accumulate a number, not the tensor: `{name} += loss.item()` (or loss.detach())"
    return message, hint, data
