"""GG201 graph-retained."""

from __future__ import annotations

import dataclasses
import dis
import itertools
import os
import sys
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from types import CodeType, FrameType
from typing import Any

import torch

from gradguard._frames import _display_path, _is_library_file, frame_variables, user_frame
from gradguard.detector import Detector, Findings
from gradguard.findings import Finding, Location

_KEY = "gradguard.GG201"  # the key of our stamp in grad_fn.metadata
_TOKENS = itertools.count(1)  # tells the stamps of one detector from another's

_NODE_BUDGET = 512  # graph nodes walked from one held value
_CHECK_BUDGET = 8192  # graph nodes walked in one check, all values together
_INPUT_BUDGET = 128  # graph nodes walked from one input of a forward
_EDGE_ITEMS = 4  # items looked at from each end of a list, tuple or dict
_MAX_FRAMES = 8  # user frames looked at in one check
_MAX_MODULES = 256  # submodules whose attributes are looked at in one check
_STALE_CALLS = 16  # an optimizer that did not step in this many step() calls no longer ends rounds
_EVERY_CHECK_UNTIL = 32  # check at every boundary at first, then every _CHECK_EVERY
_CHECK_EVERY = 8
_MUTATORS = frozenset({"append", "extend", "insert", "appendleft", "extendleft", "add", "update", "setdefault"})
_SIMPLE_LOADS = frozenset({"LOAD_FAST", "LOAD_NAME", "LOAD_GLOBAL", "LOAD_DEREF"})
_HOLDERS = (torch.Tensor, list, tuple, dict, deque)
_STORES = frozenset({"STORE_FAST", "STORE_NAME", "STORE_GLOBAL", "STORE_DEREF"})
_SITE = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


@dataclasses.dataclass
class _Span:
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

    def merge(self, other: _Span) -> None:
        self.lo = min(self.lo, other.lo)
        self.hi = max(self.hi, other.hi)
        self.first = min(self.first, other.first)
        self.carried = self.carried or other.carried


@dataclasses.dataclass
class _Place:
    """A variable, container or attribute that holds graphs, as a check saw it."""

    key: tuple[Any, ...]
    where: str
    kind: str  # "variable", "list", "tuple", "dict", "deque" or "attribute"
    span: _Span
    frame_code: CodeType | None = None
    frame_line: int = 0
    frame_file: str = ""
    frame_function: str = ""


class _OptimizerRecord:
    __slots__ = ("last_call", "ref")

    def __init__(self, optimizer: torch.optim.Optimizer, last_call: int) -> None:
        self.ref = weakref.ref(optimizer)
        self.last_call = last_call


