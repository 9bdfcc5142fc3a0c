"""GG402 frozen-param-updated."""

from __future__ import annotations

from typing import Any

import torch

from gradguard.detector import Detector, Findings, on
from gradguard.events import Close, StepPost, StepPre
from gradguard.findings import Finding, Revision, format_names
from gradguard.introspect.dtensor import version
from gradguard.introspect.frames import user_location
from gradguard.sampling import Rotation

#: Optimizer state entries that keep moving a parameter when its gradient is zero.
_MOMENTUM_STATE = ("momentum_buffer", "exp_avg", "ax")


def _mover(optimizer: torch.optim.Optimizer, group: dict[str, Any], param: torch.Tensor) -> str | None:
    """Why a step would move this frozen parameter, or ``None`` if nothing known would.

    Only metadata is read: hyper-parameters, which state entries exist, whether a
    gradient tensor is present. No tensor value is read.
    """
    if param.grad is None:
        return None  # the built-in optimizers skip parameters without a gradient
    causes = []
    decay = group.get("weight_decay", 0)
    if isinstance(decay, (int, float)) and decay != 0:
        causes.append(f"weight_decay={decay}")
    state = optimizer.state.get(param)
    if state:
        kept = [k for k in _MOMENTUM_STATE if state.get(k) is not None]
        if kept:
            causes.append(f"optimizer state made before freezing ({', '.join(kept)})")
    if not causes:
        return None
    return (
        "its .grad is a tensor rather than None (zero_grad(set_to_none=False) leaves zeros), and "
        + " and ".join(causes)
        + " move it anyway"
    )


class FrozenParamUpdated(Detector):
    """GG402 frozen-param-updated: an optimizer step changed a frozen parameter.

    **What it detects.** A parameter with `requires_grad=False` that `optimizer.step()`
    writes to. Freezing stops new gradients, but not the optimizer: when the gradient of
    a parameter frozen during training is a tensor of zeros rather than `None` (what
    `zero_grad(set_to_none=False)` leaves), the built-in optimizers still update it,
    and weight decay (`p -= lr * wd * p`) and momentum or Adam moments kept from before
    the freezing move it step after step. gradguard compares the version counters of
    frozen parameters before and after each step (all of them during the first steps,
    then a rotating few per param group): exact, and no value is read.

    **Why it matters.** The "frozen" backbone drifts: weights shrink under weight decay
    or keep going in the last direction of the momentum, destroying the pretrained
    features you meant to keep, while the loss curve looks normal.

    **How to fix it.** Clear the gradients of frozen parameters (`p.grad = None`) and use
    `optimizer.zero_grad(set_to_none=True)` (the default since PyTorch 2.0); better,
    keep frozen parameters out of the optimizer, or drop their state
    (`optimizer.state.pop(p, None)`) when you freeze them.

    **Example.**

    ```python
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ...                                   # some epochs later:
    model.backbone.requires_grad_(False)
    opt.zero_grad(set_to_none=False)      # grads become zeros, not None
    loss.backward(); opt.step()           # GG402: the backbone still moves
    # fix: opt.zero_grad() (set_to_none=True), or p.grad = None for frozen p
    ```

    **Limitations.** Fused optimizers (`fused=True`) write through a kernel that does not
    bump version counters; for them gradguard reports the step only when the update is
    certain from metadata alone (a gradient tensor present together with weight decay or
    momentum state). A write that leaves the values unchanged (plain SGD adding a zero
    gradient) also bumps the counter; it is reported only when weight decay or momentum
    state make a real change certain. Parameters found moving after the first finding of
    an optimizer are added to that finding.
    """

    code = "GG402"
    name = "frozen-param-updated"
    hint = "Set p.grad = None for frozen parameters (zero_grad(set_to_none=True)) or keep them out of the optimizer"
    consumes = (StepPre, StepPost, Close)
    every = 4
    state_fields = ("flagged_steps",)

    def setup(self) -> None:
        self.flagged_steps = 0
        self._before: dict[int, list[tuple[torch.Tensor, int, dict[str, Any]]]] = {}
        self._reported: set[int] = set()
        self._rotations: dict[int, Rotation] = {}
        self._causes: dict[str, str] = {}

    def teardown(self) -> None:
        self._before.clear()
        self._reported.clear()
        self._causes.clear()

    @on(StepPre)
    def _before_step(self, event: StepPre) -> Findings:
        optimizer = event.optimizer
        rotation = self._rotations.get(id(optimizer))
        if rotation is None:
            rotation = self._rotations[id(optimizer)] = Rotation(self.run.budget)
        groups = optimizer.param_groups
        tick = self.run.optimizer_steps(optimizer) + 1
        frozen = [
            (p, version(p), groups[gi])
            for gi, p in rotation.pairs([g["params"] for g in groups], tick)
            if not p.requires_grad and id(p) not in self._reported
        ]
        if frozen:
            self._before[id(optimizer)] = frozen  # held for the step only
        else:
            self._before.pop(id(optimizer), None)
        return None

    @on(StepPost)
    def _after_step(self, event: StepPost) -> Findings:
        optimizer = event.optimizer
        before = self._before.pop(id(optimizer), None)
        if not before:
            return None
        changed: list[tuple[str, str]] = []
        for param, before_version, group in before:
            cause = _mover(optimizer, group, param)
            if version(param) != before_version:
                if cause is None and param.grad is not None:
                    continue  # adding a zero gradient writes but changes nothing
                changed.append((self.run.param_name(param), cause or "the optimizer wrote to it"))
            elif group.get("fused") and cause is not None:
                changed.append((self.run.param_name(param), cause))  # fused kernels bump no version
            else:
                continue
            self._reported.add(id(param))
        if not changed:
            return None
        self.flagged_steps += 1
        return [self._finding(optimizer, changed)]

    @on(Close)
    def _close(self, event: Close) -> Findings:
        self._before.clear()
        return None

    def _finding(self, optimizer: torch.optim.Optimizer, changed: list[tuple[str, str]]) -> Finding | Revision:
        causes = dict(changed)
        self._causes.update(causes)

        def build(names: list[str]) -> Finding:
            why = sorted({self._causes[n] for n in names if n in self._causes})
            message = (
                f"{type(optimizer).__name__}.step() updated {len(names)} parameter(s) with requires_grad=False "
                f"({format_names(names)}): {why[0]}"
            )
            data = {"optimizer": type(optimizer).__name__, "parameters": names[:100], "num_parameters": len(names)}
            return self.finding(
                message, where=format_names(names), location=user_location(), data=data | {"causes": why}
            )

        return self.grow(id(optimizer), list(causes), build)
