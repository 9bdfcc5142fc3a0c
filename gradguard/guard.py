"""The Guard: runs the sources, feeds their events to the detectors, and owns the findings."""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import torch

from gradguard.detector import Detector
from gradguard.detectors import DetectorSpec, make_detectors
from gradguard.errors import ConfigurationError
from gradguard.events import (
    BackwardPost,
    BackwardPre,
    Close,
    Event,
    ForwardPost,
    ForwardPre,
    IterationEnd,
    ModelAdded,
    OptimizerAdded,
    StepEnd,
    StepPost,
    StepPre,
)
from gradguard.findings import Finding, Revision
from gradguard.ledger import Ledger
from gradguard.policy import Policy
from gradguard.report import build_report, write_json_atomic
from gradguard.run import Run, unwrap
from gradguard.sampling import PER_GROUP, Budget
from gradguard.schedule import Table
from gradguard.sources import SOURCES, ModuleSource, OptimizerSource, Source

_ACTIVE: weakref.WeakSet[Guard] = weakref.WeakSet()
_REFRESH_EVERY = 8  # iterations between the sources' looks for what no hook reports (after the warm-up)
_EVAL_STREAK = 8  # root forwards with no backward or step between them that make an evaluation loop
_STEPLESS = 64  # backward() calls with no optimizer step that make a run of hand-written updates


def active_guards() -> list[Guard]:
    """The guards attached right now (a ``with Guard(...)`` block, ``install()``, a callback)."""
    return list(_ACTIVE)


def broadcast(event: Event) -> None:
    """Deliver an event to every attached guard (the gradient accumulator's windows, say)."""
    for guard in active_guards():
        guard.publish(event)