class GraphRetained(Detector):
    """GG201 graph-retained: autograd history kept alive across steps.

    **What it detects.** A tensor that carries an autograd graph keeps every tensor that
    graph saved for backward, and every earlier graph it was computed from. When a variable
    the training loop holds (``total_loss``, a list ``history``, an attribute
    ``model.step_losses``) reaches the graphs of several steps, and reaches more of them
    step after step, the history of the run stays in memory. gradguard stamps the graph of
    each step at the output of the model's forward (in ``grad_fn.metadata``), and at step
    boundaries walks, with bounded walks, only the graphs of the tensors that the user's
    frames, containers and model attributes hold. It reports the variable and the line of
    its assignment, and how many steps of history it spans:

    - the running total ``total_loss += loss``;
    - a list of loss or output tensors kept for logging;
    - a recurrent hidden state fed back into the model from batch to batch without
      ``detach()``: with ``backward(retain_graph=True)`` the graph, and the cost of each
      backward, grow without bound (it is reported at the first forward that links the
      graph of one step to that of an earlier one);
    - outputs collected, or a hidden state carried, in an evaluation loop run with
      autograd on. Without an optimizer, each call of the model is an iteration; these
      findings are made when the run ends, and only if no optimizer step and no backward
      reached the model during the run.

    Several optimizers (a GAN) make one step when each of them has stepped once, so a
    generator output reused within the iteration is not history; an LBFGS closure and the
    micro-batches of gradient accumulation belong to the step of their ``step()`` call.
    A graph that spans a single step, however old (a loss kept in a local until the next
    step overwrites it), is not reported.

    **Why it matters.** Memory grows with every step until the process runs out of it,
    far from the line that caused it; with ``retain_graph=True`` every backward also walks
    the whole history, so steps get slower and slower. This is the most common memory
    leak in PyTorch (the PyTorch FAQ, "My model reports cuda runtime error(2): out of
    memory").

    **How to fix it.** Keep numbers, not graph tensors: ``total_loss += loss.item()``,
    ``history.append(loss.item())`` (or ``loss.detach()`` to stay on the device). Detach a
    carried hidden state at each batch: ``hidden = hidden.detach()`` (for an LSTM,
    ``hidden = tuple(h.detach() for h in hidden)``). Evaluate under ``torch.no_grad()`` or
    ``torch.inference_mode()``.

    **Example.**

    .. code-block:: python

        total_loss = 0.0
        for x, y in loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            total_loss += loss        # GG201: keeps the graph of every step alive
            # fix: total_loss += loss.item()

    **Cost.** A dictionary write per model call; at each step boundary (every step for
    the first 32, then every 8th) a look at the user's frames and model attributes and
    walks of at most a few hundred graph nodes per held value. No tensor value is read and
    the GPU is never synchronised. Graphs built outside a watched model's forward (a
    model written as plain functions) carry no stamp and are not seen.
    """

    code = "GG201"
    name = "graph-retained"
    hint = "Keep numbers, not graph tensors, across steps: use .item() or .detach()"
    events = frozenset({"model", "optimizer", "forward", "step_post", "close"})
    state_fields = ("flagged_places", "checks")

    def setup(self) -> None:
        self.flagged_places = 0
        self.checks = 0
        self._token = next(_TOKENS)
        self._round = 0  # completed steps (rounds in which every active optimizer stepped)
        self._group = 0  # iterations without an optimizer: a model called again starts one
        self._group_members: set[int] = set()
        self._calls = 0  # optimizer step() calls seen
        self._stepped: set[int] = set()
        self._optimizers: dict[int, _OptimizerRecord] = {}
        self._hooked: set[int] = set()
        self._previous: dict[tuple[Any, ...], _Span] = {}
        self._reported: dict[tuple[Any, ...], Finding] = {}
        self._pending: dict[tuple[Any, ...], Finding] = {}  # iteration findings, decided at close
        self._grad_marks: dict[int, tuple[int, int] | None] = {}
        self._max_spans: dict[tuple[Any, ...], int] = {}
        self._seen: dict[tuple[Any, ...], int] = {}
        self._site_cache: dict[tuple[CodeType, str], _Sites] = {}

    def teardown(self) -> None:
        self._optimizers.clear()
        self._hooked.clear()
        self._previous.clear()
        self._pending.clear()
        self._grad_marks.clear()
        self._site_cache.clear()
        self._group_members.clear()
        self._stepped.clear()

    # ---------------------------------------------------------------- events
    def on_model(self, module: torch.nn.Module) -> Findings:
        self.add_handle(module.register_forward_hook(self.guarded(self._after_forward), with_kwargs=True))
        for p in module.parameters():
            self._grad_marks.setdefault(id(p), _grad_mark(p))
        return None

    def on_optimizer(self, optimizer: torch.optim.Optimizer) -> Findings:
        self._register_optimizer(optimizer)
        return None

    def on_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Findings:
        if self._calls:
            return None  # optimizer steps mark the boundaries
        if id(module) not in self._group_members:
            self._group_members.add(id(module))
            return None
        self._group += 1
        self._group_members = {id(module)}
        if self._due(self._group):
            self._check(iterations=True)  # iteration findings wait for the end of the run
        return None

    def on_step_post(self, optimizer: torch.optim.Optimizer) -> Findings:
        return self._on_step(optimizer)

    def on_close(self) -> Findings:
        if self._calls or not self._pending or self._backward_ran():
            return None
        out = []
        for key, finding in self._pending.items():
            self.flagged_places += 1
            self._reported[key] = finding
            out.append(finding)
        self._pending.clear()
        return out

    def report(self) -> dict[str, Any]:
        return {
            "checks": self.checks,
            "retained": [
                {
                    "where": f.where,
                    "location": f.location.to_dict() if f.location is not None else None,
                    "max_steps_spanned": self._max_spans.get(key, f.data.get("steps_spanned", 0)),
                    "unit": f.data.get("unit", "step"),
                }
                for key, f in self._reported.items()
            ],
        }

    # ---------------------------------------------------------------- epochs
    def _due(self, n: int) -> bool:
        return n <= _EVERY_CHECK_UNTIL or n % _CHECK_EVERY == 0

    def _register_optimizer(self, optimizer: torch.optim.Optimizer) -> _OptimizerRecord:
        rec = self._optimizers.get(id(optimizer))
        if rec is None or rec.ref() is not optimizer:
            rec = _OptimizerRecord(optimizer, self._calls)
            self._optimizers[id(optimizer)] = rec
        return rec

    def _on_step(self, optimizer: torch.optim.Optimizer) -> Findings:
        self._calls += 1
        if self._calls == 1:
            # training: optimizer steps, not model calls, are the unit of history
            self._pending.clear()
            self._previous.clear()
            self._seen.clear()
        rec = self._register_optimizer(optimizer)
        if self._calls <= 2:
            self._discover_optimizers()
        rec.last_call = self._calls
        self._stepped.add(id(optimizer))
        for key in [k for k, r in self._optimizers.items() if r.ref() is None]:
            del self._optimizers[key]
        active = [k for k, r in self._optimizers.items() if self._calls - r.last_call <= _STALE_CALLS]
        if not all(k in self._stepped for k in active):
            return None  # another optimizer has yet to step in this round (a GAN)
        self._round += 1
        self._stepped = set()
        if not self._due(self._round):
            return None
        return self._check(iterations=False)

    def _discover_optimizers(self) -> None:
        """Know the optimizers of the loop before their first step, so a round waits for them."""
        known = {id(o) for o in self.guard.optimizers()}
        for frame in _user_frames():
            for _name, value in _frame_items(frame):
                candidates = [value]
                if _name == "self" and not isinstance(value, torch.nn.Module):
                    candidates = [v for _, v in _object_attrs_any(value)]
                for obj in candidates:
                    # a wrapper such as Lightning's LightningOptimizer shares the hooks of the
                    # optimizer it wraps: watch the wrapped one, never the wrapper
                    inner = getattr(obj, "_optimizer", None)
                    if isinstance(inner, torch.optim.Optimizer):
                        obj = inner
                    if isinstance(obj, torch.optim.Optimizer) and id(obj) not in self._optimizers:
                        self._register_optimizer(obj)
                        if not self.guard.global_hooks and id(obj) not in known and id(obj) not in self._hooked:
                            self._hooked.add(id(obj))
                            hook = self.guarded(lambda opt, args, kwargs: self._on_step(opt))
                            self.add_handle(obj.register_step_post_hook(hook))

    def _backward_ran(self) -> bool:
        for model in self.guard.models():
            for p in model.parameters():
                if id(p) in self._grad_marks and _grad_mark(p) != self._grad_marks[id(p)]:
                    return True
        return False

    # ---------------------------------------------------------------- stamping
    def _after_forward(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Findings:
        outputs = [t for t in _graph_tensors(output, depth=2) if t.grad_fn is not None][:16]
        if not outputs:
            return None
        iterations = self._calls == 0
        now = self._group if iterations else self._round
        origin_round, origin_group = self._round, self._group
        carried: list[tuple[Any, _Span]] = []
        for value in itertools.chain(args, kwargs.values()):
            roots = [t.grad_fn for t in _graph_tensors(value, depth=2) if t.grad_fn is not None]
            if not roots:
                continue
            found = _walk(roots, self._token, _INPUT_BUDGET)
            if found is None:
                continue
            rounds, groups = found
            origin_round = min(origin_round, rounds.lo)
            origin_group = min(origin_group, groups.lo)
            span = groups if iterations else rounds
            if span.lo < now:
                carried.append((value, _Span(span.lo, now, span.first, carried=True)))
        stamp = (self._token, self._round, self._group, origin_round, origin_group)
        for t in outputs:
            node: Any = t.grad_fn
            node.metadata[_KEY] = stamp
        if not carried:
            return None
        return self._report_carried(module, carried, iterations)

    def _report_carried(self, module: torch.nn.Module, carried: list[tuple[Any, _Span]], iterations: bool) -> Findings:
        frame = user_frame(sys._getframe(1))
        items = _frame_items(frame) if frame is not None else []
        out = []
        for value, span in carried:
            name = next((n for n, v in items if v is value), None)
            if name is None or frame is None:
                name = f"an input of {type(module).__name__}"
                key: tuple[Any, ...] = ("input", type(module).__qualname__)
                place = _Place(key, name, "variable", span)
            else:
                place = _Place(_frame_key(frame, name), name, _kind(value), span)
            if frame is not None:
                _set_frame(place, frame)
            out.append(self._finding_for(place, iterations))
        del items
        return self._deliver(out, iterations)

    # ---------------------------------------------------------------- checks
    def _check(self, *, iterations: bool) -> list[Finding]:
        """Look at what the user holds at a boundary; report places whose history keeps growing."""
        self.checks += 1
        budget = [_CHECK_BUDGET]
        places: list[_Place] = []
        frames = _user_frames()
        for frame in frames:
            for name, value in _frame_items(frame):
                if isinstance(value, _HOLDERS):
                    span = self._span(value, budget)
                    if span is not None and not name.startswith("__"):
                        place = _Place(_frame_key(frame, name), name, _kind(value), span)
                        _set_frame(place, frame)
                        places.append(place)
                elif name == "self" and not isinstance(value, torch.nn.Module):
                    for attr, inner in _object_attrs(value):
                        span = self._span(inner, budget)
                        if span is not None:
                            key = ("self", type(value).__qualname__, attr)
                            place = _Place(key, f"self.{attr}", "attribute", span)
                            _set_frame(place, frame)
                            self._locate_attribute(place, attr, None)
                            places.append(place)
        top = frames[0] if frames else None
        for model in self.guard.models():
            for count, (sub_name, sub) in enumerate(model.named_modules()):
                if count >= _MAX_MODULES:
                    break
                for attr, value in _object_attrs(sub):
                    span = self._span(value, budget)
                    if span is None:
                        continue
                    base = _name_in(model, top) or type(model).__name__
                    path = ".".join(p for p in (base, sub_name, attr) if p)
                    place = _Place(("attr", path), path, "attribute", span)
                    if top is not None:
                        _set_frame(place, top)
                    self._locate_attribute(place, attr, sub)
                    places.append(place)
        del frames, top
        previous, self._previous = self._previous, {}
        out = []
        for place in places:
            span = place.span
            self._previous[place.key] = span
            if place.key in self._reported or place.key in self._pending:
                if span.epochs >= 2:  # seen again: count it
                    self._max_spans[place.key] = max(self._max_spans.get(place.key, 0), span.epochs)
                    out.append(self._finding_for(place, iterations))
                continue
            # A state fed back into the model is reported at that call, under its own name; what
            # is computed from it (the output of the call) is not reported again. Only a value
            # that holds the stamps of several epochs, more at each check, is a new finding.
            before = previous.get(place.key)
            if (
                before is not None
                and before.stamped >= 2
                and span.stamped >= 2
                and span.first <= before.first
                and span.hi > before.hi
            ):
                out.append(self._finding_for(place, iterations))
        return self._deliver(out, iterations)

    def _span(self, value: Any, budget: list[int]) -> _Span | None:
        """The epochs whose graphs ``value`` reaches, or ``None`` if it holds no stamped graph."""
        if budget[0] <= 0:
            return None
        roots = [t.grad_fn for t in _graph_tensors(value, depth=2) if t.grad_fn is not None]
        if not roots:
            return None
        found = _walk(roots, self._token, min(_NODE_BUDGET, budget[0]), budget)
        if found is None:
            return None
        return found[1] if self._calls == 0 else found[0]

    # ---------------------------------------------------------------- findings
    def _deliver(self, findings: list[Finding], iterations: bool) -> list[Finding]:
        """Record new findings; a place seen again at a later epoch counts once more."""
        out = []
        for f in findings:
            key = f.data.pop("_key")
            latest = f.data["last_step"]
            if self._seen.get(key, -1) >= latest:
                continue  # already counted for this epoch (at the model call, then at the step)
            self._seen[key] = latest
            self._max_spans[key] = max(self._max_spans.get(key, 0), f.data["steps_spanned"])
            if iterations:
                known = self._pending.get(key)
                if known is None:
                    self._pending[key] = f
                else:
                    known.count += 1
            elif key in self._reported:
                out.append(dataclasses.replace(self._reported[key], count=1))
            else:
                self._reported[key] = f
                self.flagged_places += 1
                out.append(f)
        return out

    def _finding_for(self, place: _Place, iterations: bool) -> Finding:
        unit = "iteration" if iterations else "step"
        span = place.span
        name = place.where
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
            if iterations:
                hint += ", or evaluate under `torch.no_grad()`"
        else:
            message = (
                f"{holder} holds autograd graphs of {span.epochs} {unit}s ({unit}s {span.lo} to {span.hi}) and "
                f"more at each {unit}: every one stays in memory with what it saved for backward"
            )
            if iterations:
                hint = "Evaluate under `with torch.no_grad():` (or torch.inference_mode()), or keep out.detach()"
            elif place.kind in ("list", "tuple", "dict", "deque") or place.kind == "attribute":
                hint = f"Keep numbers, not graph tensors: `{name}.append(loss.item())` (or loss.detach())"
            else:
                hint = f"Accumulate a number, not the tensor: `{name} += loss.item()` (or loss.detach())"
        return self.finding(
            message,
            where=name,
            location=self._location(place),
            hint=hint,
            data={
                "variable": name,
                "kind": place.kind,
                "steps_spanned": span.epochs,
                "first_step": span.lo,
                "last_step": span.hi,
                "unit": unit,
                "carried": span.carried,
                "_key": place.key,
            },
        )

    # ---------------------------------------------------------------- locations
    def _location(self, place: _Place) -> Location | None:
        if place.kind == "attribute":
            if place.frame_file:
                return Location(place.frame_file, place.frame_line, place.frame_function)
            return None
        code = place.frame_code
        if code is None:
            return None
        sites = self._sites(code, place.where)
        if place.kind in ("list", "dict", "deque") and not sites.mutated:
            # a global container filled by a function: point at the line in that function
            for frame in _user_frames():
                other = self._sites(frame.f_code, place.where)
                if other.mutated and frame.f_code is not code:
                    return Location(_display_path(frame.f_code.co_filename), other.mutated[-1], frame.f_code.co_name)
        line = sites.best(container=place.kind in ("list", "dict", "deque"))
        return Location(place.frame_file, line or place.frame_line, place.frame_function)

    def _sites(self, code: CodeType, name: str) -> _Sites:
        cache_key = (code, name)
        sites = self._site_cache.get(cache_key)
        if sites is None:
            if len(self._site_cache) > 4096:
                self._site_cache.clear()
            sites = self._site_cache[cache_key] = _assignment_sites(code, name)
        return sites

    def _locate_attribute(self, place: _Place, attr: str, owner: Any) -> None:
        """Point at the line that adds to the attribute: in the user's frames or the owner's methods."""
        codes = [frame.f_code for frame in _user_frames()]
        if owner is not None:
            for klass in type(owner).__mro__:
                if klass.__module__.startswith("torch."):
                    break
                codes += [
                    fn.__code__ for fn in vars(klass).values() if isinstance(getattr(fn, "__code__", None), CodeType)
                ]
        codes = [code for code in codes if not _is_library_file(code.co_filename)]
        for container in (True, False):  # a line that appends to it anywhere, else an assignment
            for code in codes:
                sites = self._sites(code, "." + attr)
                line = sites.mutated[-1] if container and sites.mutated else None
                if not container:
                    line = sites.best(container=False)
                if line is not None:
                    place.frame_file = _display_path(code.co_filename)
                    place.frame_line = line
                    place.frame_function = code.co_name
                    return


# -------------------------------------------------------------------- helpers


def _grad_mark(p: torch.Tensor) -> tuple[int, int] | None:
    grad = p.grad
    return None if grad is None else (id(grad), grad._version)


def _walk(roots: list[Any], token: int, limit: int, budget: list[int] | None = None) -> tuple[_Span, _Span] | None:
    """The rounds and the groups whose stamps a bounded walk from ``roots`` meets."""
    seen: set[int] = set()
    keep: list[Any] = []  # the node wrappers stay alive, so that their ids stay unique
    stack = list(roots)
    rounds: _Span | None = None
    groups: _Span | None = None
    while stack and len(keep) < limit:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)
        stamp = node.metadata.get(_KEY)
        if stamp is not None and stamp[0] == token:
            _, rnd, grp, origin_round, origin_group = stamp
            r = _Span(origin_round, rnd, rnd, carried=origin_round < rnd)
            g = _Span(origin_group, grp, grp, carried=origin_group < grp)
            if rounds is None or groups is None:
                rounds, groups = r, g
            else:
                rounds.merge(r)
                groups.merge(g)
            continue  # its origin sums up the history behind it
        if type(node).__name__ == "AccumulateGrad":
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None:
                stack.append(nxt)
    if budget is not None:
        budget[0] -= len(keep)
    if rounds is None or groups is None:
        return None
    return rounds, groups


