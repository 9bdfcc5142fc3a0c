"""The base class every detector derives from.

A detector declares its metadata and the events it listens to, keeps its state in plain
attributes named in ``state_fields``, and *returns* findings from its event methods. It
never prints, warns or raises: the guard applies the policy, de-duplicates findings and
turns any exception inside a detector into one ``GG000 internal-error`` finding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from gradguard.findings import Finding, Location, Severity
from gradguard.rules import RULES

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from gradguard.guard import Guard

Findings = Iterable[Finding] | None

#: The events a detector may listen to, and the method each one calls.
EVENTS: dict[str, str] = {
    "model": "on_model",  # a root module became known: (module)
    "optimizer": "on_optimizer",  # an optimizer became known: (optimizer)
    "forward": "on_forward",  # a root module's forward is about to run: (module, args, kwargs)
    "step_pre": "on_step_pre",  # optimizer.step() is about to run: (optimizer)
    "step_post": "on_step_post",  # optimizer.step() returned: (optimizer)
    "step": "on_step",  # a training step ended (the step counter went up): ()
    "close": "on_close",  # the guard is detaching: ()
}


class Detector:
    """Base class of detectors. Subclasses set the metadata and override event methods.

    The subclass's docstring is its rule page, printed by ``gradguard explain CODE``: what
    it detects, why it matters, how to fix it, and an example.
    """

    code: ClassVar[str] = ""
    name: ClassVar[str] = ""
    severity: ClassVar[Severity] = Severity.WARNING
    hint: ClassVar[str] = ""
    events: ClassVar[frozenset[str]] = frozenset()
    state_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.code:
            return  # an abstract intermediate class
        if RULES.get(cls.code) != cls.name:
            raise TypeError(f"{cls.__name__}: code {cls.code!r} and name {cls.name!r} are not in RULES")
        unknown = set(cls.events) - set(EVENTS)
        if unknown:
            raise TypeError(f"{cls.__name__}: unknown events {sorted(unknown)}")

    def __init__(self) -> None:
        self._guard: Guard | None = None
        self._handles: list[RemovableHandle] = []

    # ----------------------------------------------------------------- lifecycle
    @property
    def guard(self) -> Guard:
        if self._guard is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Guard")
        return self._guard

    @property
    def attached(self) -> bool:
        return self._guard is not None

    def attach(self, guard: Guard) -> None:
        """Called by the guard. Subclasses set up in :meth:`setup`."""
        self._guard = guard
        self.setup()

    def detach(self) -> None:
        """Remove every hook this detector registered and drop all references."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        try:
            self.teardown()
        finally:
            self._guard = None

    def setup(self) -> None:
        """Prepare state once attached. Override as needed."""

    def teardown(self) -> None:
        """Drop every reference to user objects. Override as needed."""

    # ----------------------------------------------------------------- events
    def on_model(self, module: torch.nn.Module) -> Findings:
        return None

    def on_optimizer(self, optimizer: torch.optim.Optimizer) -> Findings:
        return None

    def on_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Findings:
        return None

    def on_step_pre(self, optimizer: torch.optim.Optimizer) -> Findings:
        return None

    def on_step_post(self, optimizer: torch.optim.Optimizer) -> Findings:
        return None

    def on_step(self) -> Findings:
        return None

    def on_close(self) -> Findings:
        return None

    # ----------------------------------------------------------------- helpers
    def add_handle(self, handle: RemovableHandle) -> None:
        """Keep a hook handle so that :meth:`detach` removes it."""
        self._handles.append(handle)

    def guarded(self, fn: Callable[..., Findings]) -> Callable[..., None]:
        """Wrap a hook so that its findings reach the guard and its errors disable this detector."""
        return self.guard.wrap_hook(self, fn)

    def finding(
        self,
        message: str,
        *,
        where: str = "",
        location: Location | None = None,
        hint: str | None = None,
        data: dict[str, Any] | None = None,
        severity: Severity | None = None,
    ) -> Finding:
        """Build a finding with this detector's code, name, severity and hint."""
        return Finding(
            code=self.code,
            name=self.name,
            severity=severity or self.severity,
            message=message,
            hint=self.hint if hint is None else hint,
            location=location,
            where=where,
            step=self._guard.step if self._guard is not None else 0,
            data=data or {},
        )

    def report(self) -> dict[str, Any] | None:
        """Extra JSON-serialisable data for the report, under ``detectors[code]``."""
        return None

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The detector's counters, for checkpoints. Plain Python data only."""
        return {name: copy.deepcopy(getattr(self, name)) for name in self.state_fields}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. The argument is not modified."""
        unknown = set(state) - set(self.state_fields)
        if unknown:
            raise ValueError(f"Expected state keys among {list(self.state_fields)} but got {sorted(unknown)}")
        for name in self.state_fields:
            if name in state:
                setattr(self, name, copy.deepcopy(state[name]))

    @classmethod
    def rule_page(cls) -> str:
        """The rule page: the class docstring, dedented."""
        import inspect

        return inspect.cleandoc(cls.__doc__ or "")
