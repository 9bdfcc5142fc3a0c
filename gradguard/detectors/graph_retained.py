"""GG201 graph-retained."""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from typing import Any

import torch

from gradguard import retention
from gradguard.detector import Detector, Findings, on
from gradguard.events import Close, ForwardPost, ForwardPre, ModelAdded, OptimizerAdded, StepPost
from gradguard.findings import Finding
from gradguard.introspect.frames import user_frame, user_frames
from gradguard.introspect.graph import graph_tensors
from gradguard.retention import Place, Span
from gradguard.sampling import Rotation

_NODE_BUDGET = 512  # graph nodes walked from one held value
_CHECK_BUDGET = 8192  # graph nodes walked in one check, all values together
_INPUT_BUDGET = 128  # graph nodes walked from one input of a forward
_MAX_FRAMES = 8  # user frames looked at in one check
_STALE_CALLS = 16  # an optimizer that did not step in this many step() calls no longer ends rounds
_CHECK_EVERY = 16  # check at every boundary during the warm-up, then every _CHECK_EVERY


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

    **Cost.** A stamp per model call; at each step boundary (every step during the warm-up,
    the first 32, then every 16th) a look at the user's frames and at the attributes of a rotating few of
    the model's modules, and walks of at most a few hundred graph nodes per held value. No
    tensor value is read and the GPU is never synchronised. Graphs built outside a watched
    model's forward (a model written as plain functions) carry no stamp and are not seen.
    """

    code = "GG201"
    name = "graph-retained"
    hint = "Keep numbers, not graph tensors, across steps: use .item() or .detach()"
    consumes = (ModelAdded, OptimizerAdded, ForwardPre, ForwardPost, StepPost, Close)
    state_fields = ("flagged_places", "checks")

    def setup(self) -> None:
        self.flagged_places = 0
        self.checks = 0
        self._token = next(retention.TOKENS)
        self._round = 0  # completed steps (rounds in which every active optimizer stepped)
        self._group = 0  # iterations without an optimizer: a model called again starts one
        self._group_members: set[int] = set()
        self._calls = 0  # optimizer step() calls seen
        self._stepped: set[int] = set()
        self._optimizers: dict[int, tuple[weakref.ref[torch.optim.Optimizer], list[int]]] = {}
        self._previous: dict[tuple[Any, ...], tuple[Span, int]] = {}  # place -> span, check it was seen at
        self._reported: dict[tuple[Any, ...], Finding] = {}
        self._pending: dict[tuple[Any, ...], Finding] = {}  # iteration findings, decided at close
        self._grad_marks: dict[int, tuple[int, int] | None] = {}
        self._max_spans: dict[tuple[Any, ...], int] = {}
        self._seen: dict[tuple[Any, ...], int] = {}
        self._modules = Rotation(self.run.budget.wide())
        self._module_list: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
        self._structure = -1

    def teardown(self) -> None:
        for store in (self._optimizers, self._previous, self._pending, self._grad_marks, self._seen):
            store.clear()
        self._group_members.clear()
        self._stepped.clear()
        self._module_list = []

    # ---------------------------------------------------------------- events
    @on(ModelAdded)
    def _model(self, event: ModelAdded) -> Findings:
        for p in event.module.parameters():
            self._grad_marks.setdefault(id(p), _grad_mark(p))
        return None

    @on(OptimizerAdded)
    def _optimizer(self, event: OptimizerAdded) -> Findings:
        self._register(event.optimizer)
        return None

    @on(ForwardPre)
    def _before_forward(self, event: ForwardPre) -> Findings:
        if self._calls:
            return None  # optimizer steps mark the boundaries
        if id(event.module) not in self._group_members:
            self._group_members.add(id(event.module))
            return None
        self._group += 1
        self._group_members = {id(event.module)}
        if self._due(self._group):
            self._check(iterations=True)  # iteration findings wait for the end of the run
        return None

    @on(StepPost)
    def _after_step(self, event: StepPost) -> Findings:
        self._calls += 1
        if self._calls == 1:  # training: optimizer steps, not model calls, are the unit of history
            self.listen(ForwardPre, False)
            self._pending.clear()
            self._previous.clear()
            self._seen.clear()
        self._register(event.optimizer)[1][0] = self._calls
        self._stepped.add(id(event.optimizer))
        for key in [k for k, (ref, _) in self._optimizers.items() if ref() is None]:
            del self._optimizers[key]
        active = [k for k, (_, last) in self._optimizers.items() if self._calls - last[0] <= _STALE_CALLS]
        if not all(k in self._stepped for k in active):
            return None  # another optimizer has yet to step in this round (a GAN)
        self._round += 1
        self._stepped = set()
        return self._check(iterations=False) if self._due(self._round) else None

    @on(ForwardPost)
    def _after_forward(self, event: ForwardPost) -> Findings:
        outputs = [t for t in graph_tensors(event.output, depth=2) if t.grad_fn is not None][:16]
        if not outputs:
            return None
        iterations = self._calls == 0
        now = self._group if iterations else self._round
        inputs = list(itertools.chain(event.args, event.kwargs.values()))
        origin, carried = retention.inputs_history(inputs, self._token, _INPUT_BUDGET, now, iterations)
        origin_round, origin_group = min(self._round, origin[0]), min(self._group, origin[1])
        retention.stamp(outputs, (self._token, self._round, self._group, origin_round, origin_group))
        if not carried:
            return None
        places = retention.carried_places(user_frame(), type(event.module), carried)
        return self._deliver([self._finding_for(p, iterations) for p in places], iterations)

    @on(Close)
    def _close(self, event: Close) -> Findings:
        if self._calls or not self._pending or self._backward_ran():
            return None
        self.flagged_places += len(self._pending)
        self._reported.update(self._pending)
        out = list(self._pending.values())
        self._pending.clear()
        return out

    def report(self) -> dict[str, Any]:
        retained = [
            {
                "where": f.where,
                "location": f.location.to_dict() if f.location is not None else None,
                "max_steps_spanned": self._max_spans.get(key, f.data.get("steps_spanned", 0)),
                "unit": f.data.get("unit", "step"),
            }
            for key, f in self._reported.items()
        ]
        return {"checks": self.checks, "retained": retained}

    # ---------------------------------------------------------------- rounds
    def _due(self, n: int) -> bool:
        return n <= self.run.budget.warmup or n % _CHECK_EVERY == 0

    def _register(self, optimizer: torch.optim.Optimizer) -> tuple[weakref.ref[torch.optim.Optimizer], list[int]]:
        rec = self._optimizers.get(id(optimizer))
        if rec is None or rec[0]() is not optimizer:
            rec = self._optimizers[id(optimizer)] = (weakref.ref(optimizer), [self._calls])
        return rec

    def _backward_ran(self) -> bool:
        return any(
            id(p) in self._grad_marks and _grad_mark(p) != self._grad_marks[id(p)]
            for model in self.run.models()
            for p in model.parameters()
        )

    # ---------------------------------------------------------------- checks
    def _check(self, *, iterations: bool) -> list[Finding]:
        """Look at what the user holds at a boundary; report places whose history keeps growing."""
        self.checks += 1
        budget = [_CHECK_BUDGET]
        frames = user_frames(_MAX_FRAMES, installed=False)
        modules = self._modules.select([self._submodules()], self.checks)
        places = retention.held_places(frames, modules, lambda value: self._span(value, budget))
        out = []
        for place in places:
            span = place.span
            before = self._previous.get(place.key)
            self._previous[place.key] = (span, self.checks)
            if place.key in self._reported or place.key in self._pending:
                if span.epochs >= 2:  # seen again: count it
                    self._max_spans[place.key] = max(self._max_spans.get(place.key, 0), span.epochs)
                    out.append(self._finding_for(place, iterations, frames))
                continue
            # A state fed back into the model is reported at that call, under its own name; what
            # is computed from it (the output of the call) is not reported again. Only a value
            # that holds the stamps of several epochs, more at each look, is a new finding.
            gap = 1 if place.kind != "attribute" else self._modules.budget.coverage([len(self._module_list)])
            if before is not None and self.checks - before[1] <= gap and span.outgrows(before[0]):
                out.append(self._finding_for(place, iterations, frames))
        if len(self._previous) > 4096:
            self._previous = {k: v for k, v in self._previous.items() if self.checks - v[1] <= 64}
        return self._deliver(out, iterations)

    def _submodules(self) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
        if self._structure != self.run.structure:
            self._structure = self.run.structure
            self._module_list = [(m, n, s) for m in self.run.models() for n, s in m.named_modules()]
        return self._module_list

    def _span(self, value: Any, budget: list[int]) -> Span | None:
        """The epochs whose graphs ``value`` reaches, or ``None`` if it holds no stamped graph."""
        if budget[0] <= 0:
            return None
        roots = [t.grad_fn for t in graph_tensors(value, depth=2) if t.grad_fn is not None]
        found = retention.spans(roots, self._token, min(_NODE_BUDGET, budget[0]), budget) if roots else None
        if found is None:
            return None
        return found[1] if self._calls == 0 else found[0]

    # ---------------------------------------------------------------- findings
    def _deliver(self, findings: list[tuple[tuple[Any, ...], Finding]], iterations: bool) -> list[Finding]:
        """Record new findings; a place seen again at a later epoch counts once more."""
        out = []
        for key, f in findings:
            latest = f.data["last_step"]
            if self._seen.get(key, -1) >= latest:
                continue  # already counted for this epoch (at the model call, then at the step)
            self._seen[key] = latest
            self._max_spans[key] = max(self._max_spans.get(key, 0), f.data["steps_spanned"])
            if iterations:
                known = self._pending.get(key)
                self._pending[key] = f if known is None else dataclasses.replace(known, count=known.count + 1)
            elif key in self._reported:
                out.append(dataclasses.replace(self._reported[key], count=1))
            else:
                self._reported[key] = f
                self.flagged_places += 1
                out.append(f)
        return out

    def _finding_for(
        self, place: Place, iterations: bool, frames: list[Any] | None = None
    ) -> tuple[tuple[Any, ...], Finding]:
        message, hint, data = retention.describe(place, iterations)
        location = retention.locate(place, frames if frames is not None else user_frames(_MAX_FRAMES, installed=False))
        return place.key, self.finding(message, where=place.where, location=location, hint=hint, data=data)


def _grad_mark(p: torch.Tensor) -> tuple[int, int] | None:
    grad = p.grad
    return None if grad is None else (id(grad), grad._version)
