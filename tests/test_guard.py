import dataclasses
import gc
import json
import warnings
import weakref

import pytest
import torch
from torch import nn

import gradguard
from gradguard import ConfigurationError, Detector, Guard
from gradguard.detector import on
from gradguard.detectors import DETECTORS
from gradguard.events import BackwardPost, ModelAdded, StepEnd
from gradguard.guard import active_guards


def _train(model, opt, steps=3, reset=True):
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    for _ in range(steps):
        if reset:
            opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _hook_counts(model, opt):
    counts = [len(model._forward_pre_hooks), len(model._forward_hooks)]
    counts += [len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)]
    for p in model.parameters():
        counts += [len(p._backward_hooks or {}), len(p._post_accumulate_grad_hooks or {})]
    return counts


def _global_hook_counts():
    from torch.nn.modules import module
    from torch.optim import optimizer

    return [
        len(module._global_forward_pre_hooks),
        len(module._global_forward_hooks),
        len(optimizer._global_optimizer_pre_hooks),
        len(optimizer._global_optimizer_post_hooks),
    ]


class Boom(Detector):
    """GG101 test double: fails on its second step."""

    code = "GG101"
    name = "missing-zero-grad"
    consumes = (ModelAdded, StepEnd)

    def setup(self):
        self.calls = 0

    @on(ModelAdded)
    def _model(self, event):
        return None

    @on(StepEnd)
    def _step(self, event):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom")


def test_lists_of_models_and_optimizers_are_watched():
    a, b = nn.Linear(3, 1), nn.Linear(3, 1)
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    with Guard([a, b], [oa, ob], policy="collect") as guard:
        assert guard.models() == [a, b]
        assert guard.optimizers() == [oa, ob]
        _train(a, oa, steps=2)
        _train(b, ob, steps=3)
    assert guard.step == 3  # the step counter is the furthest optimizer's
    assert guard.iteration == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "not a model"}, "model"),
        ({"model": [nn.Linear(1, 1), 3]}, "model"),
        ({"optimizer": nn.Linear(1, 1)}, "optimizer"),
        ({"policy": "explode"}, "policy"),
        ({"detectors": ["GG999"]}, "detector"),
        ({"detectors": [42]}, "detectors"),
        ({"detectors": ["GG101", "missing-zero-grad"]}, "once"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        Guard(**kwargs)


def test_every_hook_is_removed_on_exit():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _hook_counts(model, opt)
    with Guard(model, opt, policy="collect"):
        _train(model, opt)
        assert _hook_counts(model, opt) != before
    assert _hook_counts(model, opt) == before


def test_install_uses_global_hooks_and_removes_them():
    before = _global_hook_counts()
    guard = gradguard.install(policy="collect")
    try:
        assert _global_hook_counts() != before
        assert gradguard.install() is guard  # joins the guard installed
        assert gradguard.uninstall() is guard
        assert gradguard.installed() is guard
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _train(model, opt, steps=3, reset=False)
        assert guard.models() == [model]  # the root module, found at its first forward
        assert guard.optimizers() == [opt]  # found at its first step
    finally:
        assert gradguard.uninstall() is guard
    assert _global_hook_counts() == before
    assert [f.code for f in guard.findings] == ["GG101"]
    assert gradguard.uninstall() is None


def test_the_guard_keeps_no_reference_to_model_optimizer_or_tensors():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    refs = [weakref.ref(model), weakref.ref(opt), weakref.ref(model.weight)]
    with Guard(model, opt, policy="collect") as guard:
        _train(model, opt, reset=False)
    refs.append(weakref.ref(model.weight.grad))
    del model, opt
    gc.collect()
    assert [r() for r in refs] == [None] * 4
    assert guard.findings  # what was found outlives the model
    assert guard not in active_guards()


def test_report_holds_every_field(tmp_path):
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "sub" / "report.json"
    with Guard(model, opt, policy="collect", json_path=path) as guard:
        _train(model, opt, steps=3, reset=False)
    report = json.loads(path.read_text())
    assert report == json.loads(json.dumps(guard.to_dict())) | {"created": report["created"]}
    assert report["version"] == 1
    assert report["summary"]["steps"] == 3
    assert report["summary"]["overhead_s"] >= 0
    assert report["summary"]["by_severity"]["warning"] == 1
    (finding,) = report["findings"]
    fields = {"code", "name", "severity", "message", "hint", "location", "where", "step", "count", "data", "ranks"}
    assert set(finding) == fields
    assert report["environment"]["torch"] == torch.__version__


def test_a_failing_detector_is_disabled_and_reported_once_and_training_goes_on():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as record, Guard(model, opt, detectors=[Boom], policy="raise") as guard:
        warnings.simplefilter("always")
        _train(model, opt, steps=5)
        boom = guard.detector("GG101")
        assert boom is not None
        assert not boom.attached
        assert all(len(p._post_accumulate_grad_hooks or {}) == 0 for p in model.parameters())
    (finding,) = guard.findings
    assert finding.code == "GG000"
    assert finding.name == "internal-error"
    assert finding.where == "GG101 missing-zero-grad"
    assert "RuntimeError: boom" in finding.data["traceback"]
    assert finding.step == 2
    assert [str(w.message)[:5] for w in record] == ["GG000"]
    assert guard.step == 5


def test_a_failing_hook_is_caught_too():
    class BadHook(Boom):
        consumes = (ModelAdded, StepEnd, BackwardPost)

        @on(BackwardPost)
        def _after_backward(self, event):
            raise ValueError("bad hook")

    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Guard(model, opt, detectors=[BadHook()], policy="collect") as guard:
        _train(model, opt, steps=3)
    assert [f.code for f in guard.findings] == ["GG000"]
    assert "bad hook" in guard.findings[0].message


def test_findings_with_the_same_code_and_place_are_merged():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Guard(model, opt, policy="collect") as guard:
        _train(model, opt, steps=6, reset=False)
    (finding,) = guard.findings
    assert finding.count == 5


def test_select_and_ignore_choose_the_detectors():
    assert [d.code for d in Guard(select="GG1").detectors] == ["GG101", "GG102"]
    assert Guard(ignore="missing-zero-grad").detector("GG101") is None
    assert [d.code for d in Guard().detectors] == [d.code for d in DETECTORS]


def test_a_guard_attaches_once():
    guard = Guard(policy="collect")
    with guard:
        with pytest.raises(RuntimeError, match="already attached"):
            guard.attach()
        assert active_guards() == [guard]
    with pytest.raises(RuntimeError, match="attaches once"):
        guard.attach()


def test_state_dict_round_trips_without_mutating_its_input():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Guard(model, opt, policy="collect") as guard:
        _train(model, opt, steps=3, reset=False)
    state = guard.state_dict()
    frozen = json.dumps(state, sort_keys=True)
    other = Guard(policy="collect")
    other.load_state_dict(state)
    assert json.dumps(state, sort_keys=True) == frozen
    assert other.step == 3
    assert [f.to_dict() for f in other.findings] == [f.to_dict() for f in guard.findings]
    with pytest.raises(ConfigurationError):
        other.load_state_dict({"version": 99})


def test_reading_a_frames_variables_never_empties_a_locals_dict_the_user_holds():
    import sys

    from gradguard.introspect.frames import frame_variables

    def user():
        hparams = locals()  # the user's own handle on the frame's snapshot
        lr = 0.1
        seen = dict(frame_variables(sys._getframe()))
        return hparams, seen, lr

    hparams, seen, lr = user()
    assert seen["lr"] == lr
    assert hparams["lr"] == lr  # refreshed by the read, and not emptied afterwards


def test_a_model_freed_while_the_guard_is_attached_is_collected():
    refs = []

    def train_once():
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        refs.extend(weakref.ref(obj) for obj in (model, model[0].weight, opt))
        for _ in range(6):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()

    guard = gradguard.Guard(global_hooks=True, policy="collect").attach()
    try:
        train_once()
        gc.collect()
        assert [ref() is None for ref in refs] == [True, True, True]
    finally:
        guard.detach()


def test_a_resumed_run_warns_again_once_about_a_mistake_still_there():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 4)

    def train(steps):
        for _ in range(steps):
            model(x).pow(2).mean().backward()  # no zero_grad(): GG101 at each step
            opt.step()

    with Guard(model, opt, detectors=["GG101"], policy="collect") as first:
        train(4)
    checkpoint = first.state_dict()
    resumed = Guard(model, opt, detectors=["GG101"], policy="warn")
    resumed.load_state_dict(checkpoint)
    with pytest.warns(gradguard.FindingWarning, match="GG101") as warned, resumed:
        train(4)
    assert len([w for w in warned if "GG101" in str(w.message)]) == 1  # once, not at every step
    (finding,) = resumed.findings
    assert finding.count == 2 * first.findings[0].count  # as often as in the first run


