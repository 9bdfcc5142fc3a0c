"""The event contract: what a detector declares it consumes is exactly what it handles."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import gradguard
from gradguard.detector import Detector, on
from gradguard.detectors import DETECTORS
from gradguard.events import Event, SchedulerStep, StepEnd, StepPost, provided
from gradguard.sources import SOURCES
from gradguard.sources.schedulers import _PATCHES

from .helpers import tiny_data, tiny_model


def test_a_handler_whose_event_is_not_declared_fails_at_class_creation():
    with pytest.raises(TypeError, match="handles StepPost, which is not declared in consumes"):

        class Undeclared(Detector):
            consumes = (StepEnd,)

            @on(StepEnd)
            def _end(self, event):
                return None

            @on(StepPost)
            def _post(self, event):
                return None


def test_a_declared_event_with_no_handler_fails_at_class_creation():
    with pytest.raises(TypeError, match="StepPost is declared in consumes but has no @on"):

        class Unhandled(Detector):
            consumes = (StepEnd, StepPost)

            @on(StepEnd)
            def _end(self, event):
                return None


def test_an_undecorated_handler_fails_at_class_creation():
    with pytest.raises(TypeError, match="on_step looks like an event handler but is not declared"):

        class OldStyle(Detector):
            def on_step(self):
                return None


def test_two_handlers_of_one_event_and_non_events_are_refused():
    with pytest.raises(TypeError, match="two handlers of StepEnd"):

        class Twice(Detector):
            consumes = (StepEnd,)

            @on(StepEnd)
            def _a(self, event):
                return None

            @on(StepEnd)
            def _b(self, event):
                return None

    with pytest.raises(TypeError, match="Expected @on to take an Event subclass but got 'step'"):
        on("step")  # type: ignore[arg-type]


def test_every_event_is_provided_by_a_source_or_published_by_the_guard_or_an_integration():
    from_sources = {event for source in SOURCES for event in source.provides}
    assert from_sources <= set(provided())
    assert all(issubclass(event, Event) for event in provided())


def test_every_detector_consumes_only_known_events():
    known = set(provided())
    for det in DETECTORS:
        assert det.consumes, det.code
        assert set(det.consumes) <= known, det.code
        assert set(det.handlers()) == set(det.consumes), det.code


@pytest.mark.parametrize("det", DETECTORS, ids=lambda d: d.code)
def test_no_detector_registers_a_hook_or_patches_a_function(det):
    source = inspect.getsource(inspect.getmodule(det))
    for forbidden in ("register_", "Patch(", "setattr(torch", "torch.nn.modules.module."):
        assert forbidden not in source, (det.code, forbidden)


class SchedulerWatch(Detector):
    """A detector written outside gradguard, for a signal no built-in detector needs."""

    consumes = (SchedulerStep,)

    def setup(self):
        self.seen = []

    @on(SchedulerStep)
    def _scheduler(self, event):
        self.seen.append(type(event.scheduler).__name__)


def test_a_new_signal_needs_only_a_detector_that_consumes_it():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2)
    decay = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, decay], milestones=[2])
    originals = [vars(p.owner)["step"] for p in _PATCHES]
    det = SchedulerWatch()
    x, y = tiny_data()
    with gradguard.Guard(model, opt, detectors=[det], policy="collect"):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
        seen = list(det.seen)
    assert seen == ["SequentialLR"] * 3  # the outer scheduler, once per step()
    assert [vars(p.owner)["step"] for p in _PATCHES] == originals  # put back exactly


def test_no_source_runs_for_events_nobody_consumes():
    from gradguard.sources.autograd import _BACKWARD
    from gradguard.sources.numpy import patched

    with gradguard.Guard(tiny_model(), detectors=["GG404"], policy="collect"):
        assert not _BACKWARD.active
        assert not patched()
    with gradguard.Guard(tiny_model(), detectors=["GG101", "GG501"], policy="collect"):
        assert _BACKWARD.active
        assert patched()
    assert not _BACKWARD.active
    assert not patched()


def test_integrations_publish_events_the_detectors_consume():
    from gradguard.events import EpochStart

    class Epochs(Detector):
        consumes = (EpochStart,)

        def setup(self):
            self.epochs = []

        @on(EpochStart)
        def _epoch(self, event):
            self.epochs.append((event.stage, event.epoch))

    det = Epochs()
    with gradguard.Guard(tiny_model(), detectors=[det], policy="collect") as guard:
        guard.publish(EpochStart("train", 0))
        guard.publish(EpochStart("validate", 0))
        assert det.epochs == [("train", 0), ("validate", 0)]


def test_a_detector_can_stop_and_start_listening():
    class Quiet(Detector):
        consumes = (StepEnd,)

        def setup(self):
            self.steps = []

        @on(StepEnd)
        def _end(self, event):
            self.steps.append(event.step)
            if event.step == 2:
                self.listen(StepEnd, False)

    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    det = Quiet()
    x, y = tiny_data()
    with gradguard.Guard(model, opt, detectors=[det], policy="collect"):
        for _ in range(5):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        assert det.steps == [1, 2]
        det.listen(StepEnd, True)
        opt.step()
        assert det.steps == [1, 2, 6]
    with pytest.raises(ValueError, match="Expected an event Quiet consumes but got StepPost"):
        det.listen(StepPost, False)
