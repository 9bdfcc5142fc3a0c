"""``Guard.attach()`` is all or nothing: a part that fails leaves the process as it was before."""

import json
import warnings

import pytest
import torch
from torch import nn

import gradguard
from gradguard import ConfigurationError, Detector, FindingError, FindingWarning, Guard
from gradguard.detector import on
from gradguard.detectors import DETECTORS
from gradguard.events import ModelAdded, SchedulerStep
from gradguard.guard import active_guards
from gradguard.sources import (
    SOURCES,
    ModuleSource,
    NumpySource,
    OptimizerSource,
    attributes,
    autograd,
    modules,
    resets,
    schedulers,
)
from gradguard.sources import numpy as numpy_source
from tests.helpers import tiny_data, tiny_model


def _misspelt(param):
    # Never called. The attribute source reads this file and finds the misspelt store, so a
    # descriptor of that name stands on torch.Tensor while a guard is attached.
    param.requries_grad = False


class Schedules(Detector):
    """Consumes scheduler steps, so that the scheduler source starts too."""

    consumes = (SchedulerStep,)

    @on(SchedulerStep)
    def _step(self, event):
        return None


class FindsAtOnce(Detector):
    """Reports the model as soon as it is added (to raise under the ``raise`` policy during attach)."""

    code, name = "GG403", "param-not-in-optimizer"
    consumes = (ModelAdded,)

    @on(ModelAdded)
    def _model(self, event):
        return [self.finding("found while attaching")]


def _every_detector():
    return [*DETECTORS, Schedules()]


def _train(model, opt, steps=3):
    x, y = tiny_data()
    for _ in range(steps):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()  # no zero_grad(): GG101 when watched


def process_state(model, opt):
    """Everything a guard may change in the process: patched functions, descriptors, hooks, active guards."""
    from torch.nn.modules import module as module_mod
    from torch.optim import optimizer as optimizer_mod

    classes = [torch.Tensor, torch.nn.Module, torch.optim.Optimizer, *(p.owner for p in schedulers._PATCHES)]
    patches = [
        *numpy_source.PATCHES,
        *resets.PATCHES,
        autograd._BACKWARD,
        *schedulers._PATCHES,
        modules._GETSTATE,
        modules._COMPILE,
        *attributes._PATCHES.values(),
    ]
    return {
        "active guards": active_guards(),
        "installed": gradguard.installed(),
        "class attributes": {f"{c.__module__}.{c.__qualname__}": dict(vars(c)) for c in classes},
        "torch functions": {name: getattr(torch, name) for name in ("from_numpy", "as_tensor", *numpy_source.TYPED)},
        "torch internals": [torch._C._set_default_tensor_type, torch.autograd.backward],
        "patches in use": [(p.owner, p.name, len(p.listeners)) for p in patches if p.active or p.listeners],
        "global hooks": {
            name: dict(value)
            for mod in (module_mod, optimizer_mod)
            for name, value in vars(mod).items()
            if name.startswith("_global_") and isinstance(value, dict)
        },
        "module hooks": [
            (dict(m._forward_pre_hooks), dict(m._forward_hooks), m.__dict__.get("_compiled_call_impl"))
            for m in model.modules()
        ],
        "hook ids": set(modules._HOOK_IDS),
        "parameter hooks": [
            (dict(p._backward_hooks or {}), dict(p._post_accumulate_grad_hooks or {})) for p in model.parameters()
        ],
        "optimizer hooks": [dict(opt._optimizer_step_pre_hooks), dict(opt._optimizer_step_post_hooks)],
    }


def test_the_state_compared_is_what_an_attached_guard_changes():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = process_state(model, opt)
    with Guard(model, opt, detectors=_every_detector(), policy="collect") as guard:
        during = process_state(model, opt)
        assert "requries_grad" in vars(torch.Tensor)  # the descriptor of the misspelt name above
    assert process_state(model, opt) == before
    changed = {key for key in before if before[key] != during[key]}
    assert changed == set(before) - {"installed", "parameter hooks"}  # no source hooks parameters today
    assert not guard.attached
    installed = gradguard.install(policy="collect")
    try:
        during = process_state(model, opt)
    finally:
        gradguard.uninstall()
    assert during["installed"] is installed
    assert during["global hooks"] != before["global hooks"]
    assert process_state(model, opt) == before


def _after_start(cls, exc=None):
    """``cls.start`` that does its work, then fails."""
    original = cls.start
    exc = exc if exc is not None else RuntimeError("boom")

    def start(self):
        original(self)
        raise exc

    return start


def _after(original):
    def method(self, *args):
        original(self, *args)
        raise RuntimeError("boom")

    return method


def _detector(code):
    return next(d for d in DETECTORS if d.code == code)


def _raising(*_args):
    raise RuntimeError("boom")


