"""GG404 frozen-norm-stats-updating: frozen normalisation layers left in train mode."""

import json
import os
from collections import OrderedDict

import torch
from torch import nn

import gradguard
from gradguard.detectors import FrozenNormStats


def make_model(affine=True):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, affine=affine), nn.ReLU())
    return nn.Sequential(OrderedDict(backbone=backbone, head=nn.Linear(8, 2)))


DATA = (torch.randn(8, 4), torch.randint(0, 2, (8,)))


def line_of(marker):
    with open(__file__) as fh:
        return next(i for i, text in enumerate(fh, 1) if marker in text and "line_of(" not in text)


def train(model, opt, steps=3, eval_backbone=False):
    x, y = DATA
    for _ in range(steps):
        model.train()
        if eval_backbone:
            model.backbone.eval()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()  # marker: step


def test_frozen_backbone_with_batchnorm_in_train_mode_is_flagged():
    model = make_model()
    model.backbone.requires_grad_(False)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    stats = model.backbone[1].running_mean.clone()
    with gradguard.Guard(model, opt, detectors=[FrozenNormStats], policy="collect") as guard:
        train(model, opt)
    assert not torch.equal(stats, model.backbone[1].running_mean)  # the stats really moved
    assert [f.code for f in guard.findings] == ["GG404"]
    f = guard.findings[0]
    assert f.where == "backbone.1"
    assert os.path.abspath(f.location.file) == os.path.abspath(__file__)
    assert f.location.line == line_of("marker: step")
    assert f.count == 1  # reported once, not every step


def test_batchnorm_without_affine_inside_a_frozen_module_is_flagged():
    model = make_model(affine=False)
    model.backbone.requires_grad_(False)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, detectors=[FrozenNormStats], policy="collect") as guard:
        train(model, opt)
    assert [(f.code, f.where) for f in guard.findings] == [("GG404", "backbone.1")]


def test_frozen_backbone_in_eval_mode_is_not_flagged():
    model = make_model()
    model.backbone.requires_grad_(False)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        train(model, opt, steps=25, eval_backbone=True)
    assert guard.findings == []


def test_trainable_batchnorm_is_not_flagged():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, detectors=[FrozenNormStats], policy="collect") as guard:
        train(model, opt)
    assert guard.findings == []


SCRIPT = """\
import torch
from torch import nn

torch.manual_seed(0)
backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
model = nn.Sequential(backbone, nn.Linear(8, 2))
backbone.requires_grad_(False)
opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
model.train()
for i in range(3):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
"""


def test_frozen_batchnorm_through_gradguard_run(write_script, run_cli, tmp_path):
    write_script(SCRIPT)
    proc = run_cli("run", "--json", "out.json", "--policy", "collect", "train.py")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    found = [f for f in report["findings"] if f["code"] == "GG404"]
    assert len(found) == 1
    assert found[0]["where"] == "0.1"
    assert found[0]["location"]["file"] == "train.py"
    assert found[0]["location"]["line"] == 14


def test_gan_discriminator_frozen_only_during_the_generator_step_is_not_flagged():
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(2, 4))
    disc = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    real = torch.randn(8, 4)
    bce = nn.functional.binary_cross_entropy_with_logits
    with gradguard.Guard([gen, disc], [opt_g, opt_d], policy="collect") as guard:
        for _ in range(25):
            disc.requires_grad_(False)  # generator step first, through a frozen discriminator
            opt_g.zero_grad()
            bce(disc(gen(torch.randn(8, 2))), torch.ones(8, 1)).backward()
            opt_g.step()
            disc.requires_grad_(True)
            opt_d.zero_grad()
            fake = gen(torch.randn(8, 2)).detach()
            (bce(disc(real), torch.ones(8, 1)) + bce(disc(fake), torch.zeros(8, 1))).backward()
            opt_d.step()
    assert guard.findings == []
