"""GG201 graph-retained."""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

from gradguard import retention
from gradguard.detector import Detector, Findings, on
from gradguard.events import (
    BackwardPre,
    Close,
    ForwardPost,
    ForwardPre,
    IterationEnd,
    OptimizerAdded,
    StepPost,
    StepPre,
)
from gradguard.findings import Finding
from gradguard.introspect.frames import user_frame, user_frames, user_modules
from gradguard.introspect.graph import graph_tensors
from gradguard.retained import RetainedPlaces, Rounds
from gradguard.retention import Place, Span
from gradguard.sampling import Rotation

_NODE_BUDGET = 512  # graph nodes walked from one held value
_CHECK_BUDGET = 8192  # graph nodes walked in one check, all values together
_INPUT_BUDGET = 128  # graph nodes walked from one input of a forward
_MAX_FRAMES = 8  # user frames looked at in one check
_CHECK_EVERY = 16  # check at every boundary during the warm-up, then every _CHECK_EVERY
_CONFIRM_BACKWARDS = 64  # backward() calls with no optimizer step that show updates are made by hand


class GraphRetained(Detector):
    """GG201 graph-retained: autograd history kept alive across steps.

    **What it detects.** A tensor that carries an autograd graph keeps every tensor that
    graph saved for backward, and every earlier graph it was computed from. When a variable
    the program holds (`total_loss`, a list `history`, an attribute
    `self.step_losses`) reaches the graphs of several iterations, and reaches more of them
    iteration after iteration, the history of the run stays in memory. gradguard stamps the
    graph of each iteration, in `grad_fn.metadata`, at the output of a watched model's
    forward and at the loss given to `backward()`, and at iteration boundaries walks, with
    bounded walks, only the graphs of what the user's frames, closures, containers, models'
    modules and the globals of the program's own files hold.
    It reports the variable and the line that fills it (the `append` inside a helper, not
    the call of the helper), and how many iterations of history it spans:

    - the running total `total_loss += loss`, with an optimizer or with updates written by
      hand (`p.data.add_(p.grad, alpha=-lr)`), where each `backward()` is an iteration;
    - a list of loss or output tensors kept for logging, also on a module that only calls
      its submodules (a `LightningModule` whose `training_step` calls `self.net(x)`
      and appends to `self.step_losses`);
    - a recurrent hidden state fed back into the model from batch to batch without
      `detach()`: with `backward(retain_graph=True)` the graph, and the cost of each
      backward, grow without bound (it is reported at the first forward that links the
      graph of one step to that of an earlier one);
    - outputs collected, or a hidden state carried, in an evaluation loop run with
      autograd on, alone or between training epochs: calls of a model with no
      `backward()` between them are iterations. Such a finding is made when the next
      `backward()` shows the graphs were not a rollout (REINFORCE keeps the
      log-probabilities of an episode for one backward), or when the run ends.

    An iteration is what the program does: optimizer steps when there are some (a GAN's
    optimizers make one step when each has stepped; an LBFGS closure and accumulation
    micro-batches belong to their `step()`), else `backward()` calls, else model calls.
    With no optimizer step, findings wait until 64 `backward()` calls or the end of the run
    show none comes. A graph that spans one iteration, however old, is not reported.

    **Why it matters.** Memory grows with every step until the process runs out of it, far
    from the line that caused it; with `retain_graph=True` every backward also walks the
    whole history, so steps get slower and slower (the PyTorch FAQ's most common leak).

    **How to fix it.** Keep numbers, not graph tensors: `total_loss += loss.item()`,
    `history.append(loss.item())` (or `loss.detach()` to stay on the device). Detach a
    carried hidden state at each batch: `hidden = hidden.detach()` (for an LSTM,
    `hidden = tuple(h.detach() for h in hidden)`). Evaluate under `torch.no_grad()` or
    `torch.inference_mode()`.

    **Example.**

    ```python
    total_loss = 0.0
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        total_loss += loss        # GG201: keeps the graph of every step alive
        # fix: total_loss += loss.item()
    ```

    **Cost.** A stamp per model call and per `backward()`; at each iteration boundary
    (every one during the warm-up, the first 32, then every 16th) a look at the user's frames
    and at the attributes of a rotating few of the models' modules, and walks of at most a
    few hundred graph nodes per held value. No tensor value is read, no GPU synchronised. A
    graph of no watched model's and never given to `backward()` is not seen.
    """

    code = "GG201"
    name = "graph-retained"
    hint = "Keep numbers, not graph tensors, across steps: use .item() or .detach()"
    consumes = (OptimizerAdded, ForwardPre, ForwardPost, BackwardPre, IterationEnd, StepPre, StepPost, Close)
    state_fields = ("flagged_places", "checks")

    def setup(self) -> None:
        self.flagged_places = 0
        self.checks = 0
        self._token = next(retention.TOKENS)
        self._round = 0  # training epochs: optimizer rounds (every active optimizer stepped), else backward() calls
        self._floor = 0  # rounds before the first optimizer step were its micro-batches: they count as one
        self._group = 0  # forward epochs: a watched model called again starts one
        self._group_members: set[int] = set()
        self._quiet = True  # no backward() since the last group began
        self._rounds = Rounds()  # optimizer rounds: every optimizer that steps stepped once
        self._backward_rounds = 0  # backward() calls counted as rounds (no optimizer step yet)
        self._stepping = False  # inside an optimizer's step() (an LBFGS closure)
        self._backwards = 0
        self._looks = {"round": 0, "group": 0}  # checks made of each clock
        self._places = RetainedPlaces()
        self._modules = Rotation(self.run.budget.wide())
        self._module_list: list[tuple[weakref.ref[torch.nn.Module], str, weakref.ref[torch.nn.Module]]] = []
        self._structure = -1

    def teardown(self) -> None:
        self._rounds.clear()
        self._places.clear()
        self._group_members.clear()
        self._module_list = []

    # ---------------------------------------------------------------- events
    @on(OptimizerAdded)
    def _optimizer(self, event: OptimizerAdded) -> Findings:
        self._rounds.register(event.optimizer)
        return None

    @on(ForwardPre)
    def _before_forward(self, event: ForwardPre) -> Findings:
        if id(event.module) not in self._group_members:
            self._group_members.add(id(event.module))
            return None
        quiet = self._quiet
        self._group += 1
        self._group_members = {id(event.module)}
        self._quiet = True
        if quiet and self._due(self._group):
            self._check("group")  # no backward between the calls: evaluation, or a rollout
        return None

    @on(BackwardPre)
    def _before_backward(self, event: BackwardPre) -> Findings:
        roots = [t.grad_fn for t in event.tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None][:16]
        self._quiet = False
        self._backwards += 1
        out: list[Finding] = []
        if self._places.pending["group"]:
            # graphs of earlier model calls reached by this backward were a rollout (REINFORCE,
            # a generator's output), not history kept by mistake
            rollout = retention.reaches_before(roots, self._token, self._group, _NODE_BUDGET)
            out = [] if rollout else self._release("group")
            self._places.pending["group"].clear()
        # the loss itself carries the stamp of its epoch, whether or not a watched model made it
        retention.stamp_new(roots, self._token, (self._token, self._round, self._group, self._round, self._group))
        return out

    @on(IterationEnd)
    def _iteration(self, event: IterationEnd) -> Findings:
        if event.by != "backward" or self._stepping:
            return None
        # no optimizer steps (yet, or for many backward() calls): each backward() is a training iteration
        self._round += 1
        self._backward_rounds += 1
        out = self._release("round") if self._backward_rounds == _CONFIRM_BACKWARDS else []
        if self._due(self._round):
            out += self._check("round")
        return out

    @on(StepPre)
    def _before_step(self, event: StepPre) -> Findings:
        self._stepping = True
        return None

    @on(StepPost)
    def _after_step(self, event: StepPost) -> Findings:
        self._stepping = False
        ended = self._rounds.stepped(event.optimizer)
        if self._rounds.calls == 1:
            # an optimizer steps: earlier backward() calls were micro-batches of this first step
            self._floor = self._round
            self._places.pending["round"].clear()
        if not ended:
            return None  # another optimizer has yet to step in this round (a GAN)
        self._round += 1
        return self._check("round") if self._due(self._round) else None

    @on(ForwardPost)
    def _after_forward(self, event: ForwardPost) -> Findings:
        outputs = [t for t in graph_tensors(event.output, depth=2) if t.grad_fn is not None][:16]
        if not outputs:
            return None
        inputs = list(itertools.chain(event.args, event.kwargs.values()))
        found = retention.inputs_history(inputs, self._token, _INPUT_BUDGET, self._floor)
        origin_round = min([self._round] + [rounds.lo for _, rounds, _ in found])
        origin_group = min([self._group] + [groups.lo for _, _, groups in found])
        retention.stamp(outputs, (self._token, self._round, self._group, origin_round, origin_group))
        # a state fed back from an earlier step; or, between model calls with no backward() (an
        # evaluation loop, a rollout), from an earlier call
        by_round = [(value, rounds) for value, rounds, _ in found if rounds.lo < self._round]
        by_group = [(value, groups) for value, rounds, groups in found if groups.lo < self._group]
        out = []
        for clock, carried, now in (("round", by_round, self._round), ("group", by_group, self._group)):
            if carried and (clock == "round" or not by_round):
                spans = [(value, Span(span.lo, now, span.first, carried=True)) for value, span in carried]
                places = retention.carried_places(user_frame(), type(event.module), spans)
                out += self._deliver([self._finding_for(p, clock) for p in places], clock)
        return out

    @on(Close)
    def _close(self, event: Close) -> Findings:
        out = self._release("group")
        if not self._rounds.calls:
            out += self._release("round")
        return out

    def report(self) -> dict[str, Any]:
        return {"checks": self.checks, "retained": self._places.report()}

    # ---------------------------------------------------------------- rounds
    def _due(self, n: int) -> bool:
        return n <= self.run.budget.warmup or n % _CHECK_EVERY == 0

    def _release(self, clock: str) -> list[Finding]:
        """Publish the findings that waited for the shape of the loop."""
        before = self._places.new_places
        out = self._places.release(clock)
        self.flagged_places += self._places.new_places - before
        return out

    # ---------------------------------------------------------------- checks
    def _check(self, clock: str) -> list[Finding]:
        """Look at what the user holds at a boundary; report places whose history keeps growing."""
        self.checks += 1
        self._looks[clock] += 1
        look = self._looks[clock]
        budget = [_CHECK_BUDGET]
        frames = user_frames(_MAX_FRAMES, installed=False)
        chosen = self._modules.select([self._submodules()], self.checks)
        modules = [(m, path, s) for m_ref, path, s_ref in chosen if (m := m_ref()) and (s := s_ref()) is not None]
        places = retention.held_places(
            frames, modules, lambda value: self._span(value, budget, clock), globals_=user_modules()
        )
        del modules
        gap = self._modules.budget.coverage([len(self._module_list)])
        grown = self._places.growing(places, clock, look, self._backwards, gap)
        out = [self._finding_for(place, clock, frames) for place in grown]
        return self._deliver(out, clock)

    def _submodules(self) -> list[tuple[weakref.ref[torch.nn.Module], str, weakref.ref[torch.nn.Module]]]:
        if self._structure != self.run.structure:
            self._structure = self.run.structure
            self._module_list = [
                (weakref.ref(m), n, weakref.ref(s)) for m in self.run.models() for n, s in m.named_modules()
            ]
        return self._module_list

    def _span(self, value: Any, budget: list[int], clock: str) -> Span | None:
        """The epochs whose graphs ``value`` reaches, or ``None`` if it holds no stamped graph."""
        if budget[0] <= 0:
            return None
        roots = [t.grad_fn for t in graph_tensors(value, depth=2) if t.grad_fn is not None]
        found = (
            retention.spans(roots, self._token, min(_NODE_BUDGET, budget[0]), budget, self._floor) if roots else None
        )
        if found is None:
            return None
        return found[1] if clock == "group" else found[0]

    # ---------------------------------------------------------------- findings
    def _deliver(self, findings: list[tuple[tuple[Any, ...], Finding]], clock: str) -> list[Finding]:
        """Record new findings (evaluation ones, and training ones before an optimizer step is known, wait)."""
        before = self._places.new_places
        # training findings are published once an optimizer steps, or many backward() calls showed none does
        confirmed = self._rounds.calls > 0 or self._backward_rounds >= _CONFIRM_BACKWARDS
        new = self._places.deliver(findings, clock, hold=clock == "group" or not confirmed)
        self.flagged_places += self._places.new_places - before
        return new

    def _finding_for(
        self, place: Place, clock: str, frames: list[Any] | None = None
    ) -> tuple[tuple[Any, ...], Finding]:
        unit = "step" if clock == "round" and self._rounds.calls else "iteration"
        offset = self._floor if clock == "round" else 0  # steps are counted from the first optimizer step
        message, hint, data = retention.describe(place, unit, evaluation=clock == "group", offset=offset)
        location = retention.locate(place, frames if frames is not None else user_frames(_MAX_FRAMES, installed=False))
        return place.key, self.finding(message, where=place.where, location=location, hint=hint, data=data)