def _stages():
    first, gg406 = DETECTORS[0], _detector("GG406")
    stages = [
        pytest.param(
            lambda mp: mp.setattr(first, "setup", _after(first.setup)),
            f"attach ({first.code} {first.name})",
            id="a detector's setup",
        ),
        pytest.param(
            lambda mp: mp.setattr(gg406, "_optimizer", _raising),
            f"attach ({gg406.code} {gg406.name})",
            id="a detector's first event",
        ),
        pytest.param(
            lambda mp: mp.setattr(numpy_source.PATCHES[2], "wrap", _raising),
            "attach (source NumpySource)",
            id="a source half-way through its patches",
        ),
        pytest.param(
            lambda mp: mp.setattr(ModuleSource, "watch", _after(ModuleSource.watch)),
            "attach (watching the models)",
            id="hooking a model",
        ),
        pytest.param(
            lambda mp: mp.setattr(OptimizerSource, "watch", _after(OptimizerSource.watch)),
            "attach (watching the optimizers)",
            id="hooking an optimizer",
        ),
    ]
    stages += [
        pytest.param(
            lambda mp, cls=cls: mp.setattr(cls, "start", _after_start(cls)),
            f"attach (source {cls.__name__})",
            id=f"{cls.__name__}.start",
        )
        for cls in SOURCES
    ]
    return stages


@pytest.mark.parametrize(("inject", "where"), _stages())
def test_a_failure_at_any_stage_of_attach_leaves_nothing_and_training_goes_on(monkeypatch, inject, where):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = process_state(model, opt)
    guard = Guard(model, opt, detectors=_every_detector(), policy="collect")
    inject(monkeypatch)

    assert guard.attach() is guard
    assert process_state(model, opt) == before
    assert not guard.attached
    assert [(f.code, f.where) for f in guard.findings] == [("GG000", where)]
    assert "RuntimeError: boom" in guard.findings[0].message
    _train(model, opt)  # the program runs on, unwatched
    assert guard.step == 0
    assert len(guard.findings) == 1

    monkeypatch.undo()  # the failure gone, the same guard attaches afresh
    with guard:
        _train(model, opt)
    assert guard.step == 3
    assert "GG101" in [f.code for f in guard.findings]
    assert process_state(model, opt) == before


def test_gg000_for_a_failed_attach_is_warned_even_under_raise_and_the_with_block_runs(monkeypatch, tmp_path):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = process_state(model, opt)
    monkeypatch.setattr(NumpySource, "start", _after_start(NumpySource))
    ran = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Guard(model, opt, policy="raise", json_path=tmp_path / "report.json") as guard:
            assert process_state(model, opt) == before
            _train(model, opt)
            ran = True
    assert ran
    assert [f.code for f in guard.findings] == ["GG000"]
    assert [w.category for w in caught] == [FindingWarning]
    assert str(caught[0].message).startswith("GG000 ")
    assert "attach (source NumpySource) failed with RuntimeError: boom" in str(caught[0].message)
    report = json.loads((tmp_path / "report.json").read_text())  # it says why nothing was watched
    assert [f["code"] for f in report["findings"]] == ["GG000"]


@pytest.mark.parametrize(
    "exc", [ConfigurationError("Expected a setting but got none"), KeyboardInterrupt()], ids=["bad input", "interrupt"]
)
def test_bad_input_and_interrupts_propagate_after_the_rollback(monkeypatch, exc):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = process_state(model, opt)
    monkeypatch.setattr(resets.GradResetSource, "start", _after_start(resets.GradResetSource, exc))
    guard = Guard(model, opt, policy="collect")
    with pytest.raises(type(exc)):
        guard.attach()
    assert process_state(model, opt) == before
    assert not guard.attached
    assert guard.findings == []


def test_a_finding_raised_while_attaching_propagates_after_the_rollback():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = process_state(model, opt)
    guard = Guard(model, opt, detectors=[FindsAtOnce], policy="raise")
    with pytest.raises(FindingError, match="found while attaching"):
        guard.attach()
    assert not guard.attached
    assert process_state(model, opt) == before


@pytest.mark.parametrize("cls", [ModuleSource, OptimizerSource, NumpySource])
def test_install_that_fails_to_attach_installs_nothing(monkeypatch, cls):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = process_state(model, opt)
    monkeypatch.setattr(cls, "start", _after_start(cls))
    guard = gradguard.install(policy="collect")
    assert not guard.attached
    assert gradguard.installed() is None
    assert process_state(model, opt) == before
    assert [(f.code, f.where) for f in guard.findings] == [("GG000", f"attach (source {cls.__name__})")]

    monkeypatch.undo()
    monkeypatch.setattr(cls, "start", _after_start(cls, ConfigurationError("Expected a setting but got none")))
    with pytest.raises(ConfigurationError):
        gradguard.install(policy="collect")
    assert gradguard.installed() is None
    assert process_state(model, opt) == before
