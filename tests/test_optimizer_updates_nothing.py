"""GG406 optimizer-updates-nothing: an optimizer none of whose tensors ever gets a gradient."""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import pytest
import torch
from torch import nn

import gradguard
from gradguard.detectors import OptimizerUpdatesNothing
from gradguard.events import StepPost

from .helpers import line_of, tiny_trainer


def make_model():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    return nn.Sequential(OrderedDict(backbone=backbone, head=nn.Linear(8, 2)))


DATA = (torch.randn(8, 4), torch.randint(0, 2, (8,)))


def train(model, opt, steps=6, set_to_none=True):
    x, y = DATA
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(steps):
            opt.zero_grad(set_to_none=set_to_none)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return guard.findings


def test_optimizer_of_the_frozen_backbone_only_is_flagged_once():
    model = make_model()
    model.backbone.requires_grad_(False)
    # momentum, weight decay and zero-filled gradients: GG402 stays quiet, nothing has a gradient to move
    opt = torch.optim.SGD(model.backbone.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)  # <- backbone only
    findings = train(model, opt, set_to_none=False)
    assert [f.code for f in findings] == ["GG406"]  # not GG403 for the head, not GG402
    f = findings[0]
    assert f.where == "opt"
    assert os.path.abspath(f.location.file) == os.path.abspath(__file__)
    assert f.location.line == line_of("# <- backbone only")
    assert f.step == 2  # decided at the third step
    assert f.count == 1
    assert f.message.startswith("opt (SGD) updates nothing: its 1 param group holds 4 tensor(s) and none")
    assert "the trainable head.weight, head.bias are in no optimizer" in f.message
    assert f.data["parameters"] == ["backbone.0.weight", "backbone.0.bias", "backbone.2.weight", "backbone.2.bias"]
    assert (f.data["param_groups"], f.data["tensors"], f.data["requires_grad"]) == (1, 4, 0)
    assert f.data["not_in_any_optimizer"] == ["head.weight", "head.bias"]


def test_head_unfrozen_after_the_optimizer_was_made_from_nothing_trainable_is_flagged():
    model = make_model()
    model.requires_grad_(False)
    optimizer = torch.optim.Adam(  # <- made while everything is frozen
        [{"params": model.backbone[0].parameters()}, {"params": model.backbone[2].parameters(), "lr": 1e-4}]
    )
    model.head.requires_grad_(True)
    findings = train(model, optimizer)
    assert [(f.code, f.where) for f in findings] == [("GG406", "optimizer")]
    assert findings[0].location.line == line_of("# <- made while everything is frozen")
    assert "its 2 param groups hold 4 tensor(s)" in findings[0].message