def _graph_tensors(value: Any, depth: int) -> Iterator[torch.Tensor]:
    """Tensors that may carry a graph in ``value``: itself, or the ends of a container."""
    if isinstance(value, torch.Tensor):
        yield value
        return
    if depth <= 0:
        return
    items: Iterable[Any]
    if isinstance(value, (list, tuple)):
        items = value if len(value) <= 2 * _EDGE_ITEMS else [*value[:_EDGE_ITEMS], *value[-_EDGE_ITEMS:]]
    elif isinstance(value, dict):
        values = value.values()
        if len(value) <= 2 * _EDGE_ITEMS:
            items = list(values)
        else:
            try:
                tail = list(itertools.islice(reversed(values), _EDGE_ITEMS))
            except TypeError:  # a mapping whose values cannot be reversed
                tail = []
            items = [*itertools.islice(values, _EDGE_ITEMS), *tail]
    elif isinstance(value, deque):
        if len(value) <= 2 * _EDGE_ITEMS:
            items = list(value)
        else:
            items = [*itertools.islice(value, _EDGE_ITEMS), *itertools.islice(reversed(value), _EDGE_ITEMS)]
    else:
        return
    for item in items:
        yield from _graph_tensors(item, depth - 1)


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, tuple):
        return "tuple"
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, deque):
        return "deque"
    return "variable"


