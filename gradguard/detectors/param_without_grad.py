"""GG405 param-without-grad."""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from gradguard.detector import Detector, Findings, on
from gradguard.events import BackwardPost, BackwardPre, Close, ModelAdded, StepPre
from gradguard.findings import Finding, Revision, format_names
from gradguard.holdings import GradientSeen, left_behind, updates_nothing
from gradguard.introspect.dtensor import version
from gradguard.introspect.frames import user_location
from gradguard.sampling import Rotation


class _Record:
    """How long one parameter has gone without a gradient, without holding a tensor."""

    __slots__ = ("grad_ref", "grad_version", "last_tick", "missed", "name", "ref", "touched")

    def __init__(self, param: torch.Tensor, name: str, tick: int) -> None:
        self.ref = weakref.ref(param)
        self.name = name
        self.missed = 0  # consecutive steps of its optimizer without a gradient
        self.last_tick = tick - 1  # the last step it was looked at
        self.grad_ref: weakref.ref[torch.Tensor] | None = None  # its .grad when last looked at
        self.grad_version = -1
        self.touched = False  # backward accumulated into it since the last step

    def look(self, grad: torch.Tensor | None) -> None:
        self.grad_ref = weakref.ref(grad) if grad is not None else None
        self.grad_version = version(grad) if grad is not None else -1

    def changed(self, grad: torch.Tensor | None) -> bool:
        if grad is None:
            return False
        return self.grad_ref is None or self.grad_ref() is not grad or version(grad) != self.grad_version


