"""The Guard: attaches detectors to models and optimizers and routes their findings."""

from __future__ import annotations

import contextlib
import os
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import torch

from gradguard._frames import user_location
from gradguard.detector import EVENTS, Detector, Findings
from gradguard.errors import ConfigurationError
from gradguard.findings import Finding, Severity
from gradguard.policy import Policy
from gradguard.report import build_report, write_json_atomic

DetectorSpec = str | type[Detector] | Detector

_ACTIVE: weakref.WeakSet[Guard] = weakref.WeakSet()


def active_guards() -> list[Guard]:
    """The guards attached right now (a ``with Guard(...)`` block, ``install()``, a callback).

    Components outside the detectors, such as the gradient accumulator, report through them.
    """
    return list(_ACTIVE)


class Guard:
    """Watch a training loop for silent mistakes.

    Args:
        model: a module, or a list of modules, whose forward marks an iteration.
        optimizer: an optimizer, or a list of optimizers, whose ``step()`` marks a step.
        detectors: which detectors to run: codes, rule names, classes or configured
            instances. All registered detectors by default.
        policy: ``"warn"`` (default), ``"raise"`` or ``"collect"``.
        select: code prefixes or rule names to keep; all by default.
        ignore: code prefixes or rule names to drop.
        json_path: where :meth:`detach` writes the JSON report, if anywhere.
        global_hooks: watch every module and optimizer of the process through PyTorch's
            global hooks, as ``gradguard run`` does, instead of only those given.

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
        policy: str = "warn",
        select: Iterable[str] | str | None = None,
        ignore: Iterable[str] | str | None = None,
        json_path: str | os.PathLike[str] | None = None,
        global_hooks: bool = False,
    ) -> None:
        self.policy = Policy(policy, select=_tuple(select), ignore=_tuple(ignore))
        models = _as_list(model, torch.nn.Module, "model")
        optimizers = _as_list(optimizer, torch.optim.Optimizer, "optimizer")
        self.json_path = os.fspath(json_path) if json_path is not None else None
        self.global_hooks = bool(global_hooks)
        self._detectors: list[Detector] = [d for d in _make_detectors(detectors) if self.policy.enabled(d.code)]
        self._model_refs: list[weakref.ref[torch.nn.Module]] = [weakref.ref(m) for m in models]
        self._optimizer_refs: list[weakref.ref[torch.optim.Optimizer]] = [weakref.ref(o) for o in optimizers]
        self._model_ids: set[int] = set()
        self._optimizer_ids: set[int] = set()
        self._names: dict[int, str] = {}
        self._findings: dict[tuple[Any, ...], Finding] = {}
        self._listeners: dict[str, list[tuple[Detector, Callable[..., Findings]]]] = {e: [] for e in EVENTS}
        self._handles: list[Any] = []
        self._optimizer_steps: dict[int, int] = {}
        self._depth = 0
        self._step_base = 0  # steps restored from a checkpoint
        self._skipped_ids: set[int] = set()
        self._attached = False
        self._closed = False
        self._started = 0.0
        self._wall = 0.0
        self.step = 0
        self.iteration = 0
        self.overhead_s = 0.0
        self.finding_callbacks: list[Callable[[Finding], None]] = []

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Guard:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.detach(_raising=exc is None)

    def attach(self) -> Guard:
        """Register every hook. Returns the guard itself."""
        if self._attached:
            raise RuntimeError("This Guard is already attached")
        if self._closed:
            raise RuntimeError("A Guard attaches once; create a new one for another run")
        self._attached = True
        _ACTIVE.add(self)
        self._started = time.perf_counter()
        for det in self._detectors:
            self._attach_detector(det)
        if self.global_hooks:
            self._attach_global_hooks()
        for ref in list(self._model_refs):
            module = ref()
            if module is not None:
                self.add_model(module)
        for oref in list(self._optimizer_refs):
            opt = oref()
            if opt is not None:
                self.add_optimizer(opt)
        return self

    def detach(self, _raising: bool = True) -> None:
        """Give detectors their last word, remove every hook and drop every reference.

        Findings stay available in :attr:`findings`. Under the ``raise`` policy, findings
        made at close time are raised, unless an exception is already propagating.
        """
        if not self._attached:
            return
        closing: list[Finding] = []
        try:
            closing = self._dispatch_collect("close", ())
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            for det in self._detectors:
                if det.attached:
                    self._detach_detector(det)
            self._model_refs.clear()
            self._optimizer_refs.clear()
            self._model_ids.clear()
            self._optimizer_ids.clear()
            self._attached = False
            _ACTIVE.discard(self)
            self._closed = True
            self._wall = time.perf_counter() - self._started
            if self.json_path is not None:
                self.write_json(self.json_path)
        if closing:
            if _raising:
                self._publish(closing)
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

    # ------------------------------------------------------------------ registry
    def add_model(self, module: torch.nn.Module) -> None:
        """Watch another root module (its forward marks an iteration)."""
        if not isinstance(module, torch.nn.Module):
            raise ConfigurationError(f"Expected model to be a torch.nn.Module but got {type(module).__name__}")
        if id(module) in self._model_ids:
            return
        self._model_ids.add(id(module))
        if not any(r() is module for r in self._model_refs):
            self._model_refs.append(weakref.ref(module))
        for name, p in module.named_parameters(remove_duplicate=True):
            self._names.setdefault(id(p), name)
        if not self.global_hooks:
            self._handles.append(module.register_forward_pre_hook(self._forward_pre, with_kwargs=True))
        if self._attached:
            self._dispatch("model", (module,))

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Watch another optimizer (its ``step()`` marks a step)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigurationError(
                f"Expected optimizer to be a torch.optim.Optimizer but got {type(optimizer).__name__}"
            )
        if id(optimizer) in self._optimizer_ids:
            return
        self._optimizer_ids.add(id(optimizer))
        if not any(r() is optimizer for r in self._optimizer_refs):
            self._optimizer_refs.append(weakref.ref(optimizer))
        if not self.global_hooks:
            self._handles.append(optimizer.register_step_pre_hook(self._step_pre))
            self._handles.append(optimizer.register_step_post_hook(self._step_post))
        if self._attached:
            self._dispatch("optimizer", (optimizer,))

    def models(self) -> list[torch.nn.Module]:
        """The live root modules being watched."""
        return [m for m in (r() for r in self._model_refs) if m is not None]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The live optimizers being watched."""
        return [o for o in (r() for r in self._optimizer_refs) if o is not None]

    def param_name(self, param: torch.Tensor) -> str:
        """The qualified name of a parameter (``backbone.0.weight``), or a description."""
        name = self._names.get(id(param))
        if name is not None:
            return name
        for opt in self.optimizers():
            for gi, group in enumerate(opt.param_groups):
                for pi, p in enumerate(group["params"]):
                    if p is param:
                        return f"{type(opt).__name__}.param_groups[{gi}]['params'][{pi}]"
        return f"<tensor {tuple(param.shape)}>"

    @property
    def detectors(self) -> list[Detector]:
        return list(self._detectors)

    def detector(self, code_or_name: str) -> Detector | None:
        for det in self._detectors:
            if code_or_name in (det.code, det.name):
                return det
        return None

    # ------------------------------------------------------------------ findings
    @property
    def findings(self) -> list[Finding]:
        """Every finding so far, merged by code and place, in the order first seen."""
        return list(self._findings.values())

    def emit(self, detector: Detector | None, findings: Iterable[Finding]) -> None:
        """Record findings made outside an event (a detector's own hook, an adapter)."""
        new = [f for f in (self._record(f) for f in findings) if f is not None]
        if new:
            self._publish(new)

    def wrap_hook(self, detector: Detector, fn: Callable[..., Findings]) -> Callable[..., None]:
        """A hook that runs ``fn`` safely: findings are recorded, errors disable the detector."""

        def hook(*args: Any, **kwargs: Any) -> None:
            if detector._guard is None:
                return
            start = time.perf_counter()
            new: list[Finding] = []
            try:
                out = fn(*args, **kwargs)
                if out:
                    new = [f for f in (self._record(f) for f in out) if f is not None]
            except Exception as exc:
                new = self._internal_error(detector, exc)
            self.overhead_s += time.perf_counter() - start
            if new:
                self._publish(new)

        return hook

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
        )

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as JSON, atomically (a crash never leaves half a file)."""
        write_json_atomic(self.to_dict(), path)

    def state_dict(self) -> dict[str, Any]:
        """Counters, findings and detector state, for checkpoints."""
        return {
            "version": 1,
            "step": self.step,
            "iteration": self.iteration,
            "findings": [f.to_dict() for f in self.findings],
            "detectors": {d.code: d.state_dict() for d in self._detectors},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. The argument is not modified."""
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ConfigurationError(f"Expected a gradguard state dict of version 1 but got {state!r:.80}")
        self.step = int(state.get("step", 0))
        self._step_base = self.step - max(self._optimizer_steps.values(), default=0)
        self.iteration = int(state.get("iteration", 0))
        for data in state.get("findings", []):
            f = Finding.from_dict(data)
            self._findings.setdefault(f.key, f)
        for det in self._detectors:
            if det.code in state.get("detectors", {}):
                det.load_state_dict(state["detectors"][det.code])

    # ------------------------------------------------------------------ internals
    def _attach_detector(self, det: Detector) -> None:
        try:
            det.attach(self)
        except Exception as exc:
            self._publish(self._internal_error(det, exc))
            return
        for event in det.events:
            self._listeners[event].append((det, getattr(det, EVENTS[event])))

    def _detach_detector(self, det: Detector) -> None:
        for event in EVENTS:
            self._listeners[event] = [(d, m) for d, m in self._listeners[event] if d is not det]
        try:
            det.detach()
        except Exception:  # detaching must go on for the others
            det._handles.clear()
            det._guard = None

    def _internal_error(self, det: Detector, exc: BaseException) -> list[Finding]:
        if det.attached:
            self._detach_detector(det)
        if not self.policy.enabled("GG000"):
            return []
        finding = Finding(
            code="GG000",
            name="internal-error",
            severity=Severity.WARNING,
            message=(
                f"detector {det.code} {det.name} failed with {type(exc).__name__}: {exc}; "
                "it is disabled for the rest of the run, and training goes on"
            ),
            hint="Report this to gradguard with the traceback in data; ignore the rule meanwhile",
            location=user_location(),
            where=f"{det.code} {det.name}",
            step=self.step,
            data={
                "detector": det.code,
                "exception": f"{type(exc).__name__}: {exc}",
                "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            },
        )
        recorded = self._record(finding)
        return [recorded] if recorded is not None else []

    def _record(self, finding: Finding) -> Finding | None:
        """Merge into the findings; return the finding if it is new."""
        known = self._findings.get(finding.key)
        if known is not None:
            known.count += finding.count
            return None
        self._findings[finding.key] = finding
        return finding

    def _publish(self, new: list[Finding]) -> None:
        for f in new:
            self._notify(f)
        self.policy.apply(new)

    def _notify(self, finding: Finding) -> None:
        for callback in list(self.finding_callbacks):
            with contextlib.suppress(Exception):  # a report writer must never break training
                callback(finding)

    def _dispatch_collect(self, event: str, args: tuple[Any, ...]) -> list[Finding]:
        listeners = self._listeners[event]
        if not listeners:
            return []
        start = time.perf_counter()
        new: list[Finding] = []
        for det, method in list(listeners):
            try:
                out = method(*args)
                if out:
                    new.extend(f for f in (self._record(f) for f in out) if f is not None)
            except Exception as exc:
                new.extend(self._internal_error(det, exc))
        self.overhead_s += time.perf_counter() - start
        return new

    def _dispatch(self, event: str, args: tuple[Any, ...]) -> None:
        new = self._dispatch_collect(event, args)
        if new:
            self._publish(new)

    # hooks -------------------------------------------------------------------
    def _forward_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.iteration += 1
        if self._listeners["forward"]:
            self._dispatch("forward", (module, args, kwargs))

    def _step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._listeners["step_pre"]:
            self._dispatch("step_pre", (optimizer,))

    def _step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        count = self._optimizer_steps.get(id(optimizer), 0) + 1
        self._optimizer_steps[id(optimizer)] = count
        if self._listeners["step_post"]:
            self._dispatch("step_post", (optimizer,))
        if self._step_base + count > self.step:
            self.step = self._step_base + count
            if self._listeners["step"]:
                self._dispatch("step", ())

    def _attach_global_hooks(self) -> None:
        from torch.nn.modules import module as module_mod
        from torch.optim import optimizer as optimizer_mod

        self._handles.append(module_mod.register_module_forward_pre_hook(self._global_forward_pre))
        self._handles.append(module_mod.register_module_forward_hook(self._global_forward_post, always_call=True))
        self._handles.append(optimizer_mod.register_optimizer_step_pre_hook(self._global_step_pre))
        self._handles.append(optimizer_mod.register_optimizer_step_post_hook(self._global_step_post))

    def _global_forward_pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        depth = self._depth
        self._depth = depth + 1
        if depth or id(module) in self._skipped_ids:
            return
        if id(module) not in self._model_ids:
            if next(module.parameters(), None) is None:
                self._skipped_ids.add(id(module))  # a loss or other parameter-free module
                return
            self.add_model(module)
        self._forward_pre(module, args, {})

    def _global_forward_post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._depth:
            self._depth -= 1

    def _global_step_pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if id(optimizer) not in self._optimizer_ids:
            self.add_optimizer(optimizer)
        self._step_pre(optimizer, args, kwargs)

    def _global_step_post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._step_post(optimizer, args, kwargs)


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


def _make_detectors(specs: Sequence[DetectorSpec] | None) -> list[Detector]:
    from gradguard.detectors import DETECTORS, detector_class

    if specs is None:
        return [cls() for cls in DETECTORS]
    if isinstance(specs, (str, Detector)) or (isinstance(specs, type) and issubclass(specs, Detector)):
        specs = [specs]
    out: list[Detector] = []
    for spec in specs:
        if isinstance(spec, Detector):
            if spec.attached:
                raise ConfigurationError(f"Expected a detached detector but {spec.code} is attached to a Guard")
            out.append(spec)
        elif isinstance(spec, type) and issubclass(spec, Detector):
            out.append(spec())
        elif isinstance(spec, str):
            out.append(detector_class(spec)())
        else:
            raise ConfigurationError(
                f"Expected detectors to hold codes, names, Detector classes or instances but got {spec!r}"
            )
    codes = [d.code for d in out]
    if len(set(codes)) != len(codes):
        raise ConfigurationError(f"Expected each detector once but got {codes}")
    return out
