"""GG401 requires-grad-typo."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable
from types import CodeType
from typing import Any

import torch

from gradguard.detector import Detector, Findings, on
from gradguard.events import AttributeSet, Close, ModelAdded, OptimizerAdded, StepEnd
from gradguard.findings import Finding, Location, Revision, format_names
from gradguard.introspect.frames import code_location, display_path, program_files, user_location
from gradguard.introspect.spelling import damerau_levenshtein, is_near_miss, misspelt_assignments

__all__ = ["RequiresGradTypo", "damerau_levenshtein", "is_near_miss"]

_TARGET = "requires_grad"
#: Assignments seen since the last step: (tensor id, attribute) -> (tensor, value, (code, line) that set it)
_Pending = dict[tuple[int, str], tuple["weakref.ref[torch.Tensor]", Any, "tuple[CodeType, int] | None"]]


def _value_ignored(param: torch.Tensor, value: Any) -> bool:
    """Whether the misspelt assignment failed to do what it asked for."""
    if isinstance(value, bool):
        return value != param.requires_grad
    return True  # not a boolean: cannot tell what was meant, so report it


class RequiresGradTypo(Detector):
    """GG401 requires-grad-typo: a misspelt requires_grad froze nothing.

    **What it detects.** An attribute whose name is a near miss of `requires_grad`
    (`requres_grad`, `require_grad`, `requires_grads`, `requiresgrad`,
    `Requires_Grad`, ...) set on a parameter. Python accepts any attribute name on a
    tensor, so `p.requres_grad = False` raises nothing: it stores a new attribute that
    nothing reads, and the parameter keeps training. The assignment is caught whenever it
    runs, at step 0 or in the middle of a fine-tuning schedule, in the training loop or in
    a function it calls: gradguard reads the program's own files once for such names, and
    watches the stores of the names it finds there (nothing is watched, and nothing costs,
    in a program that misspells none). At the end of that step, the parameters the
    assignment left trainable against its wish are reported, at the line of the
    assignment, in one finding per line that grows as more parameters are named.
    Assignments that no file spells out (`setattr(p, name, False)` with a computed name)
    are found on the parameters themselves when a model or optimizer becomes known and
    during the first steps. A name counts as a near miss when, ignoring case and
    underscores, it is within two edits (insertions, deletions, substitutions, swaps of
    neighbours) of `requires_grad`; the real attribute and the other attributes tensors
    have are never reported, nor is a misspelt assignment that asked for what is already
    the case (`p.requres_grad = True` on a trainable parameter).

    **Why it matters.** The layers you meant to freeze are trained: fine-tuning destroys
    the pretrained features, uses more memory and time, and nothing fails.

    **How to fix it.** Spell it `requires_grad`, or better call the method, which
    cannot be misspelt silently: `module.requires_grad_(False)` or
    `p.requires_grad_(False)`.

    **Example.**

    ```python
    for step, batch in enumerate(loader):
        if step == 1000:                      # freeze the backbone from now on
            for p in model.backbone.parameters():
                p.requres_grad = False        # GG401: the backbone is still trained
        # fix: model.backbone.requires_grad_(False)
    ```

    **Cost.** After the first steps, which look at every parameter's own attributes,
    nothing per step in a program whose files assign no near miss: no name is watched and
    no check runs. Where a name is watched, each store of it costs a few microseconds;
    stores of any other attribute (`p.grad = None` in `zero_grad()`) cost nothing more.
    """

    code = "GG401"
    name = "requires-grad-typo"
    hint = "Spell it requires_grad, or call module.requires_grad_(False) / p.requires_grad_(False)"
    consumes = (ModelAdded, OptimizerAdded, AttributeSet, StepEnd, Close)
    state_fields = ("flagged",)

    def setup(self) -> None:
        self.flagged: list[str] = []  # "attribute parameter" pairs already reported
        self._found: set[str] = set()  # those reported in this run (a resumed run reports again)
        self._sites: dict[str, list[tuple[str, int]]] = {}  # attribute -> lines of the program that assign it
        self._pending: _Pending = {}
        self._ids: set[int] = set()
        self._ids_at = -1

    def teardown(self) -> None:
        self._sites.clear()
        self._pending.clear()
        self._ids = set()

    # ---------------------------------------------------------------- events
    @on(ModelAdded)
    def _model(self, event: ModelAdded) -> Findings:
        return self._check(event.module.named_parameters(remove_duplicate=True))

    @on(OptimizerAdded)
    def _optimizer(self, event: OptimizerAdded) -> Findings:
        params = [p for group in event.optimizer.param_groups for p in group["params"]]
        return self._check((self.run.param_name(p), p) for p in params)

    @on(AttributeSet)
    def _assigned(self, event: AttributeSet) -> Findings:
        site = (event.frame.f_code, event.frame.f_lineno) if event.frame is not None else None
        if not self._pending:
            self.listen(StepEnd)  # judged together when the step ends: a correct spelling may follow
        self._pending[(id(event.tensor), event.name)] = (weakref.ref(event.tensor), event.value, site)
        return None

    @on(StepEnd)
    def _step(self, event: StepEnd) -> Findings:
        out = self._judge(self._pending)
        self._pending = {}
        run = self.run
        if event.step <= run.budget.warmup or run.budget.per_group is None:
            out += self._check(self._everything())  # setattr with a computed name, say
        else:
            self.listen(StepEnd, False)  # until the next misspelt assignment
        return out

    @on(Close)
    def _close(self, event: Close) -> Findings:
        pending, self._pending = self._pending, {}
        return self._judge(pending)

    # ---------------------------------------------------------------- checking
    def _everything(self) -> list[tuple[str, Any]]:
        """The models' parameters and the optimizers' parameters outside them."""
        run = self.run
        named = run.named_parameters()
        inside = {id(p) for _, p in named}
        extra = [
            (run.param_name(p), p)
            for opt in run.optimizers()
            for group in opt.param_groups
            for p in group["params"]
            if id(p) not in inside
        ]
        return [*named, *extra]

    def _judge(self, pending: _Pending) -> list[Finding | Revision]:
        """The assignments among ``pending`` that left a watched parameter as it was."""
        if not pending:
            return []
        run = self.run
        if self._ids_at != run.structure:
            self._ids = {id(p) for _, p in run.named_parameters()}
            self._ids_at = run.structure
        done = self._found
        by_site: dict[tuple[str, Location | None], list[tuple[str, Any, bool]]] = {}
        locations: dict[tuple[CodeType, int], Location] = {}
        for (_, attr), (ref, value, site) in pending.items():
            param = ref()
            if param is None or not (id(param) in self._ids or run.owner(param) is not None):
                continue  # not a watched parameter (a model found later is checked then)
            name = run.param_name(param)
            if f"{attr} {name}" not in done and _value_ignored(param, value):
                location = None
                if site is not None:
                    location = locations.get(site) or locations.setdefault(site, code_location(*site))
                by_site.setdefault((attr, location), []).append((name, value, param.requires_grad))
        return self._report(by_site)

    def _check(self, named: Iterable[tuple[str, Any]]) -> list[Finding | Revision]:
        """The parameters that carry a misspelt attribute whose value they do not follow."""
        by_site: dict[tuple[str, Location | None], list[tuple[str, Any, bool]]] = {}
        done = self._found
        for name, param in named:
            attrs = getattr(param, "__dict__", None)
            if not attrs:
                continue
            for attr, value in list(attrs.items()):
                if not is_near_miss(attr) or f"{attr} {name}" in done:
                    continue
                if _value_ignored(param, value):
                    by_site.setdefault((attr, None), []).append((name, value, param.requires_grad))
        return self._report(by_site)

    def _report(
        self, by_site: dict[tuple[str, Location | None], list[tuple[str, Any, bool]]]
    ) -> list[Finding | Revision]:
        out: list[Finding | Revision] = []
        for (attr, location), hits in by_site.items():
            names = [n for n, _, _ in hits]
            pairs = [f"{attr} {n}" for n in names]
            self._found.update(pairs)
            self.flagged.extend(pair for pair in pairs if pair not in self.flagged)
            if location is None:
                lines = self._assignments(attr)
                location = Location(*lines[0]) if lines else user_location()
            key = (attr, location.file, location.line) if location is not None else (attr,)
            build = functools.partial(self._finding, attr, value=hits[0][1], trainable=hits[0][2], location=location)
            out.append(self.grow(key, names, build))
        return out

    def _finding(
        self, attr: str, names: list[str], *, value: Any, trainable: bool, location: Location | None
    ) -> Finding:
        lines = self._assignments(attr)
        state = "trainable" if trainable else "frozen"
        message = (
            f"`.{attr} = {value!r}` was set on {len(names)} parameter(s) ({format_names(names)}) but "
            f"`{attr}` is not `{_TARGET}`: it is a new attribute that nothing reads, so they stay {state}"
        )
        return self.finding(
            message,
            where=format_names(names),
            location=location,
            data={
                "attribute": attr,
                "value": repr(value),
                "parameters": names[:100],
                "num_parameters": len(names),
                "assignments": [f"{f}:{n}" for f, n in lines[:20]],
            },
        )

    def _assignments(self, attr: str) -> list[tuple[str, int]]:
        """Lines of the running program's own files that assign the misspelt attribute."""
        cached = self._sites.get(attr)
        if cached is None:
            cached = [
                (display_path(f), line) for f in program_files() for line in misspelt_assignments(f).get(attr, ())
            ]
            self._sites[attr] = cached
        return cached
