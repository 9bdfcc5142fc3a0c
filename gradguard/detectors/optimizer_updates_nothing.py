"""GG406 optimizer-updates-nothing."""

from __future__ import annotations

import weakref
from types import CodeType, FrameType

import torch

from gradguard.detector import Detector, Findings, on
from gradguard.events import BackwardPost, OptimizerAdded, StepPost
from gradguard.findings import Finding, Location, format_names
from gradguard.holdings import CONFIRM, GradientSeen, held, left_behind, unowned
from gradguard.introspect.frames import code_location, frame_variables, user_frames, user_location
from gradguard.introspect.naming import name_in_frame
from gradguard.introspect.sites import call_sites, class_attribute_location, class_codes, variable_sites

_SHOWN = 100  # parameter names kept in a finding's data


class OptimizerUpdatesNothing(Detector):
    """GG406 optimizer-updates-nothing: an optimizer none of whose tensors ever gets a gradient.

    **What it detects.** An optimizer all of whose parameters are frozen
    (`requires_grad=False`) or never receive a gradient, step after step: every
    `step()` skips every tensor, so nothing is updated. The usual cause is a fine-tuning
    script that freezes the backbone and then builds the optimizer from the backbone (the
    frozen part) instead of the head, or unfreezes the head after making the optimizer from
    parameters that were all frozen. gradguard looks, right after each of the optimizer's
    first steps, for a `.grad` on any tensor of its param groups (after `step()`, so a
    gradient made by a closure passed to `step()` counts), and reports it once, after
    3 steps without a single gradient, naming the optimizer's variable, what its groups
    hold, and the trainable parameters that no optimizer holds. The finding points at the
    line that made the optimizer (`opt = torch.optim.SGD(...)`, or the call in
    Lightning's `configure_optimizers`), else at the `step()` call.

    **Why it matters.** No error, no warning: the loss goes on being computed, the
    scheduler steps, and the model never learns. With a frozen backbone the loss is flat
    from the first step; behind a metric logged once an epoch it can take hours to notice.

    **How to fix it.** Build the optimizer from the parameters you train, after freezing
    and unfreezing: `SGD(model.head.parameters())`, or
    `SGD(p for p in model.parameters() if p.requires_grad)`. If you unfreeze more layers
    later, add them with `optimizer.add_param_group(...)`.

    **Example.**

    ```python
    model.backbone.requires_grad_(False)
    opt = torch.optim.SGD(model.backbone.parameters(), lr=0.1)   # GG406: all frozen
    # fix: opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    ```

    **One finding per mistake.** The same mistake leaves the head in no optimizer: GG403
    param-not-in-optimizer stays quiet about it (this finding names the head), and GG405
    param-without-grad does not report this optimizer's parameters one by one. An
    optimizer that holds the tensors of a layer replaced after it was made is GG403's,
    not this rule's.

    **Cost.** Nothing after each optimizer's first steps. At each of them, the tensors of
    the optimizer are looked at until one with a `.grad` is found: one tensor when the
    first holds a gradient, all of them only for an optimizer that updates nothing, at 3
    steps at most. Once every optimizer of the run is decided (seen with a gradient, or
    reported), the rule stops listening to steps until another optimizer comes.

    **Limitations.** An optimizer stepped on purpose while all its parameters are frozen
    (a backbone unfrozen after the first epochs, with an optimizer of its own) is reported:
    step it only once it has something to train.
    """

    code = "GG406"
    name = "optimizer-updates-nothing"
    hint = (
        "Build the optimizer from the parameters you train, after freezing: "
        "SGD(p for p in model.parameters() if p.requires_grad), or add them with add_param_group()"
    )
    consumes = (OptimizerAdded, BackwardPost, StepPost)
    state_fields = ("flagged",)

    def setup(self) -> None:
        self.flagged: list[str] = []
        self._seen = GradientSeen()
        self._done: dict[int, weakref.ref[torch.optim.Optimizer]] = {}  # decided: busy, reported or GG403's

    def teardown(self) -> None:
        self._done.clear()
        self._seen = GradientSeen()

    @on(OptimizerAdded)
    def _optimizer(self, event: OptimizerAdded) -> Findings:
        if not self._decided(event.optimizer):
            self.listen(StepPost, True)
            self.listen(BackwardPost, True)
        return None

    @on(BackwardPost)
    def _after_backward(self, event: BackwardPost) -> Findings:
        # gradients that a zero_grad() between backward() and step() removes (GG102's mistake)
        # did reach the optimizer's tensors: it updates nothing for another reason
        self._seen.after_backward()
        return None

    @on(StepPost)
    def _after_step(self, event: StepPost) -> Findings:
        optimizer = event.optimizer
        if self._decided(optimizer):
            return None
        seen = self._seen
        seen.look(optimizer)
        if seen.undecided(optimizer):
            return None
        self._decide(optimizer)
        if seen.busy(optimizer):
            return None
        params = held(optimizer)
        if left_behind(self.run, params):
            return None  # a layer replaced after the optimizer was made: GG403's finding
        return [self._finding(optimizer, params)]

    def _decided(self, optimizer: torch.optim.Optimizer) -> bool:
        ref = self._done.get(id(optimizer))
        return ref is not None and ref() is optimizer

    def _decide(self, optimizer: torch.optim.Optimizer) -> None:
        self._done[id(optimizer)] = weakref.ref(optimizer)
        live = {id(o) for o in self.run.optimizers()}
        self._done = {k: r for k, r in self._done.items() if k in live and r() is not None}
        if all(self._decided(o) for o in self.run.optimizers()):
            self.listen(StepPost, False)  # nothing left to watch until another optimizer comes
            self.listen(BackwardPost, False)

    def _finding(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> Finding:
        run = self.run
        frames = user_frames(8)
        variable, location = _made_at(optimizer, frames, run.models())
        kind = type(optimizer).__name__
        label = f"{variable} ({kind})" if variable else kind
        groups = len(optimizer.param_groups)
        trainable = sum(1 for p in params if p.requires_grad)
        names = [run.param_name(p) for p in params[:_SHOWN]]
        holds = f"its {groups} param group{'s hold' if groups != 1 else ' holds'} {len(params)} tensor(s)"
        if trainable:
            what = f"{trainable} of them require grad but none received a gradient in {CONFIRM} steps"
        else:
            what = "none of them requires grad"
        message = f"{label} updates nothing: {holds} and {what} ({format_names(names)}), so every step() is a no-op"
        missing = unowned(run)
        if missing:
            message += f"; the trainable {format_names(missing)} are in no optimizer"
        self.flagged.append(label)
        return self.finding(
            message,
            where=variable or kind,
            location=location or user_location(),
            data={
                "optimizer": label,
                "param_groups": groups,
                "tensors": len(params),
                "requires_grad": trainable,
                "parameters": names,
                "not_in_any_optimizer": missing[:_SHOWN],
            },
        )


def _made_at(
    optimizer: torch.optim.Optimizer, frames: list[FrameType], models: list[torch.nn.Module]
) -> tuple[str | None, Location | None]:
    """The variable that holds ``optimizer`` and the user's line that made it.

    The line is, in order: an assignment of a variable of the user's frames that holds it
    from a call of its class (``opt = torch.optim.SGD(...)``); the line that sets the
    ``self.<attribute>`` that holds it; a call of its class in a method of the model's
    classes (Lightning's ``configure_optimizers``); an assignment of the innermost variable.
    """
    kind = type(optimizer).__name__
    named = [(f, v) for f, v in ((f, name_in_frame(f, optimizer, globals_=True)) for f in frames) if v]
    for frame, variable in named:
        code = frame.f_code
        if not variable.startswith("self."):
            calls = set(call_sites(code, kind))
            lines = [n for n in variable_sites(code, variable).plain if n in calls]
            if lines:
                return variable, _before(code, lines, frame.f_lineno)
    innermost = named[0][1] if named else None
    for frame, variable in named:
        if variable.startswith("self."):
            owner = dict(frame_variables(frame)).get("self")
            found = class_attribute_location(type(owner), variable[5:]) if owner is not None else None
            if found is not None:
                return variable, found
    for model in models:
        for code in class_codes(type(model)):
            lines = call_sites(code, kind)
            if lines:
                return innermost, code_location(code, lines[0])
    if named:
        frame, variable = named[0]
        lines = variable_sites(frame.f_code, variable).plain
        if lines:
            return variable, _before(frame.f_code, lines, frame.f_lineno)
    return innermost, None


def _before(code: CodeType, lines: list[int], now: int) -> Location:
    """The last of ``lines`` before the line running now (else the last): where the value came from."""
    earlier = [n for n in lines if n <= now]
    return code_location(code, (earlier or lines)[-1])
