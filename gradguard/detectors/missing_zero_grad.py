"""GG101 missing-zero-grad."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from gradguard._frames import name_in_frame, user_frame, user_location
from gradguard.detector import Detector, Findings
from gradguard.findings import Finding, format_names


class _Record:
    """What is known of one parameter's gradient, without holding any tensor."""

    __slots__ = ("consumed", "grad_ref", "grad_version", "name", "param_ref", "param_version", "pending", "tainted")

    def __init__(self, param: torch.Tensor, name: str) -> None:
        self.param_ref = weakref.ref(param)
        self.name = name
        self.grad_ref: weakref.ref[torch.Tensor] | None = None
        self.grad_version = -1
        self.param_version = param._version
        self.consumed = False  # an optimizer step has used the gradient as it is now
        self.tainted = False  # the gradient holds content that an update already applied
        self.pending: Any = None  # an unconfirmed taint: True, or a flag still on the device
        if param.grad is not None:
            self.grad_ref = weakref.ref(param.grad)
            self.grad_version = param.grad._version


class _DeviceFlag:
    """A boolean computed on an accelerator, read only once the device has produced it."""

    __slots__ = ("event", "host")

    def __init__(self, flag: torch.Tensor) -> None:
        self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
        self.host.copy_(flag, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def ready(self) -> bool:
        return bool(self.event.query())

    def value(self) -> bool:
        self.event.synchronize()  # a no-op once ready(); waits only at the end of a run
        return bool(self.host.item())


def _holds_values(grad: torch.Tensor) -> Any:
    """Whether a gradient holds non-zero values: True/False, or a pending device flag.

    Only runs when a stale gradient is suspected, to tell it from one zeroed through
    ``.grad.data.zero_()``, which changes no version counter. It never waits for a GPU.
    """
    if grad.is_sparse or grad.device.type == "meta":
        return True
    flag = grad.ne(0).any()
    if grad.device.type == "cpu":
        return bool(flag)
    if grad.device.type == "cuda":
        return _DeviceFlag(flag)
    return True


class MissingZeroGrad(Detector):
    """GG101 missing-zero-grad: gradients applied again by a later update.

    **What it detects.** ``backward()`` adds to ``.grad``; it never overwrites it. When the
    gradients are not reset between two parameter updates, the next update applies the
    new gradient *plus every gradient already applied before*. gradguard tracks each
    parameter's gradient and the version counters of the gradient and the parameter, and
    reports an update that uses a gradient which an earlier update already consumed and
    nothing reset since. It covers optimizer steps, each inner update of LBFGS (which calls
    the closure several times inside one ``step()``), and hand-written updates such as
    ``p -= lr * p.grad`` with no optimizer at all.

    **Why it matters.** Training does not fail: the effective gradient is a running sum
    of every past gradient, so the update grows step after step, the loss oscillates or
    diverges, and nothing points at the missing line.

    **How to fix it.** Reset the gradients once per update, after ``step()`` or before
    ``backward()``: ``optimizer.zero_grad()`` (or ``model.zero_grad()``, or
    ``p.grad = None``). With LBFGS, call ``optimizer.zero_grad()`` at the start of the
    closure. For gradient accumulation, reset after each *real* step only: that is
    correct and is not reported.

    **Example.**

    .. code-block:: python

        for x, y in loader:
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()          # GG101: gradients of earlier steps applied again
            # fix: optimizer.zero_grad() here (or before backward)

    **How it knows, at no cost.** No tensor value is read on the normal path: two tiny
    hooks per parameter compare version counters. Only when a stale gradient is suspected
    is it checked for non-zero values, to tell it from one cleared with
    ``.grad.data.zero_()`` (which bumps no counter); on a GPU this check never waits.
    A gradient changed in place between the last update and the next ``backward()`` by
    anything but ``backward()`` counts as reset.
    """

    code = "GG101"
    name = "missing-zero-grad"
    hint = "Call optimizer.zero_grad() once per optimizer step (after step() or before backward())"
    events = frozenset({"model", "optimizer", "step_pre", "step_post", "close"})
    state_fields = ("flagged_updates",)

    def setup(self) -> None:
        self.flagged_updates = 0
        self._records: dict[int, _Record] = {}
        self._pending: dict[int, _Record] = {}
        self._owned: set[int] | None = None
        self._deferred: list[tuple[list[_Record], Any, str, bool]] = []

    def teardown(self) -> None:
        self._records.clear()
        self._pending.clear()
        self._deferred.clear()
        self._owned = None

    # ---------------------------------------------------------------- tracking
    def _track(self, param: torch.Tensor) -> _Record | None:
        rec = self._records.get(id(param))
        if rec is not None and rec.param_ref() is param:
            return rec
        if not param.requires_grad or not param.is_leaf:
            return None
        rec = _Record(param, self.guard.param_name(param))
        self._records[id(param)] = rec
        self.add_handle(param.register_hook(self.guarded(self._make_pre_hook(rec))))
        self.add_handle(param.register_post_accumulate_grad_hook(self.guarded(self._make_post_hook(rec))))
        return rec

    def _make_pre_hook(self, rec: _Record) -> Any:
        def before_accumulate(incoming: torch.Tensor) -> Findings:
            param = rec.param_ref()
            if param is None:
                return None
            grad = param.grad
            if grad is None or rec.grad_ref is None or rec.grad_ref() is not grad or grad._version != rec.grad_version:
                rec.tainted = False
                rec.pending = None
                return None
            if rec.consumed or param._version != rec.param_version:
                # an update used this gradient, and backward() now adds to it
                rec.tainted = True
                rec.pending = _holds_values(grad)
                self._pending[id(param)] = rec
                if self._owner(param) is None:
                    return self._report_orphan(rec)
            return None

        return before_accumulate

    def _make_post_hook(self, rec: _Record) -> Any:
        def after_accumulate(param: torch.Tensor) -> Findings:
            grad = param.grad
            if grad is None:
                return None
            if rec.grad_ref is None or rec.grad_ref() is not grad:
                rec.grad_ref = weakref.ref(grad)
            rec.grad_version = grad._version
            rec.param_version = param._version
            rec.consumed = False
            return None

        return after_accumulate

    def _owner(self, param: torch.Tensor) -> torch.optim.Optimizer | None:
        for opt in self.guard.optimizers():
            for group in opt.param_groups:
                for p in group["params"]:
                    if p is param:
                        return opt
        return None

    # ---------------------------------------------------------------- events
    def on_model(self, module: torch.nn.Module) -> Findings:
        for param in module.parameters():
            self._track(param)
        return None

    def on_optimizer(self, optimizer: torch.optim.Optimizer) -> Findings:
        for group in optimizer.param_groups:
            for param in group["params"]:
                self._track(param)
        return None

    def on_step_pre(self, optimizer: torch.optim.Optimizer) -> Findings:
        if not self._pending and not self._deferred:
            return None
        return self._report(optimizer, during_step=False)

    def on_step_post(self, optimizer: torch.optim.Optimizer) -> Findings:
        out = self._report(optimizer, during_step=True) if self._pending or self._deferred else None
        records = self._records
        for group in optimizer.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                rec = records.get(id(param))
                if rec is None or rec.param_ref() is not param:
                    rec = self._track(param)
                    if rec is None:
                        continue
                if rec.grad_ref is None or rec.grad_ref() is not grad:
                    rec.grad_ref = weakref.ref(grad)
                rec.grad_version = grad._version
                rec.param_version = param._version
                rec.consumed = True
                rec.tainted = False
        return out

    def on_close(self) -> Findings:
        return self._drain_deferred(final=True)

    # ---------------------------------------------------------------- reporting
    def _report(self, optimizer: torch.optim.Optimizer, *, during_step: bool) -> list[Finding]:
        out = self._drain_deferred(final=False)
        if not self._pending:
            return out
        mine: list[_Record] = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                rec = self._pending.get(id(param))
                if rec is None:
                    continue
                grad: torch.Tensor | None = param.grad
                if rec.param_ref() is not param:
                    continue
                del self._pending[id(param)]
                if rec.tainted and grad is not None and rec.grad_ref is not None and rec.grad_ref() is grad:
                    mine.append(rec)
        if not mine:
            return out
        frame = user_frame()
        location = user_location(frame) if frame is not None else None
        variable = name_in_frame(optimizer, frame)
        opt_name = type(optimizer).__name__ if variable is None else f"{variable} ({type(optimizer).__name__})"
        self._deferred.append((mine, location, opt_name, during_step))
        return out + self._drain_deferred(final=False)

    def _drain_deferred(self, *, final: bool) -> list[Finding]:
        out: list[Finding] = []
        keep = []
        for recs, location, opt_name, during_step in self._deferred:
            if not final and any(isinstance(r.pending, _DeviceFlag) and not r.pending.ready() for r in recs):
                keep.append((recs, location, opt_name, during_step))
                continue
            stale = [r for r in recs if _confirmed(r.pending)]
            for r in recs:
                r.pending = None
            if stale:
                out.append(self._finding(stale, location, opt_name, during_step))
        self._deferred = keep
        return out

    def _finding(self, recs: list[_Record], location: Any, opt_name: str, during_step: bool) -> Finding:
        self.flagged_updates += 1
        names = [r.name for r in recs]
        step_call = opt_name.split(" ")[0] + ".step()"
        if during_step:
            message = (
                f"{step_call} updated the parameters and then accumulated new gradients onto "
                f"the ones that update had used, inside the same step() call, for {len(names)} "
                f"parameter(s): {format_names(names)}"
            )
            hint = "Call optimizer.zero_grad() at the start of the closure passed to step()"
        else:
            message = (
                f"{step_call} applies gradients that an earlier update already applied: "
                f"backward() added to gradients that were not reset since that update, for "
                f"{len(names)} parameter(s): {format_names(names)}"
            )
            hint = self.hint
        return self.finding(
            message,
            where=opt_name,
            location=location,
            hint=hint,
            data={"optimizer": opt_name, "parameters": names[:100], "num_parameters": len(names)},
        )

    def _report_orphan(self, rec: _Record) -> Findings:
        if isinstance(rec.pending, _DeviceFlag) or not _confirmed(rec.pending):
            return None  # zeroed through .data, or cannot be told without waiting: stay silent
        self._pending = {k: r for k, r in self._pending.items() if r is not rec}
        rec.pending = None
        self.flagged_updates += 1
        return [
            self.finding(
                f"backward() adds to the gradient of {rec.name}, which the last update of that "
                "parameter already applied and nothing reset since: the next update applies it again",
                where=rec.name,
                location=user_location(),
                hint="Reset the gradient after each hand-written update: p.grad = None (or p.grad.zero_())",
                data={"parameters": [rec.name], "optimizer": None},
            )
        ]


def _confirmed(pending: Any) -> bool:
    if isinstance(pending, _DeviceFlag):
        return pending.value()
    return bool(pending)
