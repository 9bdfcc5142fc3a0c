"""GG405 param-without-grad."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from gradguard._frames import user_location
from gradguard.detector import Detector, Findings
from gradguard.findings import Finding, format_names


class _Record:
    """How long one parameter has gone without a gradient, without holding a tensor."""

    __slots__ = ("grad_ref", "hooked", "missed", "name", "ref", "touched")

    def __init__(self, param: torch.Tensor, name: str) -> None:
        self.ref = weakref.ref(param)
        self.name = name
        self.missed = 0  # consecutive steps of its optimizer without a gradient
        self.grad_ref: weakref.ref[torch.Tensor] | None = None  # the .grad seen at the last step
        self.hooked = False  # a post-accumulate hook watches backward (reused .grad tensors)
        self.touched = False  # backward accumulated into it since the last step


class ParamWithoutGrad(Detector):
    """GG405 param-without-grad: a trainable parameter that never gets a gradient.

    **What it detects.** A parameter that an optimizer updates and that requires
    gradients, but that has received no gradient for ``window`` (20) consecutive steps
    of its optimizer. Its forward cuts it out of the graph: it is used through ``.data``
    or ``.detach()``, computed under ``torch.no_grad()``, or not used at all. A parameter
    that gets a gradient on some steps (heads of several tasks trained in turn) is fine.
    With ``zero_grad()`` (``set_to_none=True``) a missing gradient is a ``.grad`` of
    ``None`` at ``step()``; when ``.grad`` tensors are kept and zeroed in place instead,
    a small hook tells whether backward reached the parameter. No value is read.

    **Why it matters.** The parameter never learns, though the optimizer lists it and
    nothing fails; with the detached path the model can still fit, more poorly.

    **How to fix it.** Use the parameter itself in forward (not ``p.data`` or
    ``p.detach()``, and not under ``torch.no_grad()``). If it is meant to stay fixed,
    register it as a buffer or freeze it (``requires_grad_(False)``) and keep it out of the
    optimizer.

    **Example.**

    .. code-block:: python

        def forward(self, x):
            return x @ self.weight.detach().T + self.bias   # GG405: weight never learns
        # fix: return x @ self.weight.T + self.bias

    **Report.** When a model becomes known, the counts of trainable and frozen parameters
    of each of its top-level modules go into the report, under ``detectors["GG405"]``.
    """

    code = "GG405"
    name = "param-without-grad"
    hint = "Use the parameter itself in forward (not .data, .detach() or no_grad), or freeze it and drop it"
    events = frozenset({"model", "step_pre", "close"})
    state_fields = ("flagged", "summary")

    def __init__(self, window: int = 20) -> None:
        super().__init__()
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"Expected window to be a positive int but got {window!r}")
        self.window = window

    def setup(self) -> None:
        self.flagged: list[str] = []
        self.summary: dict[str, dict[str, dict[str, int]]] = {}
        self._records: dict[int, _Record] = {}
        self._reported: set[int] = set()

    def teardown(self) -> None:
        self._records.clear()
        self._reported.clear()

    # ---------------------------------------------------------------- events
    def on_model(self, module: torch.nn.Module) -> Findings:
        key = type(module).__name__
        if key in self.summary:
            key = f"{key}#{len(self.summary)}"
        self.summary[key] = _parameter_summary(module)
        return None

    def on_step_pre(self, optimizer: torch.optim.Optimizer) -> Findings:
        missing: list[str] = []
        records = self._records
        for group in optimizer.param_groups:
            for p in group["params"]:
                rec = records.get(id(p))
                if not p.requires_grad:
                    if rec is not None:
                        rec.missed = 0  # frozen: the count starts again once unfrozen
                    continue
                if rec is None or rec.ref() is not p:
                    rec = records[id(p)] = _Record(p, self.guard.param_name(p))
                grad = p.grad
                if grad is None:
                    got = False
                elif rec.hooked:
                    got = rec.touched
                elif rec.grad_ref is not None and rec.grad_ref() is grad:
                    # the same .grad tensor as last step: zeroed in place or accumulated
                    # into, which only a hook can tell apart; trust this step, watch the next
                    got = True
                    rec.hooked = True
                    self.add_handle(p.register_post_accumulate_grad_hook(self.guarded(_make_hook(rec))))
                else:
                    got = True
                rec.grad_ref = weakref.ref(grad) if grad is not None else None
                rec.touched = False
                if got:
                    rec.missed = 0
                    continue
                rec.missed += 1
                if rec.missed >= self.window and id(p) not in self._reported:
                    self._reported.add(id(p))
                    missing.append(rec.name)
        if not missing:
            return None
        self.flagged.extend(missing)
        return [self._finding(optimizer, missing, self._outside_models(optimizer, missing))]

    def on_close(self) -> Findings:
        self._records.clear()
        return None

    def report(self) -> dict[str, Any] | None:
        return {"parameters": self.summary} if self.summary else None

    def _outside_models(self, optimizer: torch.optim.Optimizer, names: list[str]) -> int:
        """How many of the named parameters are in no watched model (replaced layers)."""
        models = self.guard.models()
        if not models:
            return 0
        inside = {id(p) for m in models for p in m.parameters()}
        wanted = set(names)
        return sum(
            1
            for group in optimizer.param_groups
            for p in group["params"]
            if id(p) not in inside and (rec := self._records.get(id(p))) is not None and rec.name in wanted
        )

    def _finding(self, optimizer: torch.optim.Optimizer, names: list[str], outside: int) -> Finding:
        opt_name = type(optimizer).__name__
        message = (
            f"{len(names)} parameter(s) of {opt_name} require gradients but received none in the last "
            f"{self.window} steps: {format_names(names)}"
        )
        if outside:
            message += (
                f"; {outside} of them are no longer part of the model (a layer replaced after the optimizer was made?)"
            )
        return self.finding(
            message,
            where=format_names(names),
            location=user_location(),
            data={
                "optimizer": opt_name,
                "parameters": names[:100],
                "num_parameters": len(names),
                "window": self.window,
            },
        )


def _make_hook(rec: _Record) -> Any:
    def accumulated(param: torch.Tensor) -> Findings:
        rec.touched = True
        return None

    return accumulated


def _parameter_summary(module: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and frozen parameter counts (elements and tensors) per top-level module.

    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> _ = m[0].requires_grad_(False)
    >>> _parameter_summary(m)["0"]
    {'trainable': 0, 'frozen': 6, 'trainable_tensors': 0, 'frozen_tensors': 2}
    """
    out: dict[str, dict[str, int]] = {}
    seen: set[int] = set()

    def count(name: str, params: Any) -> None:
        row = {"trainable": 0, "frozen": 0, "trainable_tensors": 0, "frozen_tensors": 0}
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            kind = "trainable" if p.requires_grad else "frozen"
            if not isinstance(p, (UninitializedParameter, UninitializedBuffer)):  # lazy: sized at first forward
                row[kind] += p.numel()
            row[f"{kind}_tensors"] += 1
        if row["trainable_tensors"] or row["frozen_tensors"]:
            out[name] = row

    count("(own)", module.parameters(recurse=False))
    for name, child in module.named_children():
        count(name, child.parameters())
    return out