class Unused(nn.Module):
    """An auxiliary head that forward never calls: trainable, but it never gets a gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 2)
        self.aux = nn.Linear(4, 2)

    def forward(self, x):
        return self.body(x)


def test_trainable_parameters_that_never_get_a_gradient_are_one_gg406_not_gg405():
    model = Unused()
    aux_opt = torch.optim.SGD(model.aux.parameters(), lr=0.1)  # <- aux only
    findings = train(model, aux_opt, steps=25)  # past GG405's window of 20 steps
    assert [(f.code, f.where) for f in findings] == [("GG406", "aux_opt")]
    f = findings[0]
    assert f.location.line == line_of("# <- aux only")
    assert "2 of them require grad but none received a gradient in 3 steps (aux.weight, aux.bias)" in f.message


def test_correct_fine_tune_reports_nothing():
    model = make_model()
    model.backbone.requires_grad_(False)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1, momentum=0.9)
    assert train(model, opt) == []


def test_one_frozen_group_and_one_trainable_group_report_nothing():
    model = make_model()
    model.backbone.requires_grad_(False)
    opt = torch.optim.SGD([{"params": model.backbone.parameters()}, {"params": model.head.parameters()}], lr=0.1)
    assert train(model, opt, steps=25) == []


def test_gan_with_each_optimizer_stepping_after_its_own_backward_reports_nothing():
    torch.manual_seed(0)
    gen, disc = nn.Linear(4, 4), nn.Linear(4, 1)
    g_opt = torch.optim.Adam(gen.parameters(), lr=1e-3)
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    with gradguard.Guard([gen, disc], [g_opt, d_opt], policy="collect") as guard:
        for step in range(12):
            z = torch.randn(8, 4)
            d_opt.zero_grad()
            (disc(gen(z).detach()).mean() - disc(z).mean()).backward()
            d_opt.step()
            if step % 3 == 0:  # the generator steps one step in three
                g_opt.zero_grad()
                (-disc(gen(z)).mean()).backward()
                g_opt.step()
    assert guard.findings == []


@pytest.mark.parametrize("kind", ["LBFGS", "SGD"])
def test_gradients_made_by_a_closure_passed_to_step_report_nothing(kind):
    model = make_model()
    params = model.parameters()
    opt = torch.optim.LBFGS(params, max_iter=2) if kind == "LBFGS" else torch.optim.SGD(params, lr=0.1)
    x, y = DATA

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(5):
            opt.step(closure)
    assert guard.findings == []


def test_gradient_accumulation_reports_nothing():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = DATA
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for micro in range(16):
            (nn.functional.cross_entropy(model(x), y) / 4).backward()
            if micro % 4 == 3:
                opt.step()
                opt.zero_grad()
    assert guard.findings == []


def test_an_optimizer_holding_only_a_replaced_layer_is_gg403s():
    model = make_model()
    model.backbone.requires_grad_(False)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    model.head = nn.Linear(8, 2)  # the optimizer holds the old head only: every step is a no-op, by GG403's mistake
    findings = train(model, opt)
    assert [f.code for f in findings] == ["GG403"]


def test_the_rule_stops_listening_to_steps_once_every_optimizer_is_decided():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    det = OptimizerUpdatesNothing()
    x, y = DATA
    with gradguard.Guard(model, opt, detectors=[det], policy="collect") as guard:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert not guard.wants(StepPost)  # decided: the detector stopped listening
        other = torch.optim.SGD(model.parameters(), lr=0.1)
        guard.add_optimizer(other)
        assert guard.wants(StepPost)  # a new optimizer to watch
    assert guard.findings == []


SCRIPT = """\
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
model[0].requires_grad_(False)
opt = torch.optim.Adam(model[0].parameters(), lr=0.01)
x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
for i in range(5):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
"""


def test_frozen_optimizer_through_gradguard_run(write_script, run_cli, tmp_path):
    write_script(SCRIPT)
    proc = run_cli("run", "--json", "out.json", "--policy", "collect", "train.py")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert [(f["code"], f["where"]) for f in report["findings"]] == [("GG406", "opt")]
    found = report["findings"][0]
    assert found["location"] == {"file": "train.py", "line": 7, "function": "<module>"}
    assert found["data"]["parameters"] == ["0.weight", "0.bias"]
    assert found["data"]["not_in_any_optimizer"] == ["2.weight", "2.bias"]


@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning")
def test_frozen_optimizer_in_configure_optimizers_through_the_lightning_callback():
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    from gradguard.lightning import GradGuardCallback

    class FrozenFineTune(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.backbone = nn.Linear(4, 8)
            self.head = nn.Linear(8, 1)
            self.backbone.requires_grad_(False)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.head(self.backbone(x)), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.backbone.parameters(), lr=0.01)  # <- the frozen part

    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    callback = GradGuardCallback(policy="collect")
    tiny_trainer([callback], limit_train_batches=4).fit(FrozenFineTune(), loader)
    assert [(f.code, f.where) for f in callback.findings] == [("GG406", "SGD")]
    f = callback.findings[0]
    assert os.path.abspath(f.location.file) == os.path.abspath(__file__)
    assert f.location.line == line_of("# <- the frozen part")
    assert "the trainable head.weight, head.bias are in no optimizer" in f.message
