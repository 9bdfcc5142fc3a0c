"""GG403 param-not-in-optimizer."""

from __future__ import annotations

import weakref

import torch

from gradguard.detector import Detector, Findings, on
from gradguard.events import Close, StepPost, StepPre
from gradguard.findings import Finding, Revision, format_names
from gradguard.holdings import CONFIRM, GradientSeen, held, left_behind, updates_nothing
from gradguard.introspect.dtensor import version
from gradguard.introspect.frames import user_location
from gradguard.sampling import Rotation

#: Steps a suspect must stay unowned and unchanged before it is reported. Gives every
#: optimizer of the run (found at its first step() under ``gradguard run``) time to show.
_CONFIRM_STEPS = 2
#: Steps of an optimizer within which it is known whether it updates nothing (GG406's, which names these parameters).
_DECIDE_WITHIN = 4 * CONFIRM + 4


class _Suspect:
    __slots__ = ("name", "ref", "step", "version")

    def __init__(self, param: torch.Tensor, name: str, step: int) -> None:
        self.ref = weakref.ref(param)
        self.name = name
        self.step = step
        self.version = version(param)


class ParamNotInOptimizer(Detector):
    """GG403 param-not-in-optimizer: a trainable parameter no optimizer updates.

    **What it detects.** A parameter of a watched model that requires gradients and
    receives them, but belongs to none of the optimizers in use, and that nothing else
    updates either. The classic case replaces a layer after the optimizer was made
    (`model.fc = nn.Linear(...)` after `SGD(model.parameters())`): the optimizer
    still holds the old layer's tensors, and the new layer never learns. Ownership is
    checked by identity (`is`), never by value, so two zero-initialised biases are never
    confused. A parameter is reported only once it has kept a gradient and an unchanged
    version counter (nobody wrote to it) for a few steps while at least one optimizer is
    known, so hand-written updates and optimizers that step later are not reported. Every
    parameter is checked at every step during the first steps, then a rotating few.

    **Why it matters.** Training runs, the loss may even go down through the other
    layers, but the new head keeps its random initialisation.

    **How to fix it.** Make the optimizer after the model is final, or add the new
    parameters: `optimizer.add_param_group({"params": model.fc.parameters()})`. If
    they are not meant to train (a teacher model whose output was not detached), freeze
    them with `requires_grad_(False)`, which also saves their backward.

    **Example.**

    ```python
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.fc = torch.nn.Linear(512, 10)   # GG403: the new fc is not in opt
    # fix: create the optimizer after replacing the layer
    ```

    **One finding per mistake.** The tensors of the replaced layer that the optimizer still
    holds get no gradient any more: this finding names them, by their old module paths
    when the layer was replaced under the guard, and neither GG405 param-without-grad nor
    GG406 optimizer-updates-nothing reports them. While an optimizer of the run updates
    nothing (none of its tensors ever gets a gradient: it was made from a frozen backbone
    instead of the head), the head's parameters are not reported here: GG406
    optimizer-updates-nothing reports that optimizer and names them.

    **Limitations.** A parameter updated only through `p.data` (which bumps no version
    counter) while optimizers update the others looks un-updated and is reported.
    """

    code = "GG403"
    name = "param-not-in-optimizer"
    hint = (
        "Create the optimizer after the model is final, or optimizer.add_param_group({'params': [...]}); "
        "if they are not meant to train, freeze them with requires_grad_(False)"
    )
    consumes = (StepPre, StepPost, Close)
    every = 4
    state_fields = ("flagged",)

    def setup(self) -> None:
        self.flagged: list[str] = []
        self._suspects: dict[int, _Suspect] = {}
        self._reported: set[int] = set()
        self._checked_step = -1
        self._rotation = Rotation(self.run.budget.wide())
        self._seen = GradientSeen()
        self._left: list[str] | None = None  # old names of the replaced tensors the optimizers still hold

    def teardown(self) -> None:
        self._suspects.clear()
        self._reported.clear()

    @on(StepPre)
    def _before_step(self, event: StepPre) -> Findings:
        run = self.run
        step = run.step
        if step == self._checked_step:
            return None  # once per step
        self._checked_step = step
        optimizers = run.optimizers()
        if not optimizers:
            return None
        confirmed: list[tuple[int, str]] = []
        for name, p in self._rotation.select([run.named_parameters()], step + 1):
            if p.grad is None or not p.requires_grad:
                continue
            key = id(p)
            if key in self._reported or run.owner(p) is not None:
                continue
            sus = self._suspects.get(key)
            if sus is None or sus.ref() is not p or version(p) != sus.version:
                self._suspects[key] = _Suspect(p, name, step)
            elif step - sus.step >= _CONFIRM_STEPS:
                confirmed.append((key, name))
        if len(self._suspects) > 10_000:
            self._suspects = {k: s for k, s in self._suspects.items() if s.ref() is not None}
        if not confirmed:
            return None
        idle = self._idle(optimizers)
        if idle is None:
            return None  # an optimizer may update nothing: known within a few of its steps
        for key, _ in confirmed:
            self._reported.add(key)
            del self._suspects[key]
        if idle:
            return None  # an optimizer updates nothing: GG406's finding names these parameters
        names = [name for _, name in confirmed]
        self.flagged.extend(names)
        return [self._finding(names, optimizers)]

    @on(StepPost)
    def _after_step(self, event: StepPost) -> Findings:
        self._seen.look(event.optimizer)  # nothing once one of its tensors had a gradient
        return None

    def _idle(self, optimizers: list[torch.optim.Optimizer]) -> bool | None:
        """Whether an optimizer of the run updates nothing (see holdings); ``None`` while not yet known."""
        waiting = False
        for opt in optimizers:
            steps = self.run.optimizer_steps(opt)
            if steps == 0:
                continue  # not stepped yet: says nothing
            if updates_nothing(self.run, self._seen, opt):
                return True
            if self._seen.undecided(opt) and steps <= _DECIDE_WITHIN:
                waiting = True
        return None if waiting else False

    @on(Close)
    def _close(self, event: Close) -> Findings:
        self._suspects.clear()
        return None

    def _finding(self, names: list[str], optimizers: list[torch.optim.Optimizer]) -> Finding | Revision:
        opts = [type(o).__name__ for o in optimizers]
        if self._left is None:
            run = self.run
            self._left = [run.param_name(p) for p in left_behind(run, [p for o in optimizers for p in held(o)])]
        left = self._left

        def build(names: list[str]) -> Finding:
            message = (
                f"{len(names)} parameter(s) receive gradients but belong to no optimizer "
                f"({', '.join(opts)}) and nothing updates them: {format_names(names)}"
            )
            if left:
                message += (
                    f"; the optimizers still hold {len(left)} tensor(s) no longer in the model, of the layer(s) "
                    f"replaced: {format_names(left)}"
                )
            data = {"parameters": names[:100], "num_parameters": len(names), "optimizers": opts}
            data["replaced"] = left[:100]
            return self.finding(message, where=format_names(names), location=user_location(), data=data)

        return self.grow("unowned", names, build)