def test_a_restored_finding_that_does_not_happen_again_stays_silent():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 4)
    with Guard(model, opt, detectors=["GG101"], policy="collect") as first:
        for _ in range(3):
            model(x).pow(2).mean().backward()
            opt.step()
    resumed = Guard(model, opt, detectors=["GG101"], policy="raise")
    resumed.load_state_dict(first.state_dict())
    with resumed:
        for _ in range(3):
            opt.zero_grad()  # fixed
            model(x).pow(2).mean().backward()
            opt.step()
    assert [f.count for f in resumed.findings] == [first.findings[0].count]


def test_a_revision_that_raises_info_to_a_warning_is_warned_then():
    from gradguard.events import StepEnd
    from gradguard.findings import Revision, Severity

    class Escalates(Detector):
        code, name = "GG301", "memory-growth"
        consumes = (StepEnd,)

        def setup(self):
            self.first = None

        @on(StepEnd)
        def _end(self, event):
            if event.step == 1:
                self.first = self.finding("grows, unexplained", where="rss")
                return [dataclasses.replace(self.first, severity=Severity.INFO)]
            if event.step == 3:
                return [Revision(self.first, {"severity": Severity.WARNING, "message": "kept growing"})]
            return None

    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Guard(model, opt, detectors=[Escalates()], policy="warn") as guard:
            for step in range(4):
                opt.zero_grad()
                model(torch.ones(1, 2)).sum().backward()
                opt.step()
                assert len([w for w in caught if "GG301" in str(w.message)]) == (1 if step >= 2 else 0)
    (finding,) = guard.findings
    assert finding.severity == "warning"
    assert "kept growing" in str(caught[-1].message)


def test_install_passes_over_modules_that_were_never_initialised():
    # A failed unpickling leaves modules made by __new__ alone on the heap; for a compiled
    # wrapper, every attribute lookup on one recurses without end.
    from torch._dynamo.eval_frame import OptimizedModule

    broken = [OptimizedModule.__new__(OptimizedModule), nn.Linear.__new__(nn.Linear)]
    guard = gradguard.install(policy="collect")
    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _train(model, opt, steps=3, reset=False)
    finally:
        gradguard.uninstall()
    assert [f.code for f in guard.findings] == ["GG101"]  # no GG000: the source kept working
    del broken  # alive on the heap until here
