"""GG401 requires-grad-typo: misspelt requires_grad assignments on parameters."""

import importlib
import json
import os
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

import gradguard
from gradguard.detectors import RequiresGradTypo
from gradguard.detectors.requires_grad_typo import is_near_miss
from gradguard.events import StepEnd
from gradguard.sources import attributes
from gradguard.sources.attributes import watched

from .helpers import line_of


def make_model():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    return nn.Sequential(OrderedDict(backbone=backbone, head=nn.Linear(8, 2)))


def train(model, opt, steps=3):
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_typo_on_backbone_is_flagged_with_its_line_and_parameters():
    model = make_model()
    for p in model.backbone.parameters():
        p.requres_grad = False  # marker: typo-guard
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, detectors=[RequiresGradTypo], policy="collect") as guard:
        train(model, opt)
    assert [f.code for f in guard.findings] == ["GG401"]
    f = guard.findings[0]
    assert f.where == "backbone.0.weight, backbone.0.bias, backbone.2.weight and 1 more"
    assert os.path.abspath(f.location.file) == os.path.abspath(__file__)
    assert f.location.line == line_of("marker: typo-guard")
    assert f.data["attribute"] == "requres_grad"
    assert f.data["num_parameters"] == 4
    assert "stay trainable" in f.message
    assert all(p.requires_grad for p in model.backbone.parameters())  # the typo froze nothing


def test_typo_set_after_attach_is_caught_at_the_first_steps():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, detectors=[RequiresGradTypo], policy="collect") as guard:
        model.head.weight.require_grad = False  # marker: typo-late
        train(model, opt)
    assert [(f.code, f.where) for f in guard.findings] == [("GG401", "head.weight")]
    assert guard.findings[0].location.line == line_of("marker: typo-late")


def run_steps(model, opt, steps, changes=None):
    """Train under a guard whose warm-up is 2 steps; ``changes[step](model, guard)`` runs before that step."""
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    budget = gradguard.Budget(warmup=2)
    with gradguard.Guard(model, opt, detectors=[RequiresGradTypo], policy="collect", budget=budget) as guard:
        for step in range(steps):
            if changes and step in changes:
                changes[step](model, guard)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return guard


def test_a_freeze_misspelt_at_step_5_after_the_warm_up_is_caught_when_it_runs():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    budget = gradguard.Budget(warmup=2)  # the first steps' look at every parameter is over by step 5
    with gradguard.Guard(model, opt, detectors=[RequiresGradTypo], policy="collect", budget=budget) as guard:
        assert "requres_grad" in watched()  # this file assigns it: its stores are watched
        for step in range(8):
            if step == 5:
                for p in model.backbone.parameters():
                    p.requres_grad = False  # typo-at-step-5
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert [(f.code, f.where, f.step) for f in guard.findings] == [
        ("GG401", "backbone.0.weight, backbone.0.bias, backbone.2.weight and 1 more", 6)
    ]
    f = guard.findings[0]
    assert os.path.abspath(f.location.file) == os.path.abspath(__file__)
    assert f.location.line == line_of("# typo-at-step-5")
    assert f.data["num_parameters"] == 4
    assert watched() == []  # the descriptor left with the guard
    assert "requres_grad" not in vars(torch.Tensor)


def _freeze_head(model, guard):
    for p in model.head.parameters():
        p.require_grad = False  # typo-in-a-function


def test_a_misspelt_freeze_in_a_function_of_the_program_is_reported_at_its_line():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = run_steps(model, opt, steps=6, changes={4: _freeze_head})
    assert [(f.code, f.where) for f in guard.findings] == [("GG401", "head.weight, head.bias")]
    assert guard.findings[0].location.line == line_of("# typo-in-a-function")
    assert guard.findings[0].location.function == "_freeze_head"


def _freeze_backbone(how):
    def freeze(model, guard):
        if how == "module.requires_grad_":
            model.backbone.requires_grad_(False)
        for p in model.backbone.parameters():
            if how == "p.requires_grad_":
                p.requires_grad_(False)
            elif how == "p.requires_grad":
                p.requires_grad = False

    return freeze


def _unfreeze(model, guard):
    for p in model.parameters():
        p.requires_grad = True


@pytest.mark.parametrize("how", ["module.requires_grad_", "p.requires_grad_", "p.requires_grad"])
def test_a_correct_schedule_that_freezes_then_unfreezes_reports_nothing(how):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard = run_steps(model, opt, steps=9, changes={1: _freeze_backbone(how), 5: _freeze_backbone(how), 7: _unfreeze})
    assert guard.findings == []
    assert all(p.requires_grad for p in model.parameters())


def test_a_program_that_misspells_nothing_watches_nothing_and_is_not_looked_at_after_the_warm_up(monkeypatch):
    monkeypatch.setattr(attributes, "program_files", lambda: [])  # as if no file assigned a near miss
    seen = {}

    def look(model, guard):
        seen["watched"] = watched()
        seen["at step end"] = [type(det).__name__ for det, _ in guard.run.schedule.table(5).get(StepEnd, ())]

    model = make_model()
    guard = run_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=5, changes={4: look})
    assert guard.findings == []
    assert seen == {"watched": [], "at step end": []}


