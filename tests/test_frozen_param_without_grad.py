"""GG405 param-without-grad: trainable parameters that never receive a gradient."""

import json
import os

import pytest
import torch
from torch import nn

import gradguard
from gradguard.detectors import ParamWithoutGrad


class DetachedNet(nn.Module):
    def __init__(self, detach_after=0):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.scale = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 2)
        self.detach_after = detach_after
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        scale = self.scale if self.calls <= self.detach_after else self.scale.detach()
        return self.head(self.embed(x) * scale)


DATA = (torch.randn(8, 4), torch.randint(0, 2, (8,)))


def line_of(marker):
    with open(__file__) as fh:
        return next(i for i, text in enumerate(fh, 1) if marker in text and "line_of(" not in text)


def train(model, opt, steps, set_to_none=True):
    x, y = DATA
    for _ in range(steps):
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()  # marker: step


def test_parameter_used_through_detach_is_flagged_after_the_window():
    model = DetachedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, detectors=[ParamWithoutGrad], policy="collect") as guard:
        train(model, opt, steps=19)
        assert guard.findings == []  # not before the window is full
        train(model, opt, steps=5)
    assert [f.code for f in guard.findings] == ["GG405"]
    f = guard.findings[0]
    assert f.where == "scale"
    assert os.path.abspath(f.location.file) == os.path.abspath(__file__)
    assert f.location.line == line_of("marker: step")
    assert f.count == 1


def test_gradients_stopping_with_kept_grad_tensors_are_flagged():
    # zero_grad(set_to_none=False): .grad stays a tensor, a hook tells what backward reached
    model = DetachedNet(detach_after=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, detectors=[ParamWithoutGrad(window=5)], policy="collect") as guard:
        train(model, opt, steps=12, set_to_none=False)
    assert [(f.code, f.where) for f in guard.findings] == [("GG405", "scale")]
    assert guard.findings[0].step == 7  # at the 8th step: 3 with a gradient, then 5 without


def test_kept_grad_tensors_that_keep_receiving_gradients_are_not_flagged():
    model = DetachedNet(detach_after=10**6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, detectors=[ParamWithoutGrad(window=3)], policy="collect") as guard:
        train(model, opt, steps=10, set_to_none=False)
    assert guard.findings == []


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 8)
        self.heads = nn.ModuleList([nn.Linear(8, 2), nn.Linear(8, 2)])

    def forward(self, x, task):
        return self.heads[task](torch.relu(self.trunk(x)))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_two_heads_trained_on_alternating_steps_are_not_flagged(set_to_none):
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = DATA
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for step in range(30):
            opt.zero_grad(set_to_none=set_to_none)
            nn.functional.cross_entropy(model(x, step % 2), y).backward()
            opt.step()
    assert guard.findings == []


def test_report_holds_the_trainable_and_frozen_summary():
    model = TwoHeads()
    model.trunk.requires_grad_(False)
    opt = torch.optim.SGD(model.heads.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        pass
    summary = guard.to_dict()["detectors"]["GG405"]["parameters"]["TwoHeads"]
    assert summary == {
        "trunk": {"trainable": 0, "frozen": 40, "trainable_tensors": 0, "frozen_tensors": 2},
        "heads": {"trainable": 36, "frozen": 0, "trainable_tensors": 4, "frozen_tensors": 0},
    }
    assert guard.findings == []  # a summary, never a finding


def test_window_is_checked():
    with pytest.raises(ValueError, match="Expected window to be a positive int but got 0"):
        ParamWithoutGrad(window=0)


SCRIPT = """\
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.scale = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.embed(x) * self.scale.detach())


torch.manual_seed(0)
model = Net()
opt = torch.optim.Adam(model.parameters(), lr=0.01)
x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
for i in range(25):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
"""


def test_detached_parameter_through_gradguard_run(write_script, run_cli, tmp_path):
    write_script(SCRIPT)
    proc = run_cli("run", "--json", "out.json", "--policy", "collect", "train.py")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    found = [f for f in report["findings"] if f["code"] == "GG405"]
    assert len(found) == 1
    assert found[0]["where"] == "scale"
    assert found[0]["location"]["file"] == "train.py"
    assert found[0]["location"]["line"] == 23
    assert [f["code"] for f in report["findings"]] == ["GG405"]
    assert report["detectors"]["GG405"]["parameters"]["Net"]["(own)"]["trainable"] == 8
