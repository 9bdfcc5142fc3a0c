"""GG102 zero-grad-before-step: each buggy loop yields exactly that finding; each correct one none."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gradguard
from gradguard import GradientAccumulator
from gradguard.detectors import ZeroGradBeforeStep
from gradguard.sources.resets import PATCHES

from .helpers import line_of, same_file, tiny_data, tiny_model

STEPS = 4
# GG406 optimizer-updates-nothing: an optimizer none of whose tensors a backward() reaches.
NOT_GG406 = ["GG406"]


def _loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


# ----------------------------------------------------------------------- flagged


def test_a_long_run_of_the_mistake_is_one_finding_of_every_detector():
    model, (x, y) = tiny_model(), tiny_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(25):  # past GG405's and GG406's windows
            _loss(model, x, y).backward()
            opt.zero_grad()
            opt.step()
    assert [f.code for f in guard.findings] == ["GG102"]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_optimizer_zero_grad_between_backward_and_step_is_flagged_at_the_reset(set_to_none):
    model, (x, y) = tiny_model(), tiny_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(STEPS):
            _loss(model, x, y).backward()
            opt.zero_grad(set_to_none=set_to_none)  # <- reset after backward
            opt.step()
    (finding,) = guard.findings
    assert finding.code == "GG102"
    assert finding.name == "zero-grad-before-step"
    assert finding.severity == "warning"
    assert same_file(finding.location.file, __file__)
    assert finding.location.line == line_of("# <- reset after backward")
    assert finding.where == finding.data["optimizer"] == "opt (SGD)"
    assert finding.data["reset"] == "zero_grad()"
    assert finding.step == 1  # two steps in a row: first reported at the second
    assert finding.count == STEPS - 1
    assert "before backward()" in finding.hint


def test_model_zero_grad_between_backward_and_step_is_flagged_at_the_reset():
    model, (x, y) = tiny_model(), tiny_data()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(STEPS):
            loss = _loss(model, x, y)
            loss.backward()
            model.zero_grad()  # <- model reset after backward
            opt.step()
    assert [f.code for f in guard.findings] == ["GG102"]
    assert guard.findings[0].location.line == line_of("# <- model reset after backward")
    assert guard.findings[0].where == "opt (Adam)"


def test_zero_grad_of_each_part_of_the_model_is_flagged_at_the_last_one():
    model, (x, y) = tiny_model(), tiny_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(STEPS):
            _loss(model, x, y).backward()
            model[0].zero_grad()
            model[2].zero_grad()  # <- last part reset
            opt.step()
    assert [f.code for f in guard.findings] == ["GG102"]
    assert guard.findings[0].location.line == line_of("# <- last part reset")
    assert guard.findings[0].count == STEPS - 1


def test_hand_written_reset_between_backward_and_step_is_flagged_at_that_line():
    model, (x, y) = tiny_model(), tiny_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(STEPS):
            for p in model.parameters():
                p.grad = None  # a correct reset, before backward
            _loss(model, x, y).backward()
            for p in model.parameters():
                p.grad = None  # <- hand-written reset after backward
            opt.step()
    (finding,) = guard.findings
    assert finding.code == "GG102"
    assert finding.location.line == line_of("# <- hand-written reset after backward")
    assert finding.data["reset"] == "grad = None"
    assert "every gradient of opt (SGD) is None" in finding.message


def test_the_bug_is_found_after_the_warm_up_on_a_model_larger_than_the_budget():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])  # 24 tensors, 4 looked at per step
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for step in range(54):
            if step <= 40:
                opt.zero_grad()
            _loss(model, x, y).backward()
            if step >= 40:
                opt.zero_grad()  # <- the reset moved after the warm-up
            opt.step()
    (finding,) = guard.findings
    assert finding.code == "GG102"
    assert finding.location.line == line_of("# <- the reset moved after the warm-up")
    assert finding.step > 40


def test_a_compiled_model_is_watched_with_no_graph_break():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, (x, y) = tiny_model(), tiny_data()
    call = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        with gradguard.Guard(call, opt, policy="collect") as guard:
            for _ in range(STEPS):
                _loss(call, x, y).backward()
                opt.zero_grad()  # <- reset after the compiled model's backward
                opt.step()
        assert sum(counters["graph_break"].values()) == 0
    finally:
        torch._dynamo.reset()
    assert [f.code for f in guard.findings] == ["GG102"]
    assert guard.findings[0].location.line == line_of("# <- reset after the compiled model's backward")


def test_warn_policy_warns_at_the_reset_line():
    model, (x, y) = tiny_model(), tiny_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def train():
        with gradguard.Guard(model, opt, select="GG102"):
            for _ in range(STEPS):
                _loss(model, x, y).backward()
                opt.zero_grad()  # <- warned reset
                opt.step()

    with pytest.warns(gradguard.FindingWarning, match=r"^GG102 zero-grad-before-step") as record:
        train()
    mine = [w for w in record if issubclass(w.category, gradguard.GradGuardWarning)]
    assert len(mine) == 1
    assert mine[0].lineno == line_of("# <- warned reset")
    assert same_file(mine[0].filename, __file__)


# ----------------------------------------------------------------------- correct


# Resetting before backward() (each way: zero_grad() with or without set_to_none,
# model.zero_grad(), p.grad = None) or after step() runs with every detector, GG102
# included, in tests/test_missing_zero_grad.py.


def test_hand_written_gradient_accumulation_reports_nothing():
    model, (x, y) = tiny_model(), tiny_data(16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for i, (xb, yb) in enumerate(zip(x.split(2), y.split(2), strict=True)):
            (_loss(model, xb, yb) / 4).backward()
            if (i + 1) % 4 == 0:
                opt.step()
                opt.zero_grad()
    assert guard.findings == []
    assert guard.step == 2


def test_gradient_accumulator_reports_nothing():
    model, (x, y) = tiny_model(), tiny_data(16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        acc = GradientAccumulator(opt, steps=2, model=model, max_grad_norm=1.0)
        for xb, yb in zip(x.split(2), y.split(2), strict=True):
            acc.backward(_loss(model, xb, yb))
        acc.flush()
    assert guard.findings == []
    assert guard.step == 4


@pytest.mark.parametrize("set_to_none", [True, False])
def test_gan_whose_discriminator_loss_fills_generator_grads_reports_nothing(set_to_none):
    torch.manual_seed(0)
    gen, disc = nn.Linear(2, 4), nn.Linear(4, 1)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    real = torch.randn(8, 4)
    with gradguard.Guard([gen, disc], [opt_g, opt_d], policy="collect") as guard:
        for _ in range(STEPS):
            fake = gen(torch.randn(8, 2))
            opt_d.zero_grad(set_to_none=set_to_none)
            (disc(fake).mean() - disc(real).mean()).backward(retain_graph=True)  # not detached: fills G's grads
            opt_d.step()
            opt_g.zero_grad(set_to_none=set_to_none)  # after lossD.backward(), but before G's own backward
            (-disc(fake).mean()).backward()
            opt_g.step()
    assert guard.findings == []
    assert guard.step == STEPS


def test_lbfgs_closure_that_resets_then_backpropagates_reports_nothing():
    model, (x, y) = tiny_model(), tiny_data()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=4)

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(3):
            opt.step(closure)
    assert guard.findings == []


def test_zero_grad_of_another_model_between_backward_and_step_reports_nothing():
    model, (x, y) = tiny_model(), tiny_data()
    teacher = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard([model, teacher], opt, policy="collect") as guard:
        for _ in range(STEPS):
            opt.zero_grad()
            (_loss(model, x, y) + teacher(x).mean()).backward()
            teacher.zero_grad()  # not the optimizer's parameters
            opt.step()
    assert guard.findings == []


def test_an_optimizer_whose_part_gets_no_gradient_this_step_reports_nothing():
    model, (x, y) = tiny_model(), tiny_data()
    head = nn.Linear(4, 1)
    opt_body = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_head = torch.optim.SGD(head.parameters(), lr=0.1)
    with gradguard.Guard([model, head], [opt_body, opt_head], policy="collect", ignore=NOT_GG406) as guard:
        for _ in range(STEPS):
            for opt in (opt_body, opt_head):
                opt.zero_grad()
            _loss(model, x, y).backward()  # the head is not used this phase (GG406 says so, rightly)
            for opt in (opt_body, opt_head):
                opt.step()
    assert guard.findings == []


def test_one_batch_dropped_by_a_reset_before_step_reports_nothing():
    model, (x, y) = tiny_model(), tiny_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for i in range(STEPS):
            opt.zero_grad()
            _loss(model, x, y).backward()
            if i == 1:
                opt.zero_grad()  # a bad batch: dropped on purpose, once
            opt.step()
    assert guard.findings == []


# ----------------------------------------------------------------------- interfaces


def test_lightning_manual_optimization_with_the_reset_after_backward_is_flagged():
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    from gradguard.lightning import GradGuardCallback

    from .helpers import tiny_trainer

    class Manual(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_model()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            self.manual_backward(_loss(self.net, *batch))
            opt.zero_grad()  # <- lightning reset after manual_backward
            opt.step()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    callback = GradGuardCallback(policy="collect", ignore=NOT_GG406)
    x, y = tiny_data(16)
    tiny_trainer([callback], limit_train_batches=4).fit(Manual(), DataLoader(TensorDataset(x, y), batch_size=4))
    (finding,) = callback.findings
    assert finding.code == "GG102"
    assert finding.location.line == line_of("# <- lightning reset after manual_backward")
    assert finding.count == 3


def test_zero_grad_is_unpatched_when_nothing_consumes_resets():
    originals = [vars(p.owner)[p.name] for p in PATCHES]
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, detectors=["GG101"], policy="collect"):
        assert not any(p.active for p in PATCHES)
    with gradguard.Guard(model, opt, detectors=["GG102"], policy="collect"):
        assert all(p.active for p in PATCHES)
        assert [vars(p.owner)[p.name] for p in PATCHES] != originals
    assert [vars(p.owner)[p.name] for p in PATCHES] == originals


def test_a_failure_inside_the_reset_source_never_reaches_the_loop(monkeypatch):
    import gradguard.sources.resets as resets

    def broken(frame):
        raise RuntimeError("no frames today")

    monkeypatch.setattr(resets, "user_frame", broken)
    model, (x, y) = tiny_model(), tiny_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(STEPS):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())  # the reset itself still happened
        assert not any(p.active for p in PATCHES)  # the failed source stopped
    (finding,) = guard.findings
    assert finding.code == "GG000"
    assert "GradResetSource" in finding.message
    assert guard.step == STEPS


def test_detector_state_round_trips():
    det = ZeroGradBeforeStep()
    det.flagged_steps = 3
    other = ZeroGradBeforeStep()
    other.load_state_dict(det.state_dict())
    assert other.state_dict() == {"flagged_steps": 3}


BUGGY_SCRIPT = """
    import torch
    from torch import nn

    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for _ in range(5):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.zero_grad()  # the reset after backward
        opt.step()
"""


def test_gradguard_run_reports_the_reset_line(write_script, run_cli, tmp_path):
    script = write_script(BUGGY_SCRIPT)
    proc = run_cli("run", "--json", "out.json", "--select", "GG102", str(script))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    (finding,) = report["findings"]
    assert finding["code"] == "GG102"
    assert finding["location"]["line"] == line_of("# the reset after backward", str(script))
    assert finding["location"]["file"].endswith("train.py")
    assert finding["where"] == "opt (SGD)"
    assert finding["count"] == 3  # optimizers are adopted at their first step: steps 3, 4 and 5
    assert "GG102 zero-grad-before-step" in proc.stderr