def _user_frames() -> list[FrameType]:
    """The user's frames, innermost first: the first one, then those outside libraries."""
    first = user_frame(sys._getframe(1))
    out: list[FrameType] = []
    frame = first
    depth = 0
    while frame is not None and len(out) < _MAX_FRAMES and depth < 64:
        filename = frame.f_code.co_filename
        if frame is first or not (_is_library_file(filename) or any(s in filename for s in _SITE)):
            out.append(frame)
        frame = frame.f_back
        depth += 1
    return out


def _frame_items(frame: FrameType) -> list[tuple[str, Any]]:
    """A frame's variables, without leaving a snapshot of them on the frame."""
    return frame_variables(frame)


def _object_attrs(obj: Any) -> list[tuple[str, Any]]:
    """An object's own public attributes that may hold graphs (for a module: not its
    parameters, buffers or children, which live in private dictionaries)."""
    try:
        attrs = vars(obj)
    except TypeError:
        return []
    return [(k, v) for k, v in attrs.items() if isinstance(k, str) and k[:1] != "_" and isinstance(v, _HOLDERS)]


def _object_attrs_any(obj: Any) -> list[tuple[str, Any]]:
    try:
        return [(k, v) for k, v in vars(obj).items() if isinstance(k, str)]
    except TypeError:
        return []


