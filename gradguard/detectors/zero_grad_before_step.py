"""GG102 zero-grad-before-step."""

from __future__ import annotations

import weakref
from types import FrameType

import torch

from gradguard.detector import Detector, Findings, on
from gradguard.events import BackwardPost, GradReset, StepPre
from gradguard.findings import Location
from gradguard.gradients import param_lists
from gradguard.introspect.frames import display_path, frame_location, user_frame, user_location
from gradguard.introspect.naming import name_in_frame
from gradguard.introspect.sites import attribute_sites
from gradguard.sampling import Rotation

#: An optimizer, weakly held, and whether a module holds every one of its parameters.
_Cover = tuple["weakref.ref[torch.optim.Optimizer]", bool]
#: Steps in a row that must show it: a loop that drops one bad batch this way shows it once.
IN_A_ROW = 2


class _Watch:
    """What one optimizer's gradients went through since its last step, without holding a tensor."""

    __slots__ = (
        "backward_at",
        "filled",
        "ref",
        "reset",
        "reset_at",
        "reset_full",
        "rotation",
        "steps",
        "streaks",
        "swept",
    )

    def __init__(self, optimizer: torch.optim.Optimizer, rotation: Rotation) -> None:
        self.ref = weakref.ref(optimizer)
        self.rotation = rotation
        self.streaks = [0, 0]  # steps in a row reset by zero_grad(), and with every gradient None
        self.steps = -1  # the optimizer's step count when the window below began
        self.filled = -1  # the backward() count when one left it gradients since its last step
        self.backward_at: Location | None = None  # that backward()'s line, looked up for the full check
        self.reset: Location | None = None  # the last zero_grad() that reached its gradients since
        self.reset_at = -1  # the backward() count at that zero_grad()
        self.reset_full = False  # it reset every parameter of the optimizer
        self.swept = 0  # the last step at which every gradient was checked


