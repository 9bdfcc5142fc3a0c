"""GG401 requires-grad-typo: misspelt requires_grad assignments on parameters."""

import json
import os
from collections import OrderedDict

import pytest
import torch
from torch import nn

import gradguard
from gradguard.detectors import RequiresGradTypo
from gradguard.detectors.requires_grad_typo import is_near_miss


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


def line_of(marker):
    with open(__file__) as fh:
        return next(i for i, text in enumerate(fh, 1) if marker in text and "line_of(" not in text)


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
for _ in range(3):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
"""


def test_typo_through_gradguard_run(write_script, run_cli, tmp_path):
    write_script(SCRIPT)
    proc = run_cli("run", "--json", "out.json", "--policy", "collect", "train.py")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    found = [f for f in report["findings"] if f["code"] == "GG401"]
    assert len(found) == 1
    assert found[0]["where"] == "0.0.weight, 0.0.bias"
    assert found[0]["location"]["file"] == "train.py"
    assert found[0]["location"]["line"] == 7