def _name_in(obj: Any, frame: FrameType | None) -> str | None:
    if frame is None:
        return None
    for name, value in _frame_items(frame):
        if value is obj and not name.startswith("__"):
            return name
    return None


def _frame_key(frame: FrameType, name: str) -> tuple[Any, ...]:
    code = frame.f_code
    return ("frame", code.co_filename, code.co_firstlineno, code.co_name, name)


def _set_frame(place: _Place, frame: FrameType) -> None:
    place.frame_code = frame.f_code
    place.frame_line = frame.f_lineno
    place.frame_file = _display_path(frame.f_code.co_filename)
    place.frame_function = frame.f_code.co_name


@dataclasses.dataclass
class _Sites:
    """The lines that store into a name: ``total += ...``, ``name = ...``, ``name.append(...)``."""

    augmented: list[int]
    plain: list[int]
    mutated: list[int]

    def best(self, *, container: bool) -> int | None:
        """For a container, the line that adds to it; else an augmented, then a plain assignment."""
        for lines in (self.mutated, self.augmented, self.plain) if container else (self.augmented, self.plain):
            if lines:
                return lines[-1]
        return None


def _assignment_sites(code: CodeType, name: str) -> _Sites:
    """Find in the bytecode of ``code`` (and its nested functions, for ``.attr``) where ``name`` is set.

    Stores of a constant or of an empty container (``total = 0``, ``history = []``) are
    left out: they never put a graph there. ``name`` is ``".attr"`` for an attribute.
    """
    attribute = name.startswith(".")
    target = name[1:] if attribute else name
    sites = _Sites([], [], [])
    instructions = list(dis.get_instructions(code))
    line = code.co_firstlineno
    for i, ins in enumerate(instructions):
        lineno = getattr(ins, "line_number", None)
        if lineno is None:
            pos = getattr(ins, "positions", None)
            lineno = pos.lineno if pos is not None and pos.lineno is not None else None
        if lineno is None and isinstance(ins.starts_line, int) and not isinstance(ins.starts_line, bool):
            lineno = ins.starts_line
        if lineno is not None:
            line = lineno
        if ins.argval != target:
            continue
        if ins.opname in ("LOAD_ATTR", "LOAD_METHOD") if attribute else ins.opname.startswith("LOAD_"):
            nxt = instructions[i + 1] if i + 1 < len(instructions) else None
            if nxt is not None and nxt.opname in ("LOAD_ATTR", "LOAD_METHOD") and nxt.argval in _MUTATORS:
                sites.mutated.append(line)
            continue
        if not (ins.opname == "STORE_ATTR" if attribute else ins.opname in _STORES):
            continue
        prev = instructions[i - 1] if i else None
        if attribute and prev is not None and prev.opname in _SIMPLE_LOADS:
            prev = instructions[i - 2] if i > 1 else None  # obj.attr = value: value, obj, STORE_ATTR
        if prev is None:
            sites.plain.append(line)
        elif prev.opname.startswith("INPLACE_") or (prev.opname == "BINARY_OP" and "=" in prev.argrepr):
            sites.augmented.append(line)
        elif prev.opname == "LOAD_CONST" or (
            prev.opname in ("BUILD_LIST", "BUILD_MAP", "BUILD_TUPLE") and prev.arg == 0
        ):
            continue
        else:
            sites.plain.append(line)
    if attribute:
        for const in code.co_consts:
            if isinstance(const, CodeType):
                inner = _assignment_sites(const, name)
                sites.augmented += inner.augmented
                sites.plain += inner.plain
                sites.mutated += inner.mutated
    return sites
