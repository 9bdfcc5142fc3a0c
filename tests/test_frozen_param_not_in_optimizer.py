"""GG403 param-not-in-optimizer: parameters with gradients that no optimizer owns."""

import json
import os
from collections import OrderedDict

import torch
from torch import nn

import gradguard
from gradguard.detectors import ParamNotInOptimizer


def make_model():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    return nn.Sequential(OrderedDict(backbone=backbone, fc=nn.Linear(8, 2)))


DATA = (torch.randn(8, 4), torch.randint(0, 2, (8,)))


def line_of(marker):
    with open(__file__) as fh:
        return next(i for i, text in enumerate(fh, 1) if marker in text and "line_of(" not in text)


def train(model, opts, steps=5):
    x, y = DATA
    for _ in range(steps):
        for opt in opts:
            opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for opt in opts:
            opt.step()  # marker: step


def test_head_replaced_after_the_optimizer_is_flagged():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.init.zeros_(model.fc.bias)
    model.fc = nn.Linear(8, 2)
    nn.init.zeros_(model.fc.bias)  # equal in value to the old bias: identity tells them apart
    with gradguard.Guard(model, opt, detectors=[ParamNotInOptimizer], policy="collect") as guard:
        train(model, [opt])
    assert [f.code for f in guard.findings] == ["GG403"]
    f = guard.findings[0]
    assert f.where == "fc.weight, fc.bias"
    assert os.path.abspath(f.location.file) == os.path.abspath(__file__)
    assert f.location.line == line_of("marker: step")
    assert f.data["optimizers"] == ["SGD"]


def test_a_layer_replaced_under_the_guard_is_one_gg403_naming_the_old_tensors_by_their_path():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        model.fc = nn.Linear(8, 2)  # the guard records the old fc's names before it goes
        train(model, [opt], steps=25)  # past GG405's window: the old tensors get no gradient, but are GG403's
    assert [f.code for f in guard.findings] == ["GG403"]
    f = guard.findings[0]
    assert f.where == "fc.weight, fc.bias"
    assert f.data["replaced"] == ["fc.weight", "fc.bias"]
    assert f.message.endswith("no longer in the model, of the layer(s) replaced: fc.weight, fc.bias")


def test_a_layer_replaced_before_the_guard_is_one_gg403():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.fc = nn.Linear(8, 2)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        train(model, [opt], steps=25)
    assert [(f.code, f.where) for f in guard.findings] == [("GG403", "fc.weight, fc.bias")]
    assert len(guard.findings[0].data["replaced"]) == 2  # unnamed: the guard never saw them in the model


def test_parameters_of_an_unwatched_optimizer_are_not_flagged():
    # the guard knows only one optimizer; the head's own optimizer updates it
    model = make_model()
    opt = torch.optim.SGD(model.backbone.parameters(), lr=0.1)
    head_opt = torch.optim.SGD(model.fc.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, detectors=[ParamNotInOptimizer], policy="collect") as guard:
        train(model, [opt, head_opt])
    assert guard.findings == []


def test_no_optimizer_known_means_hand_written_updates_are_legit():
    model = make_model()
    x, y = DATA
    with gradguard.Guard(model, detectors=[ParamNotInOptimizer], policy="collect") as guard:
        for _ in range(5):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
    assert guard.findings == []


def test_all_parameters_in_the_optimizer_is_not_flagged():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        train(model, [opt])
    assert not [f for f in guard.findings if f.code == "GG403"]


SCRIPT = """\
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model[2] = nn.Linear(8, 3)
x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
for i in range(5):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
"""


def test_head_replaced_through_gradguard_run(write_script, run_cli, tmp_path):
    write_script(SCRIPT)
    proc = run_cli("run", "--json", "out.json", "--policy", "collect", "train.py")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    found = [f for f in report["findings"] if f["code"] == "GG403"]
    assert len(found) == 1
    assert found[0]["where"] == "2.weight, 2.bias"
    assert found[0]["location"]["file"] == "train.py"
    assert found[0]["location"]["line"] == 12
    assert found[0]["data"]["replaced"] == ["2.weight", "2.bias"]  # named before the model was first called