class Guard:
    """Watch a training loop for silent mistakes.

    Args:
        model: a module, or a list of modules, whose forward marks an iteration. A
            ``torch.compile`` or ``DistributedDataParallel`` wrapper is watched as the model
            it wraps.
        optimizer: an optimizer, or a list of optimizers, whose ``step()`` marks a step.
        detectors: which detectors to run: codes, rule names, classes or configured
            instances. All registered detectors by default.
        policy: ``"warn"`` (default), ``"raise"`` or ``"collect"``, or a :class:`Policy`
            (which then holds ``select`` and ``ignore``).
        select: code prefixes or rule names to keep; all by default.
        ignore: code prefixes or rule names to drop.
        json_path: where :meth:`detach` writes the JSON report, if anywhere.
        global_hooks: watch every model and optimizer of the process, as ``gradguard run``
            does, instead of only those given.
        budget: parameter tensors that per-parameter checks look at per param group and
            step after the first 32 steps (a :class:`~gradguard.Budget` for more control);
            ``None`` looks at every tensor at every step, at a cost that grows with the model.

    Example:
        >>> import torch, gradguard
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with gradguard.Guard(model, opt, policy="collect") as guard:
        ...     for _ in range(3):
        ...         model(torch.ones(2, 3)).sum().backward()
        ...         opt.step()                      # no zero_grad(): a bug
        >>> [f.code for f in guard.findings]
        ['GG101']
        >>> guard.findings[0].count
        2
    """

    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.nn.Module] | None = None,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        *,
        detectors: Sequence[DetectorSpec] | None = None,
        policy: str | Policy = "warn",
        select: Iterable[str] | str | None = None,
        ignore: Iterable[str] | str | None = None,
        json_path: str | os.PathLike[str] | None = None,
        global_hooks: bool = False,
        budget: Budget | int | None = PER_GROUP,
    ) -> None:
        if isinstance(policy, Policy):
            if select is not None or ignore is not None:
                raise ConfigurationError("Expected select and ignore inside the Policy given, not beside it")
            self.policy = policy
        else:
            self.policy = Policy(policy, select=_tuple(select), ignore=_tuple(ignore))
        models = _as_list(model, torch.nn.Module, "model")
        optimizers = _as_list(optimizer, torch.optim.Optimizer, "optimizer")
        self.json_path = os.fspath(json_path) if json_path is not None else None
        #: How the run was started, for the report; ``None``: this process's ``sys.argv``.
        self.command: dict[str, Any] | None = None
        self.global_hooks = bool(global_hooks)
        self.budget = Budget.of(budget)
        self.run = Run(self.budget)
        self._detectors: list[Detector] = [d for d in make_detectors(detectors) if self.policy.enabled(d.code)]
        self._targets: list[weakref.ref[torch.nn.Module]] = []  # what the user calls, wrappers included
        self._model_ids: set[int] = set()
        self._optimizer_ids: set[int] = set()
        self._handlers: Table = {}  # the handlers of each event in the step in progress
        self._sources: list[Source] = []
        self._modules: ModuleSource | None = None
        self._optimizer_source: OptimizerSource | None = None
        self._step_base = 0  # steps restored from a checkpoint
        self._in_step = False  # inside an optimizer's step() (an LBFGS closure's backward is part of it)
        self._quiet = 0  # root forwards since the last backward() or step()
        self._called: set[int] = set()  # root modules called since the last iteration boundary
        self._stepless = 0  # backward() calls since the last optimizer step
        self._escalated: list[Finding] = []  # revisions from info to a warning, for the policy
        self._attached = False
        self._closed = False
        self._started = 0.0
        self._wall = 0.0
        self.overhead_s = 0.0
        #: the findings, merged, and what each new one does (warn, raise, collect)
        self.ledger = Ledger(self.policy)
        for m in models:
            self.add_model(m)
        for o in optimizers:
            self.add_optimizer(o)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Guard:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.detach(_raising=exc is None)

    def attach(self) -> Guard:
        """Start the sources and the detectors. Returns the guard itself."""
        if self._attached:
            raise RuntimeError("This Guard is already attached")
        if self._closed:
            raise RuntimeError("A Guard attaches once; create a new one for another run")
        self._attached = True
        _ACTIVE.add(self)
        self._started = time.perf_counter()
        self.run.schedule.on_change = self._refresh_handlers
        for det in self._detectors:
            self._attach_detector(det)
        consumed = self.run.schedule.consumed()
        self._modules = ModuleSource(self, discover=self.global_hooks)
        self._optimizer_source = OptimizerSource(self, global_hooks=self.global_hooks)
        wanted = [cls(self) for cls in SOURCES if not cls.always and consumed.intersection(cls.provides)]
        for source in [self._modules, self._optimizer_source, *wanted]:
            try:
                source.start()
            except Exception as exc:
                self.source_failed(source, exc)
                continue
            self._sources.append(source)
        for ref in list(self._targets):
            target = ref()
            if target is not None and self._modules is not None:
                self._modules.watch(target)
        for model in self.run.models():
            self.emit(ModelAdded(model))
        for opt in self.run.optimizers():
            if self._optimizer_source is not None:
                self._optimizer_source.watch(opt)
            self.emit(OptimizerAdded(opt))
        return self

    def detach(self, _raising: bool = True) -> None:
        """Give detectors their last word, stop every source and drop every reference.

        Findings stay available in :attr:`findings`. Under the ``raise`` policy, findings
        made at close time are raised, unless an exception is already propagating.
        """
        if not self._attached:
            return
        closing: list[Finding] = []
        try:
            start = time.perf_counter()
            closing = self._deliver(Close())
            self.overhead_s += time.perf_counter() - start
        finally:
            for source in reversed(self._sources):
                with contextlib.suppress(Exception):  # stopping must go on for the others
                    source.stop()
            self._sources.clear()
            self._modules = None
            self._optimizer_source = None
            for det in self._detectors:
                if det.attached:
                    self._detach_detector(det)
            self.run.schedule.on_change = None
            self._targets.clear()
            self._model_ids.clear()
            self._optimizer_ids.clear()
            self.run._clear()
            self._attached = False
            _ACTIVE.discard(self)
            self._closed = True
            self._wall = time.perf_counter() - self._started
            if self.json_path is not None:
                self.write_json(self.json_path)
        escalated, self._escalated = self._escalated, []
        if closing or escalated:
            if _raising:
                self._publish(closing)
                self.policy.apply(escalated)
            else:
                for f in closing:
                    self._notify(f)

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def wall_s(self) -> float:
        """Seconds from attach to detach (or to now, while attached)."""
        if self._attached:
            return time.perf_counter() - self._started
        return self._wall

    @property
    def step(self) -> int:
        """Training steps so far (the furthest optimizer's steps)."""
        return self.run.step

    @property
    def iteration(self) -> int:
        """Root-model forwards so far."""
        return self.run.iteration

    # ------------------------------------------------------------------ registry
    def add_model(self, module: torch.nn.Module) -> None:
        """Watch another root module (its forward marks an iteration)."""
        if not isinstance(module, torch.nn.Module):
            raise ConfigurationError(f"Expected model to be a torch.nn.Module but got {type(module).__name__}")
        if not any(r() is module for r in self._targets):
            self._targets.append(weakref.ref(module))
        if self._modules is not None:
            self._modules.watch(module)
        model = unwrap(module)
        if id(model) in self._model_ids and any(m is model for m in self.run.models()):
            return
        self._model_ids.add(id(model))
        self.run._add_model(model)
        if self._attached:
            self._timed(ModelAdded(model))

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Watch another optimizer (its ``step()`` marks a step)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigurationError(
                f"Expected optimizer to be a torch.optim.Optimizer but got {type(optimizer).__name__}"
            )
        if id(optimizer) in self._optimizer_ids and any(o is optimizer for o in self.run.optimizers()):
            return
        self._optimizer_ids.add(id(optimizer))
        self.run._add_optimizer(optimizer)
        if self._optimizer_source is not None:
            self._optimizer_source.watch(optimizer)
        if self._modules is not None and self.global_hooks:
            self._modules.adopt(optimizer)
        if self._attached:
            self._timed(OptimizerAdded(optimizer))

    def models(self) -> list[torch.nn.Module]:
        """The live root modules being watched (unwrapped from ``torch.compile`` and DDP)."""
        return self.run.models()

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The live optimizers being watched."""
        return self.run.optimizers()

    def param_name(self, param: torch.Tensor) -> str:
        """The qualified name of a parameter (``backbone.0.weight``), or a description."""
        return self.run.param_name(param)

    @property
    def detectors(self) -> list[Detector]:
        return list(self._detectors)

    def detector(self, code_or_name: str) -> Detector | None:
        for det in self._detectors:
            if code_or_name in (det.code, det.name):
                return det
        return None

    # ------------------------------------------------------------------ events
    def publish(self, event: Event) -> None:
        """Deliver an event from outside the sources (an integration's epoch, say) to the detectors."""
        if self._attached:
            self._timed(event)

    def wants(self, event: type[Event]) -> bool:
        """Whether any attached detector consumes ``event``."""
        return event in self._handlers

    def emit(self, event: Event) -> None:
        """Deliver an event to the detectors that consume it (for sources, already timed)."""
        new = self._deliver(event)
        if new:
            self._publish(new)
        if self._escalated:  # revised from info to a warning: the policy applies now
            escalated, self._escalated = self._escalated, []
            self.policy.apply(escalated)

    # ------------------------------------------------------------------ findings
    @property
    def findings(self) -> list[Finding]:
        """Every finding so far, merged by code and place, in the order first seen."""
        return self.ledger.findings

    @property
    def finding_callbacks(self) -> list[Callable[[Finding], None]]:
        """Called with each new or revised finding (``gradguard run`` rewrites its report)."""
        return self.ledger.callbacks

    def revise(self, finding: Finding, **changes: Any) -> Finding:
        """Replace a published finding by a revised one (severity, message, hint, data).

        The finding keeps its place, first step and count; the revised one is returned and
        reported to ``finding_callbacks``. Nothing is warned or raised again, except that a
        detector's revision raising an info finding to a warning goes through the policy.
        """
        return self.ledger.revise(finding, **changes)

    # ------------------------------------------------------------------ the sources' side
    def forward_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        start = time.perf_counter()
        if self._quiet >= _EVAL_STREAK and id(module) in self._called:
            self._called.clear()
            self._tick("forward")  # evaluation: a model called again, no backward or step since
        self._quiet += 1
        self._called.add(id(module))
        self.run._iteration += 1
        if ForwardPre in self._handlers:
            self.emit(ForwardPre(unwrap(module), args, kwargs))
        self.overhead_s += time.perf_counter() - start

    def forward_post(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if ForwardPost in self._handlers:
            start = time.perf_counter()
            self.emit(ForwardPost(unwrap(module), args, kwargs, out))
            self.overhead_s += time.perf_counter() - start

    def backward(self, post: bool, tensors: tuple[Any, ...]) -> None:
        start = time.perf_counter()
        if not post:
            self.run._backwards += 1
        event_type = BackwardPost if post else BackwardPre
        if event_type in self._handlers:
            self.emit(event_type(tensors))
        if post:
            self._quiet = 0
            self._called.clear()
            self._stepless += 1
            if not self._in_step and (self.run._step == 0 or self._stepless > _STEPLESS):
                self._tick("backward")  # no optimizer steps: each backward() is an iteration
        self.overhead_s += time.perf_counter() - start

    def step_pre(self, optimizer: torch.optim.Optimizer) -> None:
        self._in_step = True
        if StepPre in self._handlers:
            self._timed(StepPre(optimizer))

    def step_post(self, optimizer: torch.optim.Optimizer) -> None:
        start = time.perf_counter()
        run = self.run
        self._in_step = False
        self._quiet = self._stepless = 0
        self._called.clear()
        count = run._optimizer_steps.get(id(optimizer), 0) + 1
        run._optimizer_steps[id(optimizer)] = count
        if StepPost in self._handlers:
            self.emit(StepPost(optimizer))
        if self._step_base + count > run._step:
            run._step = self._step_base + count
            if StepEnd in self._handlers:
                self.emit(StepEnd(run._step))
            self._tick("step")
        self.overhead_s += time.perf_counter() - start

    def module_changed(self, module: torch.nn.Module) -> None:
        run = self.run
        if run._params is not None and run.owns(module):
            run._changed()

    def module_replacing(self, module: torch.nn.Module, name: str, old: torch.nn.Module | torch.Tensor) -> None:
        self.run._replacing(module, name, old)

    def source_failed(self, source: Source, exc: BaseException) -> None:
        with contextlib.suppress(Exception):
            source.stop()
        if source in self._sources:
            self._sources.remove(source)
        if source is self._modules:
            self._modules = None
        if source is self._optimizer_source:
            self._optimizer_source = None
        new = self._internal_error(f"source {type(source).__name__}", exc, None)
        if new:
            self._publish(new)

    # ------------------------------------------------------------------ report
    def to_dict(self) -> dict[str, Any]:
        """The report: findings, summary, environment and each detector's data."""
        extra: dict[str, Any] = {}
        for det in self._detectors:
            try:
                data = det.report()
            except Exception as exc:  # a report must never fail for one detector
                data = {"error": repr(exc)}
            if data is not None:
                extra[det.code] = data
        return build_report(
            findings=self.findings,
            steps=self.step,
            iterations=self.iteration,
            overhead_s=self.overhead_s,
            wall_s=self.wall_s,
            detectors=[d.code for d in self._detectors],
            detector_data=extra,
            suppressed=self.ledger.suppressed,
            command=self.command,
        )

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as JSON, atomically (a crash never leaves half a file)."""
        write_json_atomic(self.to_dict(), path)

    def write_html(self, path: str | os.PathLike[str]) -> None:
        """Write the report as one self-contained HTML page (plots, findings, environment)."""
        from gradguard.report_html import write_html

        write_html(self.to_dict(), path)

    def state_dict(self) -> dict[str, Any]:
        """Counters, findings and detector state, for checkpoints."""
        return {
            "version": 1,
            "step": self.step,
            "iteration": self.iteration,
            "clock": self.run.clock,
            "findings": [f.to_dict() for f in self.findings],
            "detectors": {d.code: d.state_dict() for d in self._detectors},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. The argument is not modified."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ConfigurationError(f"Expected a gradguard state dict of version 1 but got {state!r:.80}")
        run = self.run
        run._step = int(state.get("step", 0))
        self._step_base = run._step - max(run._optimizer_steps.values(), default=0)
        run._iteration = int(state.get("iteration", 0))
        run._clock = int(state.get("clock", run._step))
        for data in state.get("findings", []):
            f = Finding.from_dict(data)
            self.ledger.restore(f)
        for det in self._detectors:
            if det.code in state.get("detectors", {}):
                det.load_state_dict(state["detectors"][det.code])
        self._refresh_handlers()

    # ------------------------------------------------------------------ internals
    def _attach_detector(self, det: Detector) -> None:
        try:
            det.attach(self.run)
        except Exception as exc:
            self._publish(self._internal_error(f"{det.code} {det.name}", exc, det))
            return
        self.run.schedule.add(det)

    def _detach_detector(self, det: Detector) -> None:
        self.run.schedule.remove(det)
        try:
            det.detach()
        except Exception:  # detaching must go on for the others
            det._run = None

    def _internal_error(self, what: str, exc: BaseException, det: Detector | None) -> list[Finding]:
        if det is not None and det.attached:
            self._detach_detector(det)
        return self.ledger.internal_error(what, exc, det.code if det is not None else None, self.run.step)

    def _timed(self, event: Event) -> None:
        start = time.perf_counter()
        self.emit(event)
        self.overhead_s += time.perf_counter() - start

    def _tick(self, by: str) -> None:
        """An iteration ended: the sources' periodic look, ``IterationEnd``, the next iteration's handlers."""
        run = self.run
        run._clock += 1
        if run._clock <= self.budget.warmup or run._clock % _REFRESH_EVERY == 0:
            for source in list(self._sources):
                try:
                    source.refresh()
                except Exception as exc:
                    self.source_failed(source, exc)
        if IterationEnd in self._handlers:
            self.emit(IterationEnd(run._clock, run._step, by))
        self._refresh_handlers()  # the next iteration's

    def _refresh_handlers(self) -> None:
        run = self.run
        self._handlers = run.schedule.table((run._step or run._clock) + 1)

    def _deliver(self, event: Event) -> list[Finding]:
        listeners = self._handlers.get(event.__class__)
        if not listeners:
            return []
        new: list[Finding] = []
        for det, method in listeners:
            try:
                out = method(event)
                if out:
                    for item in out:
                        if isinstance(item, Revision):
                            escalates = self.ledger.escalates(item.finding, item.changes)
                            revised = self.revise(item.finding, **item.changes)
                            if escalates:
                                self._escalated.append(revised)  # info that turned out to matter
                            continue
                        recorded = self._record(item)
                        if recorded is not None:
                            new.append(recorded)
            except Exception as exc:
                new.extend(self._internal_error(f"{det.code} {det.name}", exc, det))
        return new

    def _record(self, finding: Finding) -> Finding | None:
        return self.ledger.record(finding)

    def _publish(self, new: list[Finding]) -> None:
        self.ledger.publish(new)

    def _notify(self, finding: Finding) -> None:
        self.ledger.notify(finding)


def _tuple(value: Iterable[str] | str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _as_list(value: Any, kind: type, arg: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, kind):
        return [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigurationError(
            f"Expected {arg} to be a {kind.__module__}.{kind.__qualname__} or a list of them "
            f"but got {type(value).__name__}"
        )
    items = list(value)
    for item in items:
        if not isinstance(item, kind):
            raise ConfigurationError(
                f"Expected every {arg} to be a {kind.__module__}.{kind.__qualname__} but got {type(item).__name__}"
            )
    return items