FREEZING_MODULE = """\
def freeze(module):
    for p in module.parameters():
        p.requires_grad_ = False
"""


def test_a_module_imported_later_is_read_and_the_method_it_shadows_still_works(tmp_path, monkeypatch):
    (tmp_path / "gg401_freezing.py").write_text(FREEZING_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    found_at = {}
    try:
        with gradguard.Guard(
            model, opt, detectors=[RequiresGradTypo], policy="collect", budget=gradguard.Budget(warmup=2)
        ) as guard:
            for step in range(1, 13):
                if step == 4:
                    import gg401_freezing  # imported, then used, between two looks for new files

                    gg401_freezing.freeze(model.backbone)
                if step == 10:
                    assert "requires_grad_" in watched()
                    gg401_freezing.freeze(model.head)  # watched now: seen as it runs
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                for f in guard.findings:
                    found_at.setdefault(f.where, step)
            other = nn.Linear(2, 2).requires_grad_(False)  # the method still answers while the name is watched
            assert not other.weight.requires_grad
    finally:
        sys.modules.pop("gg401_freezing", None)
    [f] = guard.findings
    assert list(found_at) == ["backbone.0.weight, backbone.0.bias, backbone.2.weight and 1 more"]
    assert 8 <= found_at[f.where] <= 9  # at the guard's next look for new files (every 8th step), or the step after
    assert (os.path.basename(f.location.file), f.location.line) == ("gg401_freezing.py", 3)
    assert f.data["num_parameters"] == 6  # the later call on the head grew the same finding
    assert "head.bias" in f.data["parameters"]
    assert torch.Tensor.requires_grad_ is vars(torch._C.TensorBase)["requires_grad_"]
    assert "requires_grad_" not in vars(torch.Tensor)


def test_no_name_is_watched_when_no_detector_consumes_assignments():
    model = make_model()
    with gradguard.Guard(model, detectors=["GG404"], policy="collect"):
        assert watched() == []
    with gradguard.Guard(model, detectors=["GG401"], policy="collect"):
        assert "requres_grad" in watched()
        with gradguard.Guard(make_model(), detectors=["GG401"], policy="collect"):
            pass
        assert "requres_grad" in watched()  # the outer guard still needs it
    assert watched() == []


def test_a_watched_name_behaves_as_a_plain_attribute():
    t = torch.zeros(2)
    with gradguard.Guard(make_model(), detectors=[RequiresGradTypo], policy="collect") as guard:
        assert "requres_grad" in vars(torch.Tensor)
        assert not hasattr(t, "requres_grad")
        t.requres_grad = "x"  # not a parameter: nothing to report
        assert (t.requres_grad, t.__dict__) == ("x", {"requres_grad": "x"})
        del t.requres_grad
        assert not hasattr(t, "requres_grad")
        with pytest.raises(AttributeError, match="'Tensor' object has no attribute 'requres_grad'"):
            t.requres_grad  # noqa: B018
    assert guard.findings == []


@pytest.mark.parametrize(
    "name",
    ["requres_grad", "require_grad", "requires_grads", "requiresgrad", "requieres_grad", "required_grad",
     "Requires_Grad", "REQUIRES_GRAD", "requries_grad", "reqiures_grad", "requires_grad_"],
)  # fmt: skip
def test_near_misses(name):
    assert is_near_miss(name)


@pytest.mark.parametrize(
    "name", ["requires_grad", "retains_grad", "grad", "sharded", "_is_param", "requires_grad_sync_enabled", "no_decay"]
)
def test_not_near_misses(name):
    assert not is_near_miss(name)


def test_correct_spellings_and_harmless_assignments_are_not_flagged():
    model = make_model()
    model.backbone.requires_grad_(False)
    model.head.bias.requires_grad = True
    model.head.weight.requres_grad = True  # asks for what is already true: harmless
    model.head.weight.no_decay = True  # an unrelated user attribute
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        model.backbone.eval()
        train(model, opt)
    assert not [f for f in guard.findings if f.code == "GG401"]


def test_state_dict_round_trip():
    det = RequiresGradTypo()
    model = make_model()
    model.head.bias.requires_grads = False
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, detectors=[det], policy="collect"):
        train(model, opt, steps=1)
    state = det.state_dict()
    assert state == {"flagged": ["requires_grads head.bias"]}
    fresh = RequiresGradTypo()
    fresh.load_state_dict(state)
    assert fresh.flagged == state["flagged"]


SCRIPT = """\
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 2))
for p in model[0].parameters():
    p.requires_grads = False
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
for step in range(40):
    if step == 35:  # after the warm-up of 32 steps
        for p in model[1].parameters():
            p.requres_grad = False
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
"""


def test_typo_through_gradguard_run(write_script, run_cli, tmp_path):
    write_script(SCRIPT)
    proc = run_cli("run", "--json", "out.json", "--policy", "collect", "train.py")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    found = [(f["where"], f["location"]["file"], f["location"]["line"], f["step"]) for f in report["findings"]]
    assert found == [
        ("0.0.weight, 0.0.bias", "train.py", 7, 0),  # before the loop: seen when the model is found
        ("1.weight, 1.bias", "train.py", 13, 36),  # inside the loop, after the warm-up: seen as it runs
    ]
    assert {f["code"] for f in report["findings"]} == {"GG401"}
