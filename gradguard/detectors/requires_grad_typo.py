"""GG401 requires-grad-typo."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch

from gradguard.detector import Detector, Findings, on
from gradguard.events import ModelAdded, OptimizerAdded, StepEnd
from gradguard.findings import Finding, Location, Revision, format_names
from gradguard.introspect.frames import display_path, user_files, user_location
from gradguard.introspect.sites import attribute_assignments
from gradguard.sampling import Rotation

_TARGET = "requires_grad"
_TARGET_KEY = "requiresgrad"
_MAX_DISTANCE = 2


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def damerau_levenshtein(a: str, b: str) -> int:
    """Edit distance counting insertions, deletions, substitutions and adjacent swaps.

    >>> damerau_levenshtein("requries_grad", "requires_grad")
    1
    >>> damerau_levenshtein("require_grad", "requires_grad")
    1
    """
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def is_near_miss(name: str) -> bool:
    """Whether an attribute name is a misspelling of ``requires_grad``.

    Names are compared case- and underscore-blind, within two edits (insertions,
    deletions, substitutions or swaps of neighbours). ``requires_grad`` itself and the
    other attributes tensors really have are not near misses; ``requires_grad_`` set as
    an attribute (it is a method) is one.

    >>> all(is_near_miss(n) for n in ("requres_grad", "require_grad", "requiresgrad", "Requires_Grad",
    ...                                "requires_grads", "required_grad", "requieres_grad", "requries_grad"))
    True
    >>> is_near_miss("requires_grad"), is_near_miss("retains_grad"), is_near_miss("sharded")
    (False, False, False)
    """
    if name in _LEGITIMATE:
        return False
    key = _key(name)
    if abs(len(key) - len(_TARGET_KEY)) > _MAX_DISTANCE:
        return False
    return damerau_levenshtein(key, _TARGET_KEY) <= _MAX_DISTANCE


# Attributes that tensors really have (``requires_grad``, ...), except the method
# ``requires_grad_``: an instance attribute of that name is a misspelt assignment.
_LEGITIMATE = frozenset(
    n
    for n in dir(torch.nn.Parameter)
    if n != "requires_grad_" and damerau_levenshtein(_key(n), _TARGET_KEY) <= _MAX_DISTANCE
) | {_TARGET}


def _value_ignored(param: torch.Tensor, value: Any) -> bool:
    """Whether the misspelt assignment failed to do what it asked for."""
    if isinstance(value, bool):
        return value != param.requires_grad
    return True  # not a boolean: cannot tell what was meant, so report it


class RequiresGradTypo(Detector):
    """GG401 requires-grad-typo: a misspelt requires_grad froze nothing.

    **What it detects.** An attribute whose name is a near miss of ``requires_grad``
    (``requres_grad``, ``require_grad``, ``requires_grads``, ``requiresgrad``,
    ``Requires_Grad``, ...) set on a parameter. Python accepts any attribute name on a
    tensor, so ``p.requres_grad = False`` raises nothing: it stores a new attribute that
    nothing reads, and the parameter keeps training. gradguard looks at the parameters'
    own attributes when a model or optimizer becomes known, and then at every step (all of
    them during the first steps, then a rotating few), so a freeze done later in a
    fine-tuning schedule is seen too. A name counts as a near miss when, ignoring case
    and underscores, it is within
    two edits (insertions, deletions, substitutions, swaps of neighbours) of
    ``requires_grad``; the real attribute and the other attributes tensors have are never
    reported, nor is a misspelt assignment that asked for what is already the case
    (``p.requres_grad = True`` on a trainable parameter). The finding points at the line
    of the assignment when it is in a file of the running program, else at the step.

    **Why it matters.** The layers you meant to freeze are trained: fine-tuning destroys
    the pretrained features, uses more memory and time, and nothing fails.

    **How to fix it.** Spell it ``requires_grad``, or better call the method, which
    cannot be misspelt silently: ``module.requires_grad_(False)`` or
    ``p.requires_grad_(False)``.

    **Example.**

    .. code-block:: python

        for p in model.backbone.parameters():
            p.requres_grad = False        # GG401: the backbone is still trained
        # fix: model.backbone.requires_grad_(False)
    """

    code = "GG401"
    name = "requires-grad-typo"
    hint = "Spell it requires_grad, or call module.requires_grad_(False) / p.requires_grad_(False)"
    consumes = (ModelAdded, OptimizerAdded, StepEnd)
    every = 8
    state_fields = ("flagged",)

    def setup(self) -> None:
        self.flagged: list[str] = []  # "attribute parameter" pairs already reported
        self._sources: dict[str, list[tuple[str, int]]] = {}
        self._rotation = Rotation(self.run.budget.wide())

    def teardown(self) -> None:
        self._sources.clear()

    # ---------------------------------------------------------------- events
    @on(ModelAdded)
    def _model(self, event: ModelAdded) -> Findings:
        return self._check(event.module.named_parameters(remove_duplicate=True))

    @on(OptimizerAdded)
    def _optimizer(self, event: OptimizerAdded) -> Findings:
        params = [p for group in event.optimizer.param_groups for p in group["params"]]
        return self._check((self.run.param_name(p), p) for p in params)

    @on(StepEnd)
    def _step(self, event: StepEnd) -> Findings:
        run = self.run
        named = run.named_parameters()
        if event.step <= run.budget.warmup:  # the optimizers' parameters outside the models, too
            inside = {id(p) for _, p in named}
            extra = [
                (run.param_name(p), p)
                for opt in run.optimizers()
                for group in opt.param_groups
                for p in group["params"]
                if id(p) not in inside
            ]
            return self._check([*named, *extra])
        return self._check(self._rotation.select([named], event.step))

    # ---------------------------------------------------------------- checking
    def _check(self, named: Iterable[tuple[str, Any]]) -> list[Finding | Revision]:
        by_attr: dict[str, list[tuple[str, Any, bool]]] = {}
        done = set(self.flagged)
        for name, param in named:
            attrs = getattr(param, "__dict__", None)
            if not attrs:
                continue
            for attr, value in list(attrs.items()):
                if not is_near_miss(attr) or f"{attr} {name}" in done:
                    continue
                if _value_ignored(param, value):
                    by_attr.setdefault(attr, []).append((name, value, param.requires_grad))
        out: list[Finding | Revision] = []
        for attr, hits in by_attr.items():
            names = [n for n, _, _ in hits]
            self.flagged.extend(f"{attr} {n}" for n in names)
            out.append(
                self.grow(attr, names, functools.partial(self._finding, attr, value=hits[0][1], trainable=hits[0][2]))
            )
        return out

    def _finding(self, attr: str, names: list[str], *, value: Any, trainable: bool) -> Finding:
        lines = self._assignments(attr)
        location = Location(lines[0][0], lines[0][1]) if lines else user_location()
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
        cached = self._sources.get(attr)
        if cached is not None:
            return cached
        found = [(display_path(f), line) for f in user_files() for line in attribute_assignments(f, attr)]
        self._sources[attr] = found
        return found
