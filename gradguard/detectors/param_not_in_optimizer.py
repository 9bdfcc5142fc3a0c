"""GG403 param-not-in-optimizer."""

from __future__ import annotations

import weakref

import torch

from gradguard._frames import user_location
from gradguard.detector import Detector, Findings
from gradguard.findings import Finding, format_names

#: Steps a suspect must stay unowned and unchanged before it is reported. Gives every
#: optimizer of the run (found at its first step() under ``gradguard run``) time to show.
_CONFIRM_STEPS = 2
#: Every step is checked up to this one, then every ``_CHECK_EVERY`` steps.
_EVERY_STEP_UNTIL = 8
_CHECK_EVERY = 4


class _Suspect:
    __slots__ = ("name", "ref", "step", "version")

    def __init__(self, param: torch.Tensor, name: str, step: int) -> None:
        self.ref = weakref.ref(param)
        self.name = name
        self.step = step
        self.version = param._version


class ParamNotInOptimizer(Detector):
    """GG403 param-not-in-optimizer: a trainable parameter no optimizer updates.

    **What it detects.** A parameter of a watched model that requires gradients and
    receives them, but belongs to none of the optimizers in use, and that nothing else
    updates either. The classic case replaces a layer after the optimizer was made
    (``model.fc = nn.Linear(...)`` after ``SGD(model.parameters())``): the optimizer
    still holds the old layer's tensors, and the new layer never learns. Ownership is
    checked by identity (``is``), never by value, so two zero-initialised biases are never
    confused. A parameter is reported only once it has kept a gradient and an unchanged
    version counter (nobody wrote to it) for a few steps while at least one optimizer is
    known, so hand-written updates and optimizers that step later are not reported.

    **Why it matters.** Training runs, the loss may even go down through the other
    layers, but the new head keeps its random initialisation.

    **How to fix it.** Make the optimizer after the model is final, or add the new
    parameters: ``optimizer.add_param_group({"params": model.fc.parameters()})``. If
    they are not meant to train (a teacher model whose output was not detached), freeze
    them with ``requires_grad_(False)``, which also saves their backward.

    **Example.**

    .. code-block:: python

        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.fc = torch.nn.Linear(512, 10)   # GG403: the new fc is not in opt
        # fix: create the optimizer after replacing the layer

    **Limitations.** A parameter updated only through ``p.data`` (which bumps no version
    counter) while optimizers update the others looks un-updated and is reported.
    """

    code = "GG403"
    name = "param-not-in-optimizer"
    hint = (
        "Create the optimizer after the model is final, or optimizer.add_param_group({'params': [...]}); "
        "if they are not meant to train, freeze them with requires_grad_(False)"
    )
    events = frozenset({"step_pre", "close"})
    state_fields = ("flagged",)

    def setup(self) -> None:
        self.flagged: list[str] = []
        self._owned: set[int] = set()
        self._owned_key: tuple[int, ...] = ()
        self._suspects: dict[int, _Suspect] = {}
        self._reported: set[int] = set()
        self._checked_step = -1

    def teardown(self) -> None:
        self._owned.clear()
        self._suspects.clear()
        self._reported.clear()

    def _owned_ids(self, optimizers: list[torch.optim.Optimizer]) -> set[int]:
        key = tuple(x for opt in optimizers for g in opt.param_groups for x in (id(g["params"]), len(g["params"])))
        if key != self._owned_key:
            self._owned = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
            self._owned_key = key
        return self._owned

    def on_step_pre(self, optimizer: torch.optim.Optimizer) -> Findings:
        step = self.guard.step
        if step == self._checked_step or (step >= _EVERY_STEP_UNTIL and step % _CHECK_EVERY):
            return None  # once per step, and on a schedule after the first steps
        self._checked_step = step
        optimizers = self.guard.optimizers()
        if not optimizers:
            return None
        owned = self._owned_ids(optimizers)
        confirmed: list[str] = []
        for model in self.guard.models():
            for name, p in model.named_parameters():
                if p.grad is None or not p.requires_grad:
                    continue
                key = id(p)
                if key in owned or key in self._reported:
                    continue
                sus = self._suspects.get(key)
                if sus is None or sus.ref() is not p or p._version != sus.version:
                    self._suspects[key] = _Suspect(p, name, step)
                elif step - sus.step >= _CONFIRM_STEPS:
                    confirmed.append(name)
                    self._reported.add(key)
                    del self._suspects[key]
        if len(self._suspects) > 10_000:
            self._suspects = {k: s for k, s in self._suspects.items() if s.ref() is not None}
        if not confirmed:
            return None
        self.flagged.extend(confirmed)
        return [self._finding(confirmed, optimizers)]

    def on_close(self) -> Findings:
        self._suspects.clear()
        return None

    def _finding(self, names: list[str], optimizers: list[torch.optim.Optimizer]) -> Finding:
        opts = [type(o).__name__ for o in optimizers]
        message = (
            f"{len(names)} parameter(s) receive gradients but belong to no optimizer "
            f"({', '.join(opts)}) and nothing updates them: {format_names(names)}"
        )
        return self.finding(
            message,
            where=format_names(names),
            location=user_location(),
            data={"parameters": names[:100], "num_parameters": len(names), "optimizers": opts},
        )
