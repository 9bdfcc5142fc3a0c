"""GG101 missing-zero-grad."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from gradguard.detector import Detector, Findings, on
from gradguard.events import BackwardPost, BackwardPre, Close, StepPost, StepPre
from gradguard.findings import Finding, Location, Revision, format_names
from gradguard.gradients import HAND_WRITTEN_HINT, DataUpdates, GradRecord, hand_written, param_lists
from gradguard.introspect import device
from gradguard.introspect.dtensor import version
from gradguard.introspect.frames import user_frame, user_location
from gradguard.introspect.naming import name_in_frame
from gradguard.sampling import Rotation


class MissingZeroGrad(Detector):
    """GG101 missing-zero-grad: gradients applied again by a later update.

    **What it detects.** `backward()` adds to `.grad`; it never overwrites it. When the
    gradients are not reset between two parameter updates, the next update applies the
    new gradient *plus every gradient already applied before*. gradguard watches the
    version counters of gradients and parameters around each `backward()` and each
    optimizer step, and reports an update that uses a gradient which an earlier update
    already consumed and nothing reset since. It covers optimizer steps, each inner update
    of LBFGS (which calls the closure several times inside one `step()`), and
    hand-written updates with no optimizer: `p -= lr * p.grad` under `no_grad`, and the
    `p.data.add_(p.grad, alpha=-lr)` of older code (at the `backward()` line, once
    `backward()` has added to the same gradient after three such updates in a row).

    **Why it matters.** Training does not fail: the effective gradient is a running sum
    of every past gradient, so the update grows step after step, the loss oscillates or
    diverges, and nothing points at the missing line.

    **How to fix it.** Reset the gradients once per update, after `step()` or before
    `backward()`: `optimizer.zero_grad()` (or `model.zero_grad()`, or
    `p.grad = None`). With LBFGS, call `optimizer.zero_grad()` at the start of the
    closure. For gradient accumulation, reset after each *real* step only: that is
    correct and is not reported.

    **Example.**

    ```python
    for x, y in loader:
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()          # GG101: gradients of earlier steps applied again
        # fix: optimizer.zero_grad() here (or before backward)
    ```

    **How it knows, at no cost.** No hook sits on any parameter and no tensor value is
    read on the normal path: before and after each `backward()` the version counters of
    a few sampled parameters per param group are compared (every parameter during the
    first 32 steps and at scheduled sweeps; see `Guard(budget=...)`). Only when a stale
    gradient is suspected is it checked for non-zero values, to tell it from one cleared
    with `.grad.data.zero_()` (which bumps no counter); on a GPU this check never waits.
    A gradient changed in place between the last update and the next `backward()` by
    anything but `backward()` counts as reset. An update through `.data` moves no version
    counter: eight values of each of eight watched parameters are copied after `backward()`
    and compared on the device before the next, with the gradient's (a reset leaves zeros).
    """

    code = "GG101"
    name = "missing-zero-grad"
    hint = "Call optimizer.zero_grad() once per optimizer step (after step() or before backward())"
    consumes = (BackwardPre, BackwardPost, StepPre, StepPost, Close)
    every, duty = 8, 2  # a step that records what the optimizer used, and the next that checks it
    state_fields = ("flagged_updates",)

    def setup(self) -> None:
        self.flagged_updates = 0
        self._records: dict[int, GradRecord] = {}
        self._watch: dict[int, list[GradRecord]] = {}  # by optimizer (0: parameters no optimizer owns)
        self._pending: list[GradRecord] = []
        self._deferred: list[tuple[list[GradRecord], Location | None, str, bool]] = []
        self._by_optimizer: dict[int, Rotation] = {}
        self._orphans = Rotation(self.run.budget)
        self._orphan_structure = -1
        self._orphan_params: list[torch.Tensor] = []
        self._data = DataUpdates()  # hand-written updates through .data: no version counter moves

    def teardown(self) -> None:
        self._data.clear()
        self._records.clear()
        self._watch.clear()
        self._pending.clear()
        self._deferred.clear()
        self._orphan_params = []

    # ---------------------------------------------------------------- watching
    def _record(self, param: torch.Tensor) -> GradRecord | None:
        rec = self._records.get(id(param))
        if rec is not None and rec.param_ref() is param:
            return rec
        if not param.requires_grad or not param.is_leaf or torch.nn.parameter.is_lazy(param):
            return None  # a lazy parameter is watched once materialised
        rec = GradRecord(param, self.run.param_name(param))
        rec.seen(param, param.grad, consumed=False)
        self._records[id(param)] = rec
        if len(self._records) > 4 * len(self.run.named_parameters()) + 1024:
            self._records = {k: r for k, r in self._records.items() if r.param_ref() is not None}
        return rec

    def _sample(self, key: int, params: list[torch.Tensor], *, consumed: bool) -> None:
        """Watch these parameters from now on, as they are now."""
        watched = []
        for param in params:
            rec = self._record(param)
            if rec is not None:
                rec.seen(param, param.grad, consumed=consumed)
                rec.suspect = rec.tainted = False
                watched.append(rec)
        self._watch[key] = watched

    def _orphan_sample(self) -> list[torch.Tensor]:
        """The next few parameters of the models that no optimizer owns (hand-written updates)."""
        run = self.run
        if self._orphan_structure != run.structure:
            self._orphan_structure = run.structure
            self._orphan_params = [p for _, p in run.named_parameters() if run.owner(p) is None]
        return self._orphans.select([self._orphan_params], run.backwards)

    # ---------------------------------------------------------------- events
    @on(BackwardPre)
    def _before_backward(self, event: BackwardPre) -> Findings:
        for optimizer in self.run.optimizers():
            if id(optimizer) not in self._watch:  # not stepped yet: watch it as it is
                self._sample(id(optimizer), self._rotation(optimizer).select(param_lists(optimizer), 0), consumed=False)
        if not self.run.step and 0 not in self._watch:
            self._sample(0, self._orphan_sample(), consumed=False)
        if self._data.check(self._watch.get(0, ()), self.run.backwards):
            self._data.locate(user_location())
        for rec, param in self._watched():
            grad = param.grad
            unchanged = rec.unchanged(grad)
            if not unchanged:
                rec.tainted = False  # reset (or replaced) since: whatever it held is gone
            rec.suspect = unchanged and (rec.consumed or version(param) != rec.param_version)
            if rec.suspect and grad is not None and not rec.tainted:
                rec.pending = device.holds_values(grad)  # zeroed through .data leaves no version trace
        return [self._hand_written(rec, location, rec.streak) for rec, location in self._data.resolve(wait=False)]

    @on(BackwardPost)
    def _after_backward(self, event: BackwardPost) -> Findings:
        out: list[Finding | Revision] = []
        for rec, param in self._watched():
            grad = param.grad
            if rec.unchanged(grad):
                rec.suspect = False  # this backward did not reach it
                continue
            if rec.suspect and grad is not None and rec.grad_ref is not None and rec.grad_ref() is grad:
                # backward added to a gradient that an update had already applied
                if self.run.owner(param) is None:
                    out.extend(self._orphan(rec))
                elif not rec.tainted:
                    rec.tainted = True
                    self._pending.append(rec)
            elif rec.suspect and not rec.tainted:
                rec.pending = None
            rec.suspect = False
            rec.seen(param, grad, consumed=False)
        if 0 in self._watch and not self.run.step:
            self._sample(0, self._orphan_sample(), consumed=False)
            self._data.snap(self._watch[0], self.run.backwards)
        return out

    @on(StepPre)
    def _before_step(self, event: StepPre) -> Findings:
        if not self._pending and not self._deferred:
            return None
        return self._report(event.optimizer, during_step=False)

    @on(StepPost)
    def _after_step(self, event: StepPost) -> Findings:
        optimizer = event.optimizer
        out = self._report(optimizer, during_step=True) if self._pending or self._deferred else None
        ticks = self.run.optimizer_steps(optimizer)
        self._sample(id(optimizer), self._rotation(optimizer).select(param_lists(optimizer), ticks), consumed=True)
        self._watch.pop(0, None)
        self._orphan_params, self._orphan_structure = [], -1  # hand-written updates are watched before any step only
        return out

    def _watched(self) -> Iterator[tuple[GradRecord, torch.Tensor]]:
        for recs in self._watch.values():
            for rec in recs:
                param = rec.param_ref()
                if param is not None:
                    yield rec, param

    def _rotation(self, optimizer: torch.optim.Optimizer) -> Rotation:
        rotation = self._by_optimizer.get(id(optimizer))
        if rotation is None:
            rotation = self._by_optimizer[id(optimizer)] = Rotation(self.run.budget)
        return rotation

    @on(Close)
    def _close(self, event: Close) -> Findings:
        data = [self._hand_written(rec, location, rec.streak) for rec, location in self._data.resolve(wait=True)]
        return self._drain(final=True) + data

    # ---------------------------------------------------------------- reporting
    def _report(self, optimizer: torch.optim.Optimizer, *, during_step: bool) -> list[Finding]:
        out = self._drain(final=False)
        if not self._pending:
            return out
        mine: list[GradRecord] = []
        rest: list[GradRecord] = []
        for rec in self._pending:
            param = rec.param_ref()
            if param is None or not rec.tainted:
                continue
            (mine if self.run.owner(param) is optimizer else rest).append(rec)
        self._pending = rest
        for rec in mine:
            rec.tainted = False
        mine = [r for r in mine if r.pending is not None]
        if not mine:
            return out
        frame = user_frame()
        location = user_location(frame) if frame is not None else None
        variable = name_in_frame(frame, optimizer, globals_=True, attributes=False)
        opt_name = type(optimizer).__name__ if variable is None else f"{variable} ({type(optimizer).__name__})"
        self._deferred.append((mine, location, opt_name, during_step))
        return out + self._drain(final=False)

    def _drain(self, *, final: bool) -> list[Finding]:
        out: list[Finding] = []
        keep = []
        for recs, location, opt_name, during_step in self._deferred:
            values = [device.resolve(r.pending, wait=final) for r in recs]
            if any(v is None for v in values):
                keep.append((recs, location, opt_name, during_step))
                continue
            stale = [r for r, v in zip(recs, values, strict=True) if v]
            for r in recs:
                r.pending = None
            if stale:
                out.append(self._finding(stale, location, opt_name, during_step))
        self._deferred = keep
        return out

    def _finding(self, recs: list[GradRecord], location: Location | None, opt_name: str, during_step: bool) -> Finding:
        self.flagged_updates += 1
        names = [r.name for r in recs]
        step_call = opt_name.split(" ")[0] + ".step()"
        if during_step:
            message = (
                f"{step_call} updated the parameters and then accumulated new gradients onto "
                f"the ones that update had used, inside the same step() call, for {len(names)} "
                f"parameter(s): {format_names(names)}"
            )
            hint = "Call optimizer.zero_grad() at the start of the closure passed to step()"
        else:
            message = (
                f"{step_call} applies gradients that an earlier update already applied: "
                f"backward() added to gradients that were not reset since that update, for "
                f"{len(names)} parameter(s): {format_names(names)}"
            )
            hint = self.hint
        return self.finding(
            message,
            where=opt_name,
            location=location,
            hint=hint,
            data={"optimizer": opt_name, "parameters": names[:100], "num_parameters": len(names)},
        )

    def _orphan(self, rec: GradRecord) -> list[Finding | Revision]:
        value = device.resolve(rec.pending, wait=False)
        rec.pending = None
        if not value:
            return []  # zeroed through .data, or cannot be told without waiting: stay silent
        return [self._hand_written(rec, user_location())]

    def _hand_written(self, rec: GradRecord, location: Location | None, streak: int | None = None) -> Any:
        """One finding per line for every parameter of a hand-written loop, counted once per backward()."""
        self.flagged_updates += 1
        key = ("hand-written", streak is not None, None if location is None else (location.file, location.line))
        known = self._grown.get(key)
        if known is not None and known[1][0] == rec.name:
            return dataclasses.replace(known[0], count=1)  # seen again: one more time, not one more finding

        def build(names: list[str]) -> Finding:
            message, data = hand_written(names, streak)
            return self.finding(
                message, where=format_names(names), location=location, hint=HAND_WRITTEN_HINT, data=data
            )

        return self.grow(key, [rec.name], build)