class ZeroGradBeforeStep(Detector):
    """GG102 zero-grad-before-step: gradients reset between `backward()` and `step()`.

    **What it detects.** An optimizer step that runs right after the gradients of its
    parameters were reset: `loss.backward(); optimizer.zero_grad(); optimizer.step()`.
    gradguard sees every `zero_grad()` of an optimizer or of a module, and reports the
    step whose last `backward()` left gradients that a `zero_grad()` covering every
    parameter of that optimizer then reset, with no `backward()` in between, two steps in
    a row. It reports at the `zero_grad()` line. A step with *every* gradient `None`
    although a `backward()` filled them since the last step is reported too: at the last
    `zero_grad()` that reset some of them (a model reset part by part), else at the
    `p.grad = None` of the loop (a reset by hand), else at the `step()` line.

    **Why it matters.** The step gets none of the gradients `backward()` just computed:
    with `set_to_none=True` (the default) it skips every parameter, otherwise it applies
    zeros (and momentum or weight decay alone). The loss does not go down, and nothing
    fails or warns.

    **How to fix it.** Reset once per update, *before* `backward()` or *after*
    `step()`. Gradient accumulation (several `backward()`, then `step()`, then the
    reset), a GAN whose optimizers reset their own parameters before their own
    `backward()`, and LBFGS with a closure that resets and then calls `backward()`
    inside `step()` are correct and are not reported.

    **Example.**

    ```python
    for x, y in loader:
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.zero_grad()     # GG102: the step below gets no gradient
        optimizer.step()
        # fix: call optimizer.zero_grad() before loss.backward()
    ```

    **Cost.** `zero_grad()` of optimizers and modules is wrapped while a guard is
    attached. After the warm-up, one step in four is watched: after each `backward()`,
    whether one sampled parameter per optimizer has a gradient; at each `zero_grad()`, a
    few counters (a module is matched with the optimizers once per model structure). The
    check of *every* gradient at `step()` runs during the first 32 steps and then every
    256 steps. Nothing is read from a device. A reset written by hand in place
    (`p.grad.zero_()`) between `backward()` and `step()` is not seen.
    """

    code = "GG102"
    name = "zero-grad-before-step"
    hint = "Reset the gradients before backward() or after step(), never between backward() and step()"
    consumes = (BackwardPost, GradReset, StepPre)
    every, duty = 4, 1  # each duty step sees one whole backward() .. step() of every optimizer
    state_fields = ("flagged_steps",)

    def setup(self) -> None:
        self.flagged_steps = 0
        self._watches: dict[int, _Watch] = {}
        self._cover: dict[int, tuple[weakref.ref[torch.nn.Module], tuple[int, ...], list[_Cover]]] = {}

    def teardown(self) -> None:
        self._watches.clear()
        self._cover.clear()

    # ---------------------------------------------------------------- events
    @on(BackwardPost)
    def _after_backward(self, event: BackwardPost) -> Findings:
        run = self.run
        for optimizer in run.optimizers():
            watch = self._watch(optimizer)
            steps = run.optimizer_steps(optimizer)
            if watch.steps != steps:  # it stepped since: a new window
                watch.steps, watch.filled, watch.reset_at = steps, -1, -1
            if watch.filled >= 0:
                continue  # gradients already seen since its last step
            sample = watch.rotation.select(param_lists(optimizer), steps + 1)
            if any(p.grad is not None for p in sample):
                watch.filled = run.backwards
                watch.backward_at = user_location() if self._due(watch, steps + 1) else None
        return None

    @on(GradReset)
    def _reset(self, event: GradReset) -> Findings:
        run = self.run
        for optimizer, full in self._covered(event.owner):
            watch = self._known(optimizer)
            if watch is None or watch.filled < 0 or watch.steps != run.optimizer_steps(optimizer):
                continue  # no backward() left it gradients since its last step: a reset before backward()
            if watch.reset_at == run.backwards and watch.reset_full and not full:
                continue  # every parameter was reset since that backward() already
            watch.reset = frame_location(event.frame) if event.frame is not None else None
            watch.reset_at, watch.reset_full = run.backwards, full
        return None

    @on(StepPre)
    def _before_step(self, event: StepPre) -> Findings:
        optimizer, run = event.optimizer, self.run
        watch = self._known(optimizer)
        steps = run.optimizer_steps(optimizer)
        if watch is None or watch.steps != steps or watch.filled < 0:
            return None  # no backward() since its last step (a closure runs its own inside step())
        reset = watch.reset if watch.reset_at >= 0 else None  # the last zero_grad() since a backward() filled them
        if reset is not None and watch.reset_full and watch.reset_at == run.backwards:
            watch.streaks[0] += 1
            return self._report(optimizer, watch, 0, reset)
        watch.streaks[0] = 0
        if not self._due(watch, steps + 1):
            return None
        watch.swept = steps + 1
        if not _every_grad_none(optimizer):
            watch.streaks[1] = 0
            return None
        watch.streaks[1] += 1
        return self._report(optimizer, watch, 1, reset)

    # ---------------------------------------------------------------- reporting
    def _report(self, optimizer: torch.optim.Optimizer, watch: _Watch, kind: int, reset: Location | None) -> Findings:
        streak = watch.streaks[kind]
        if streak < IN_A_ROW:
            return None
        frame = user_frame()
        variable = name_in_frame(frame, optimizer, globals_=True, attributes=False)
        opt_name = type(optimizer).__name__ if variable is None else f"{variable} ({type(optimizer).__name__})"
        step_call = f"{variable or type(optimizer).__name__}.step()"
        how = "zero_grad()"
        if kind == 1 and reset is None:
            reset = _hand_written_reset(frame, watch.backward_at)
            how = "grad = None" if reset is not None else "unknown"
        if kind == 0:
            message = (
                f"the gradients of {opt_name} are reset here, after backward() and before {step_call}, "
                f"{streak} steps in a row: each step gets none of the gradients backward() computed, "
                "so the parameters do not learn from them"
            )
        else:
            place = "here" if reset is not None else "somewhere between backward() and this step()"
            message = (
                f"every gradient of {opt_name} is None when {step_call} runs, {streak} steps in a row, "
                f"although backward() computed them since the last step: they are reset {place}, "
                "so the parameters do not learn from them"
            )
        self.flagged_steps += 1
        location = reset if reset is not None else (user_location(frame) if frame is not None else None)
        return [
            self.finding(
                message,
                where=opt_name,
                location=location,
                data={"optimizer": opt_name, "reset": how, "steps_in_a_row": streak},
            )
        ]

    # ---------------------------------------------------------------- internals
    def _known(self, optimizer: torch.optim.Optimizer) -> _Watch | None:
        watch = self._watches.get(id(optimizer))
        return watch if watch is not None and watch.ref() is optimizer else None

    def _watch(self, optimizer: torch.optim.Optimizer) -> _Watch:
        watch = self._known(optimizer)
        if watch is not None:
            return watch
        if len(self._watches) > 64:
            self._watches = {k: w for k, w in self._watches.items() if w.ref() is not None}
        watch = self._watches[id(optimizer)] = _Watch(optimizer, Rotation(self.run.budget))
        return watch

    def _due(self, watch: _Watch, tick: int) -> bool:
        """Whether every gradient is checked at this step: the warm-up, then every ``sweep_every`` steps."""
        budget = self.run.budget
        if budget.full(tick):
            return True
        return bool(budget.sweep_every) and tick - watch.swept >= budget.sweep_every

    def _covered(self, owner: object) -> list[tuple[torch.optim.Optimizer, bool]]:
        """The watched optimizers whose gradients this ``zero_grad()`` resets, and whether all of them."""
        optimizers = self.run.optimizers()
        if isinstance(owner, torch.optim.Optimizer):
            return [(owner, True)] if any(o is owner for o in optimizers) else []
        if not isinstance(owner, torch.nn.Module) or not optimizers:
            return []
        key = (self.run.structure, *(id(o) for o in optimizers))
        key += tuple(len(g["params"]) for o in optimizers for g in o.param_groups)
        cached = self._cover.get(id(owner))
        if cached is None or cached[0]() is not owner or cached[1] != key:
            inside = {id(p) for p in owner.parameters()}
            cover: list[_Cover] = []
            for o in optimizers:
                params = [p for g in o.param_groups for p in g["params"]]
                held = sum(id(p) in inside for p in params)
                if held:
                    cover.append((weakref.ref(o), held == len(params)))
            if len(self._cover) > 256:
                self._cover = {k: v for k, v in self._cover.items() if v[0]() is not None}
            cached = self._cover[id(owner)] = (weakref.ref(owner), key, cover)
        out = []
        for ref, full in cached[2]:
            optimizer = ref()
            if optimizer is not None:
                out.append((optimizer, full))
        return out


def _every_grad_none(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every parameter of the optimizer that requires a gradient has none."""
    trainable = False
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                if p.grad is not None:
                    return False
                trainable = True
    return trainable


def _hand_written_reset(frame: FrameType | None, backward_at: Location | None) -> Location | None:
    """The last ``<x>.grad = None`` of the step's function before the ``step()`` line (after ``backward()``)."""
    if frame is None:
        return None
    code = frame.f_code
    path = display_path(code.co_filename)
    low = 0
    if backward_at is not None and backward_at.file == path and backward_at.function == code.co_name:
        low = backward_at.line
    lines = [line for line in attribute_sites(code, "grad").created if low < line < frame.f_lineno]
    return Location(path, lines[-1], code.co_name) if lines else None