class ParamWithoutGrad(Detector):
    """GG405 param-without-grad: a trainable parameter that never gets a gradient.

    **What it detects.** A parameter that an optimizer updates and that requires
    gradients, but that has received no gradient for `window` (20) consecutive steps
    of its optimizer. Its forward cuts it out of the graph: it is used through `.data`
    or `.detach()`, computed under `torch.no_grad()`, or not used at all. A parameter
    that gets a gradient on some steps (heads of several tasks trained in turn) is fine.
    With `zero_grad()` (`set_to_none=True`) a missing gradient is a `.grad` of
    `None` at `step()`; when `.grad` tensors are kept and zeroed in place instead,
    their version counters before and after each `backward()` tell whether backward
    reached the parameter. No value is read. Every parameter is watched during the first
    steps, then blocks of a few per param group, each for `window` steps in a row.

    **Why it matters.** The parameter never learns, though the optimizer lists it and
    nothing fails; with the detached path the model can still fit, more poorly.

    **How to fix it.** Use the parameter itself in forward (not `p.data` or
    `p.detach()`, and not under `torch.no_grad()`). If it is meant to stay fixed,
    register it as a buffer or freeze it (`requires_grad_(False)`) and keep it out of the
    optimizer.

    **Example.**

    ```python
    def forward(self, x):
        return x @ self.weight.detach().T + self.bias   # GG405: weight never learns
    # fix: return x @ self.weight.T + self.bias
    ```

    **One finding per mistake.** The tensors of a layer replaced after the optimizer was
    made get no gradient either, but they are GG403 param-not-in-optimizer's finding, which
    names the new layer; and an optimizer none of whose tensors ever gets a gradient is
    GG406 optimizer-updates-nothing's, which names the optimizer. Neither is reported here.

    **Report.** When a model becomes known, the counts of trainable and frozen parameters
    of each of its top-level modules go into the report, under `detectors["GG405"]`.
    """

    code = "GG405"
    name = "param-without-grad"
    hint = "Use the parameter itself in forward (not .data, .detach() or no_grad), or freeze it and drop it"
    consumes = (ModelAdded, BackwardPre, BackwardPost, StepPre, Close)
    state_fields = ("flagged", "summary")

    def __init__(self, window: int = 20) -> None:
        super().__init__()
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"Expected window to be a positive int but got {window!r}")
        self.window = window

    def setup(self) -> None:
        self.flagged: list[str] = []
        self.summary: dict[str, dict[str, dict[str, int]]] = {}
        self._records: dict[int, _Record] = {}
        self._reported: set[int] = set()
        self._watch: dict[int, list[_Record]] = {}  # by optimizer: looked at around each backward()
        self._rotations: dict[int, Rotation] = {}
        self._seen = GradientSeen()
        budget = self.run.budget
        # each sample stays for `window` steps in a row (no sweep interrupts it), so take more at once
        self._budget = (
            budget
            if budget.per_group is None
            else dataclasses.replace(budget, per_group=4 * budget.per_group, sweep_every=0)
        )

    def teardown(self) -> None:
        self._records.clear()
        self._reported.clear()
        self._watch.clear()

    # ---------------------------------------------------------------- events
    @on(ModelAdded)
    def _model(self, event: ModelAdded) -> Findings:
        module = event.module
        key = type(module).__name__
        if key in self.summary:
            key = f"{key}#{len(self.summary)}"
        self.summary[key] = _parameter_summary(module)
        return None

    @on(BackwardPre)
    def _before_backward(self, event: BackwardPre) -> Findings:
        for recs in self._watch.values():
            for rec in recs:
                param = rec.ref()
                if param is not None:
                    rec.look(param.grad)
        return None

    @on(BackwardPost)
    def _after_backward(self, event: BackwardPost) -> Findings:
        for recs in self._watch.values():
            for rec in recs:
                param = rec.ref()
                if param is not None and rec.changed(param.grad):
                    rec.touched = True
        return None

    @on(StepPre)
    def _before_step(self, event: StepPre) -> Findings:
        optimizer = event.optimizer
        self._seen.look(optimizer)  # nothing once one of its tensors had a gradient
        tick = self.run.optimizer_steps(optimizer) + 1
        rotation = self._rotations.get(id(optimizer))
        if rotation is None:
            rotation = self._rotations[id(optimizer)] = Rotation(self._budget, dwell=self.window)
        missing: list[tuple[_Record, torch.Tensor]] = []
        watched: list[_Record] = []
        reused = False
        records = self._records
        for p in rotation.select([g["params"] for g in optimizer.param_groups], tick):
            rec = records.get(id(p))
            if rec is None or rec.ref() is not p:
                rec = records[id(p)] = _Record(p, self.run.param_name(p), tick)
            watched.append(rec)
            continuous = rec.last_tick == tick - 1
            rec.last_tick = tick
            grad = p.grad
            got = grad is not None and (rec.touched or rec.changed(grad) or not continuous)
            rec.touched = False
            if grad is not None and rec.grad_ref is not None and rec.grad_ref() is grad:
                reused = True  # the same .grad tensor as last step: zeroed in place, not set to None
            rec.look(grad)
            if not p.requires_grad or got:
                rec.missed = 0  # frozen: the count starts again once unfrozen
                continue
            rec.missed = rec.missed + 1 if continuous else 1
            if rec.missed >= self.window and id(p) not in self._reported:
                self._reported.add(id(p))
                missing.append((rec, p))
        self._watch[id(optimizer)] = watched
        # backward() need only be watched for .grad tensors kept from step to step (zeroed in place)
        self.listen(BackwardPre, reused)
        self.listen(BackwardPost, reused)
        if len(records) > 4 * len(watched) + 4096:
            self._records = {k: r for k, r in records.items() if r.ref() is not None}
        if not missing:
            return None
        names = self._own(optimizer, missing)
        if not names:
            return None
        self.flagged.extend(names)
        return [self._finding(optimizer, names)]

    @on(Close)
    def _close(self, event: Close) -> Findings:
        self._records.clear()
        self._watch.clear()
        return None

    def report(self) -> dict[str, Any] | None:
        return {"parameters": self.summary} if self.summary else None

    def _own(self, optimizer: torch.optim.Optimizer, missing: list[tuple[_Record, torch.Tensor]]) -> list[str]:
        """The names of the missing parameters that are this rule's, not GG406's or GG403's (see holdings)."""
        if updates_nothing(self.run, self._seen, optimizer):
            return []  # no tensor of this optimizer ever gets a gradient: GG406 reports the optimizer
        gone = {id(p) for p in left_behind(self.run, [p for _, p in missing])}
        return [self.run.param_name(p) for _, p in missing if id(p) not in gone]  # a replaced layer's: GG403's

    def _outside_models(self, names: list[str]) -> int:
        """How many of the named parameters are in no watched model (replaced layers)."""
        if not self.run.models():
            return 0
        inside = {id(p) for _, p in self.run.named_parameters()}
        wanted = set(names)
        return sum(1 for key, rec in self._records.items() if rec.name in wanted and key not in inside)

    def _finding(self, optimizer: torch.optim.Optimizer, missing: list[str]) -> Finding | Revision:
        opt_name = type(optimizer).__name__

        def build(names: list[str]) -> Finding:
            message = (
                f"{len(names)} parameter(s) of {opt_name} require gradients but received none in the last "
                f"{self.window} steps: {format_names(names)}"
            )
            outside = self._outside_models(names)
            if outside:
                message += (
                    f"; {outside} of them are no longer part of the model (a layer replaced after the optimizer "
                    "was made?)"
                )
            data = {"optimizer": opt_name, "parameters": names[:100], "num_parameters": len(names)}
            data["window"] = self.window
            return self.finding(message, where=format_names(names), location=user_location(), data=data)

        return self.grow(id(optimizer), missing, build)


def _parameter_summary(module: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and frozen parameter counts (elements and tensors) per top-level module.

    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> _ = m[0].requires_grad_(False)
    >>> _parameter_summary(m)["0"]
    {'trainable': 0, 'frozen': 6, 'trainable_tensors': 0, 'frozen_tensors': 2}
    """
    out: dict[str, dict[str, int]] = {}
    seen: set[int] = set()

    def count(name: str, params: Any) -> None:
        row = {"trainable": 0, "frozen": 0, "trainable_tensors": 0, "frozen_tensors": 0}
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            kind = "trainable" if p.requires_grad else "frozen"
            if not isinstance(p, (UninitializedParameter, UninitializedBuffer)):  # lazy: sized at first forward
                row[kind] += p.numel()
            row[f"{kind}_tensors"] += 1
        if row["trainable_tensors"] or row["frozen_tensors"]:
            out[name] = row

    count("(own)", module.parameters(recurse=False))
    for name, child in module.named_children():
        count(name, child.parameters())
    return out
