"""The Guard: runs the sources, feeds their events to the detectors, and owns the findings."""

from __future__ import annotations

import contextlib
import itertools
import numbers
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import torch

from gradguard.detector import Detector
from gradguard.detectors import DetectorSpec, make_detectors
from gradguard.errors import ConfigurationError, GradGuardError, NothingWatchedWarning
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
from gradguard.introspect.frames import user_location
from gradguard.ledger import Autosave, Ledger
from gradguard.policy import Policy
from gradguard.report import build_report, write_json_atomic
from gradguard.run import Counts, Run, find_optimizer, unwrap, unwrap_optimizer
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
            it wraps. A guard with none (and ``global_hooks`` off) watches no model until
            :meth:`add_model`; if the loop runs meanwhile, it says so once, with a
            :class:`~gradguard.errors.NothingWatchedWarning` at the first iteration it sees.
        optimizer: an optimizer, or a list of optimizers, whose ``step()`` marks a step. A
            wrapper (Accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``,
            an object that holds the optimizer in an attribute) is watched as the optimizer
            it wraps, whose steps are those that reach it.
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
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | Any = None,
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
            self.policy = Policy.of(policy, select, ignore)
        models = _as_list(model, torch.nn.Module, "model")
        optimizers = _optimizer_list(optimizer)
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
        # Threads: each has a loop of its own (_Loop, in _local), whose shape says where its
        # iterations end; the shared counters are written under _lock, or per thread (Counts).
        self._local = threading.local()
        self._threads = 0  # threads that reported an event so far
        self._lock = threading.RLock()  # taken on rare paths: a new thread, model or optimizer; the run's step
        self._ticks = itertools.count(1)  # the index of the next iteration to end, whichever thread ends it
        self._told_unwatched = self.global_hooks  # whether a guard with no model said so (at its first iteration)
        self._escalated: list[Finding] = []  # revisions from info to a warning, for the policy
        self._attached = False
        self._attaching: int | None = None  # the thread inside attach(): a part that fails there undoes it all
        self._closed = False
        self._started = 0.0
        self._wall = 0.0
        self.overhead_s = 0.0
        #: the findings, merged, and what each new one does (warn, raise, collect)
        self.ledger = Ledger(self.policy)
        #: Rewrites the report on a schedule while attached (``gradguard run`` sets one).
        self.autosave: Autosave | None = None
        #: Notes for the report's ``notes``: what happened to the run that is neither a finding nor a warning.
        self.notes: list[str] = []
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
        """Start the sources and the detectors. Returns the guard itself.

        Attaching is all or nothing. If any part of it fails (a detector's ``setup()``, a
        source, hooking a model or an optimizer), whatever was started is undone: no hook or
        patch is left, the guard is not in :func:`active_guards` and not :attr:`attached`.
        Bad input (:class:`~gradguard.ConfigurationError`) and a finding raised under the
        ``raise`` policy then propagate; gradguard's own failure is reported as ``GG000``
        instead, and the program runs on unwatched.
        """
        if self._attached:
            raise RuntimeError("This Guard is already attached")
        if self._closed:
            raise RuntimeError("A Guard attaches once; create a new one for another run")
        self._attached = True
        _ACTIVE.add(self)
        self.ledger.share()  # a finding another attached guard warned about is collected, not warned again
        self._started = time.perf_counter()
        stage = "attach"
        self._attaching = threading.get_ident()
        try:
            self.run.schedule.on_change = self._refresh_handlers
            for det in self._detectors:
                stage = f"attach ({det.code} {det.name})"
                det.attach(self.run)
                self.run.schedule.add(det)
            stage = "attach"
            consumed = self.run.schedule.consumed()
            self._modules = ModuleSource(self, discover=self.global_hooks)
            self._optimizer_source = OptimizerSource(self, global_hooks=self.global_hooks)
            wanted = [cls(self) for cls in SOURCES if not cls.always and consumed.intersection(cls.provides)]
            for source in [self._modules, self._optimizer_source, *wanted]:
                stage = f"attach (source {type(source).__name__})"
                self._sources.append(source)  # before start(): one that fails half-way is stopped too
                source.start()
            stage = "attach (watching the models)"
            for ref in list(self._targets):
                target = ref()
                if target is not None:
                    self._modules.watch(target)
            for model in self.run.models():
                self.emit(ModelAdded(model))
            stage = "attach (watching the optimizers)"
            for opt in self.run.optimizers():
                self._optimizer_source.watch(opt)
                self.emit(OptimizerAdded(opt))
        except Exception as exc:
            self._attaching = None
            self._rollback()
            if isinstance(exc, GradGuardError):  # bad input, or a finding raised by the policy
                raise
            cause: BaseException = exc
            if isinstance(exc, _AttachFailed):  # a part that would have been disabled alone, with GG000
                stage, cause = f"attach ({exc.what})", exc.__cause__ or exc
            self._publish(self.ledger.internal_error(stage, cause, None, self.run.step))
            if self.json_path is not None:
                with contextlib.suppress(Exception):  # the report says why nothing was watched
                    self.write_json(self.json_path)
        except BaseException:
            self._attaching = None
            self._rollback()
            raise
        self._attaching = None
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
            self._stop()
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
        try:
            if closing or escalated:
                if _raising:
                    self._publish(closing)
                    self.ledger.apply(escalated)
                else:
                    for f in closing:
                        self._notify(f)
        finally:
            self.ledger.unshare()

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
        with self._lock:  # threads may find models at once
            if not any(r() is module for r in self._targets):
                self._targets.append(weakref.ref(module))
        if self._modules is not None:
            self._modules.watch(module)
        model = unwrap(module)
        with self._lock:
            if id(model) in self._model_ids and any(m is model for m in self.run.models()):
                return
            self._model_ids.add(id(model))
            self.run._add_model(model)
        if self._attached:
            self._timed(ModelAdded(model))

    def add_optimizer(self, optimizer: torch.optim.Optimizer | Any) -> None:
        """Watch another optimizer (its ``step()`` marks a step).

        A wrapper (Accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``,
        an object that holds the optimizer in an attribute) is watched as the optimizer it wraps.
        """
        optimizer = unwrap_optimizer(optimizer, "optimizer")
        if id(optimizer) in self._optimizer_ids and any(o is optimizer for o in self.run.optimizers()):
            return
        with self._lock:  # threads may step a new optimizer at once: it is added once
            if id(optimizer) in self._optimizer_ids and any(o is optimizer for o in self.run.optimizers()):
                return
            if self._optimizer_source is not None:
                self._optimizer_source.watch(optimizer)  # first: one that cannot be hooked is not half added
            self._optimizer_ids.add(id(optimizer))
            self.run._add_optimizer(optimizer)
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
            self.ledger.apply(escalated)

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
        try:
            loop = self._local.loop
        except AttributeError:
            loop = self._new_loop()
        if loop.quiet >= _EVAL_STREAK and id(module) in loop.called:
            loop.called.clear()
            self._tick("forward", loop)  # evaluation: a model called again, no backward or step since
        loop.quiet += 1
        loop.called.add(id(module))
        if loop.counts is None:
            self.run._iteration += 1
        else:
            loop.counts.forwards += 1
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
        try:
            loop = self._local.loop
        except AttributeError:
            loop = self._new_loop()
        if not post:
            if loop.counts is None:
                self.run._backwards += 1
            else:
                loop.counts.backwards += 1
        event_type = BackwardPost if post else BackwardPre
        if event_type in self._handlers:
            self.emit(event_type(tensors))
        if post:
            loop.quiet = 0
            loop.called.clear()
            loop.stepless += 1
            if not loop.in_step and (self.run._step == 0 or loop.stepless > _STEPLESS):
                self._tick("backward", loop)  # no optimizer steps: each backward() is an iteration
        self.overhead_s += time.perf_counter() - start

    def step_pre(self, optimizer: torch.optim.Optimizer) -> None:
        try:
            loop = self._local.loop
        except AttributeError:
            loop = self._new_loop()
        loop.in_step = True
        if StepPre in self._handlers:
            self._timed(StepPre(optimizer))

    def step_post(self, optimizer: torch.optim.Optimizer) -> None:
        start = time.perf_counter()
        run = self.run
        try:
            loop = self._local.loop
        except AttributeError:
            loop = self._new_loop()
        loop.in_step = False
        loop.quiet = loop.stepless = 0
        loop.called.clear()
        # one thread at a time steps an optimizer (torch's step() is not safe from two at once)
        count = run._optimizer_steps.get(id(optimizer), 0) + 1
        run._optimizer_steps[id(optimizer)] = count
        if StepPost in self._handlers:
            self.emit(StepPost(optimizer))
        step = self._step_base + count
        with self._lock:  # the run's step takes each value once, whichever thread's optimizer gets there
            advanced = step > run._step
            if advanced:
                run._step = step
        if advanced:
            if StepEnd in self._handlers:
                self.emit(StepEnd(step))
            self._tick("step", loop, step)
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
        report = build_report(
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
        if self.notes:
            report["notes"] = list(self.notes)
        return report

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
        """Restore :meth:`state_dict`. The argument is not modified.

        Raises:
            ConfigurationError: ``state`` is no state of this version, or a part of it is
                malformed (the message names it, ``state['findings'][2]['severity']`` say);
                nothing is restored then.
        """
        if not isinstance(state, dict):
            raise ConfigurationError(
                f"Expected state to be a dict from Guard.state_dict() but got {type(state).__name__}"
            )
        if state.get("version") != 1:
            raise ConfigurationError(
                f"Expected state['version'] to be 1 (a Guard.state_dict() of this gradguard) "
                f"but got {state.get('version')!r:.80}"
            )
        counters = {key: _state_int(state, key, 0) for key in ("step", "iteration", "clock") if key in state}
        findings = _state_findings(state)
        saved = _state_detectors(state, self._detectors)
        run = self.run
        run._step = counters.get("step", 0)
        self._step_base = run._step - max(run._optimizer_steps.values(), default=0)
        run._iteration = counters.get("iteration", 0)
        run._clock = counters.get("clock", run._step)
        self._ticks = itertools.count(run.clock + 1)
        for f in findings:
            self.ledger.restore(f)
        for det in self._detectors:
            if det.code in saved:
                try:
                    det.load_state_dict(saved[det.code])
                except ConfigurationError:
                    raise
                except (TypeError, ValueError, KeyError, AttributeError) as exc:
                    raise ConfigurationError(
                        f"Expected state['detectors'][{det.code!r}] to be a state of {det.code} {det.name} "
                        f"but restoring it failed: {exc}"
                    ) from exc
        self._refresh_handlers()

    # ------------------------------------------------------------------ internals
    def _stop(self) -> None:
        """Stop every source (each hook and patch removed) and detach every detector."""
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

    def _rollback(self) -> None:
        """Undo a failed :meth:`attach`: as before it, so that a later attach can start afresh."""
        try:
            self._stop()
        finally:
            self._handlers = {}
            self._attached = False
            _ACTIVE.discard(self)
            self.ledger.unshare()

    def _detach_detector(self, det: Detector) -> None:
        self.run.schedule.remove(det)
        try:
            det.detach()
        except Exception:  # detaching must go on for the others
            det._run = None

    def _internal_error(self, what: str, exc: BaseException, det: Detector | None) -> list[Finding]:
        if self._attaching == threading.get_ident():
            raise _AttachFailed(what) from exc  # attach() undoes everything and reports it
        if det is not None and det.attached:
            self._detach_detector(det)
        return self.ledger.internal_error(what, exc, det.code if det is not None else None, self.run.step)

    def _timed(self, event: Event) -> None:
        start = time.perf_counter()
        self.emit(event)
        self.overhead_s += time.perf_counter() - start

    def _tick(self, by: str, loop: _Loop, step: int | None = None) -> None:
        """An iteration of ``loop``'s thread ended (at ``step``, for a step that ended it).

        Counted in that thread's counts, numbered by one counter for all the threads; then
        the sources' periodic look, ``IterationEnd``, the next iteration's handlers.
        """
        run = self.run
        if loop.counts is None:
            run._clock += 1
        else:
            loop.counts.ticks += 1
        index = next(self._ticks)  # atomic: two threads never end iteration number n both
        if index <= self.budget.warmup or index % _REFRESH_EVERY == 0:
            for source in list(self._sources):
                try:
                    source.refresh()
                except Exception as exc:
                    self.source_failed(source, exc)
        if IterationEnd in self._handlers:
            self.emit(IterationEnd(index, run._step if step is None else step, by))
        self._refresh_handlers(index)  # the next iteration's
        if self.autosave is not None:
            self.autosave.poll(run._step or index, self.ledger.version)
        if not self._told_unwatched:
            self._warn_unwatched()

    def _warn_unwatched(self) -> None:
        """At the first iteration: a guard that is not global and has no model says so, once."""
        self._told_unwatched = True
        if self.run.models():
            return
        if self.run.optimizers():
            what = (
                "was given no model: it counts no forward and checks no model's parameters "
                "until guard.add_model(model) (or Guard(model, optimizer))"
            )
        else:
            what = (
                "watches nothing: it was given no model and no optimizer, and global_hooks is off; "
                "call guard.add_model(model) and guard.add_optimizer(optimizer), pass them to "
                "Guard(model, optimizer), or watch the whole process with global_hooks=True"
            )
        location = user_location()
        filename = location.file if location is not None else "<gradguard>"
        warnings.warn_explicit(
            f"gradguard: this Guard {what}",
            category=NothingWatchedWarning,
            filename=filename,
            lineno=location.line if location is not None else 0,
            module=os.path.splitext(os.path.basename(filename))[0],
        )

    def _new_loop(self) -> _Loop:
        """The first event of a thread: its loop, counted in the run's own counters if it is the first thread."""
        loop = _Loop()
        with self._lock:
            if self._threads:
                loop.counts = self.run._add_counts(loop)
            self._threads += 1
        self._local.loop = loop
        return loop

    def _refresh_handlers(self, clock: int | None = None) -> None:
        run = self.run
        self._handlers = run.schedule.table((run._step or (run.clock if clock is None else clock)) + 1)

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


class _Loop:
    """One thread's training or evaluation loop: what it did since its last iteration boundary.

    The shape of a loop (see docs/architecture.md, "What an iteration is") is each
    thread's own: a thread's forwards, backward() calls and steps never end another
    thread's iteration. ``counts`` is where the thread counts its forwards, backward() calls
    and iterations: ``None`` for the first thread, which counts in the :class:`Run` itself.
    """

    __slots__ = ("__weakref__", "called", "counts", "in_step", "quiet", "stepless")

    def __init__(self) -> None:
        self.quiet = 0  # root forwards since the last backward() or step()
        self.called: set[int] = set()  # root modules called since the last iteration boundary
        self.stepless = 0  # backward() calls since the last optimizer step
        self.in_step = False  # inside an optimizer's step() (an LBFGS closure's backward is part of it)
        self.counts: Counts | None = None


class _AttachFailed(Exception):
    """A part of :meth:`Guard.attach` failed that would be disabled alone later in the run."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


_SEVERITIES = ("info", "warning", "error")
_FINDING = "a finding (a dict with 'code', 'name', 'severity' and 'message', as Finding.to_dict() makes)"


def _state_int(data: dict[str, Any], key: str, low: int, at: str = "state") -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigurationError(f"Expected {at}[{key!r}] to be an integer >= {low} but got {value!r:.80}")
    return int(value)


def _state_findings(state: dict[str, Any]) -> list[Finding]:
    """The findings of a saved guard state, each checked: the first malformed one is named in the error."""
    items = state.get("findings", [])
    if not isinstance(items, list):
        raise ConfigurationError(f"Expected state['findings'] to be a list of findings but got {type(items).__name__}")
    findings = []
    for i, data in enumerate(items):
        at = f"state['findings'][{i}]"
        if not isinstance(data, dict):
            raise ConfigurationError(f"Expected {at} to be {_FINDING} but got {type(data).__name__}")
        missing = [key for key in ("code", "name", "severity", "message") if key not in data]
        if missing:
            raise ConfigurationError(
                f"Expected {at} to be {_FINDING} but got a dict without {', '.join(map(repr, missing))}"
            )
        for key in ("code", "name", "message", "hint", "where"):
            if key in data and not isinstance(data[key], str):
                raise ConfigurationError(f"Expected {at}[{key!r}] to be a str but got {type(data[key]).__name__}")
        severity = data["severity"]
        if not isinstance(severity, str) or severity not in _SEVERITIES:
            raise ConfigurationError(
                f"Expected {at}['severity'] to be one of {', '.join(map(repr, _SEVERITIES))} but got {severity!r:.80}"
            )
        for key, low in (("step", 0), ("count", 1)):
            if key in data:
                _state_int(data, key, low, at)
        location = data.get("location")
        if location is not None:
            if not isinstance(location, dict) or not isinstance(location.get("file"), str) or "line" not in location:
                raise ConfigurationError(
                    f"Expected {at}['location'] to be None or a dict with 'file' and 'line' but got {location!r:.80}"
                )
            _state_int(location, "line", 0, f"{at}['location']")
            if not isinstance(location.get("function", ""), str):
                raise ConfigurationError(
                    f"Expected {at}['location']['function'] to be a str but got {type(location['function']).__name__}"
                )
        if data.get("data") is not None and not isinstance(data["data"], dict):
            raise ConfigurationError(
                f"Expected {at}['data'] to be a dict or None but got {type(data['data']).__name__}"
            )
        try:
            findings.append(Finding.from_dict(data))
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ConfigurationError(f"Expected {at} to be {_FINDING} but reading it failed: {exc!r}") from exc
    return findings


def _state_detectors(state: dict[str, Any], detectors: list[Detector]) -> dict[str, Any]:
    """The saved detector states, by code, those of ``detectors`` checked: a dict of their own fields each."""
    saved = state.get("detectors", {})
    if not isinstance(saved, dict):
        raise ConfigurationError(
            f"Expected state['detectors'] to be a dict of detector states by code but got {type(saved).__name__}"
        )
    for det in detectors:
        if det.code not in saved:
            continue
        at = f"state['detectors'][{det.code!r}]"
        value = saved[det.code]
        if not isinstance(value, dict):
            raise ConfigurationError(
                f"Expected {at} to be a dict (the state of {det.code}) but got {type(value).__name__}"
            )
        unknown = sorted(repr(key) for key in value if key not in det.state_fields)
        if unknown:
            raise ConfigurationError(
                f"Expected the keys of {at} among {list(det.state_fields)} but got {', '.join(unknown)}"
            )
    return saved


def _optimizer_list(value: Any) -> list[torch.optim.Optimizer]:
    """``Guard(optimizer=...)``: an optimizer or a wrapper of one, or a list of them; each unwrapped."""
    if value is None:
        return []
    found = find_optimizer(value)
    if found is not None:
        return [found]
    if isinstance(value, (str, bytes, torch.nn.Module)) or not isinstance(value, Iterable):
        return [unwrap_optimizer(value, "optimizer", lists=True)]  # raises, naming what is accepted
    return [unwrap_optimizer(item, "every optimizer") for item in value]


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
