"""GG402 frozen-param-updated: optimizer steps that move frozen parameters."""

import json
import os
from collections import OrderedDict

import pytest
import torch
from torch import nn

import gradguard
from gradguard.detectors import FrozenParamUpdated


def make_model():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    return nn.Sequential(OrderedDict(backbone=backbone, head=nn.Linear(8, 2)))


DATA = (torch.randn(8, 4), torch.randint(0, 2, (8,)))


def line_of(marker):
    with open(__file__) as fh:
        return next(i for i, text in enumerate(fh, 1) if marker in text and "line_of(" not in text)


def freeze_mid_training(model, opt, *, set_to_none, steps=6, freeze_at=3):
    x, y = DATA
    for i in range(steps):
        if i == freeze_at:
            model.backbone.requires_grad_(False)
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()  # marker: step


def test_frozen_mid_training_with_momentum_weight_decay_and_kept_grads_is_flagged():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    frozen_before = None
    with gradguard.Guard(model, opt, detectors=[FrozenParamUpdated], policy="collect") as guard:
        freeze_mid_training(model, opt, set_to_none=False, steps=4)
        frozen_before = [p.detach().clone() for p in model.backbone.parameters()]
        freeze_mid_training(model, opt, set_to_none=False, steps=1, freeze_at=-1)
    # the check is true: the frozen weights did move
    assert any(not torch.equal(a, b) for a, b in zip(frozen_before, model.backbone.parameters(), strict=True))
    assert [f.code for f in guard.findings] == ["GG402"]
    f = guard.findings[0]
    assert f.where == "backbone.0.weight, backbone.0.bias, backbone.2.weight and 1 more"
    assert os.path.abspath(f.location.file) == os.path.abspath(__file__)
    assert f.location.line == line_of("marker: step")
    assert f.step == 3
    assert f.data["optimizer"] == "SGD"
    assert "weight_decay=0.0001" in f.message
    assert "momentum_buffer" in f.message
    assert "zero_grad(set_to_none=False)" in f.message


def test_state_made_before_freezing_alone_is_named_as_the_cause():
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with gradguard.Guard(model, opt, detectors=[FrozenParamUpdated], policy="collect") as guard:
        freeze_mid_training(model, opt, set_to_none=False)
    assert [f.code for f in guard.findings] == ["GG402"]
    assert "exp_avg" in guard.findings[0].message
    assert "weight_decay" not in guard.findings[0].message


def test_fused_optimizer_is_reported_from_metadata():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    with gradguard.Guard(model, opt, detectors=[FrozenParamUpdated], policy="collect") as guard:
        freeze_mid_training(model, opt, set_to_none=False)
    assert [(f.code, f.data["optimizer"]) for f in guard.findings] == [("GG402", "AdamW")]


@pytest.mark.parametrize(
    ("make_opt", "set_to_none"),
    [
        # zero_grad() sets frozen grads to None: the optimizer skips them
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4), True),
        (lambda ps: torch.optim.AdamW(ps, lr=0.01), True),
        # plain SGD adds a zero gradient: a write that changes nothing
        (lambda ps: torch.optim.SGD(ps, lr=0.1), False),
    ],
)
def test_harmless_freezing_is_not_flagged(make_opt, set_to_none):
    model = make_model()
    opt = make_opt(model.parameters())
    with gradguard.Guard(model, opt, policy="collect") as guard:
        freeze_mid_training(model, opt, set_to_none=set_to_none)
        before = [p.detach().clone() for p in model.backbone.parameters()]
        freeze_mid_training(model, opt, set_to_none=set_to_none, steps=2, freeze_at=-1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone.parameters(), strict=True))
    assert not [f for f in guard.findings if f.code == "GG402"]


SCRIPT = """\
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
for i in range(6):
    if i == 3:
        model[0].requires_grad_(False)
    opt.zero_grad(set_to_none=False)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
"""


def test_frozen_param_updated_through_gradguard_run(write_script, run_cli, tmp_path):
    write_script(SCRIPT)
    proc = run_cli("run", "--json", "out.json", "--policy", "collect", "train.py")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    found = [f for f in report["findings"] if f["code"] == "GG402"]
    assert len(found) == 1
    assert found[0]["where"] == "0.0.weight, 0.0.bias"
    assert found[0]["location"] == {"file": "train.py", "line": 13, "function": "<module>"}
    assert found[0]["step"] == 3  # counted before the step that did it
