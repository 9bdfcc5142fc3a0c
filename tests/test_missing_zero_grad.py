"""GG101 missing-zero-grad: each buggy loop yields exactly that finding; each correct one none."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gradguard
from gradguard.detectors import MissingZeroGrad

from .helpers import line_of, same_file, tiny_data, tiny_model

STEPS = 4


def _loss(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def _gg101(guard):
    return [f for f in guard.findings if f.code == "GG101"]


def _make_optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    if kind == "foreach":
        return torch.optim.Adam(params, lr=0.01, foreach=True)
    if kind == "fused":
        return torch.optim.AdamW(params, lr=0.01, fused=True)
    raise AssertionError(kind)


RESETS = {
    "set_to_none": lambda model, opt: opt.zero_grad(set_to_none=True),
    "set_to_zero": lambda model, opt: opt.zero_grad(set_to_none=False),
    "model.zero_grad": lambda model, opt: model.zero_grad(),
    "grad=None": lambda model, opt: [setattr(p, "grad", None) for p in model.parameters()],
    "grad.data.zero_": lambda model, opt: [p.grad.data.zero_() for p in model.parameters() if p.grad is not None],
}


# ----------------------------------------------------------------------- flagged


@pytest.mark.parametrize("kind", ["sgd", "foreach", "fused"])
def test_loop_without_reset_is_flagged_at_step_line(kind):
    model, (x, y) = tiny_model(), tiny_data()
    opt = _make_optimizer(kind, model.parameters())
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(STEPS):
            _loss(model, x, y).backward()
            opt.step()  # <- buggy step
    (finding,) = guard.findings
    assert finding.code == "GG101"
    assert finding.name == "missing-zero-grad"
    assert finding.severity == "warning"
    assert same_file(finding.location.file, __file__)
    assert finding.location.line == line_of("# <- buggy step")
    assert finding.step == 1  # first seen at the second step, after one completed step
    assert finding.count == STEPS - 1
    assert set(finding.data["parameters"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert "zero_grad" in finding.hint


@pytest.mark.parametrize("clip", [False, True])
def test_amp_grad_scaler_with_unscale_and_clipping_without_reset_is_flagged(clip):
    model, (x, y) = tiny_model(), tiny_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(STEPS):
            scaler.scale(_loss(model, x, y)).backward()
            scaler.unscale_(opt)
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)  # <- scaler step
            scaler.update()
    assert [f.code for f in guard.findings] == ["GG101"]
    assert guard.findings[0].location.line == line_of("# <- scaler step")


def test_lbfgs_closure_without_zero_grad_is_flagged():
    model, (x, y) = tiny_model(), tiny_data()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=4)

    def closure():
        loss = _loss(model, x, y)  # no opt.zero_grad(): every inner evaluation adds up
        loss.backward()
        return loss

    with gradguard.Guard(model, opt, policy="collect") as guard:
        opt.step(closure)  # <- lbfgs step
    (finding,) = guard.findings
    assert finding.code == "GG101"
    assert finding.location.line == line_of("# <- lbfgs step")
    assert "closure" in finding.hint


def test_hand_written_sgd_without_reset_is_flagged():
    model, (x, y) = tiny_model(), tiny_data()
    with gradguard.Guard(model, policy="collect") as guard:
        for _ in range(STEPS):
            _loss(model, x, y).backward()  # <- hand-written backward
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
    assert [f.code for f in guard.findings] == ["GG101"] * 4  # one finding per parameter
    assert {f.where for f in guard.findings} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(f.location.line == line_of("# <- hand-written backward") for f in guard.findings)
    assert all(f.count == STEPS - 1 for f in guard.findings)


def test_generator_backward_into_discriminator_without_its_reset_is_flagged():
    torch.manual_seed(0)
    gen, disc = nn.Linear(2, 4), nn.Linear(4, 1)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    real = torch.randn(8, 4)
    with gradguard.Guard([gen, disc], [opt_g, opt_d], policy="collect") as guard:
        for _ in range(STEPS):
            z = torch.randn(8, 2)
            # discriminator step, but its gradients are never reset
            d_loss = disc(real).mean() - disc(gen(z).detach()).mean()
            d_loss.backward()
            opt_d.step()  # <- discriminator step
            opt_g.zero_grad()
            g_loss = -disc(gen(z)).mean()
            g_loss.backward()
            opt_g.step()
    assert [f.code for f in guard.findings] == ["GG101"]
    finding = guard.findings[0]
    assert finding.location.line == line_of("# <- discriminator step")
    # the bias's gradient is exactly zero at first (it cancels in d_loss): re-applying zeros is harmless
    assert set(finding.data["parameters"]) <= {"weight", "bias"}
    assert finding.where == finding.data["optimizer"] == "opt_d (Adam)"
    assert finding.count == STEPS - 1


# ----------------------------------------------------------------------- correct


@pytest.mark.parametrize("reset", list(RESETS))
@pytest.mark.parametrize("kind", ["sgd", "foreach", "fused"])
def test_each_way_of_resetting_reports_nothing(kind, reset):
    model, (x, y) = tiny_model(), tiny_data()
    opt = _make_optimizer(kind, model.parameters())
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(STEPS):
            RESETS[reset](model, opt)
            _loss(model, x, y).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    assert guard.findings == []
    assert guard.step == STEPS


def test_reset_after_step_reports_nothing():
    model, (x, y) = tiny_model(), tiny_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(STEPS):
            _loss(model, x, y).backward()
            opt.step()
            opt.zero_grad()
    assert guard.findings == []


def test_amp_grad_scaler_with_reset_reports_nothing():
    model, (x, y) = tiny_model(), tiny_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(STEPS):
            opt.zero_grad(set_to_none=False)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _loss(model, x, y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
    assert guard.findings == []


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_correct_gradient_accumulation_reports_nothing(micro_batches):
    model, (x, y) = tiny_model(), tiny_data(16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for i, (xb, yb) in enumerate(zip(x.split(2), y.split(2), strict=True)):
            (_loss(model, xb, yb) / micro_batches).backward()
            if (i + 1) % micro_batches == 0:
                opt.step()
                opt.zero_grad()
    assert guard.findings == []
    assert guard.step == 8 // micro_batches


def test_gan_whose_generator_fills_discriminator_grads_reports_nothing():
    torch.manual_seed(0)
    gen, disc = nn.Linear(2, 4), nn.Linear(4, 1)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    real = torch.randn(8, 4)
    for set_to_none in (True, False):
        with gradguard.Guard([gen, disc], [opt_g, opt_d], policy="collect") as guard:
            for _ in range(STEPS):
                z = torch.randn(8, 2)
                fake = gen(z)
                opt_d.zero_grad(set_to_none=set_to_none)
                (disc(fake.detach()).mean() - disc(real).mean()).backward()
                opt_d.step()
                opt_g.zero_grad(set_to_none=set_to_none)
                (-disc(fake).mean()).backward()  # also fills the discriminator's gradients
                opt_g.step()
        assert guard.findings == [], set_to_none
        assert guard.step == STEPS


def test_lbfgs_closure_with_zero_grad_reports_nothing():
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


@pytest.mark.parametrize("reset", ["none", "zero_"])
def test_hand_written_sgd_with_reset_reports_nothing(reset):
    model, (x, y) = tiny_model(), tiny_data()
    with gradguard.Guard(model, policy="collect") as guard:
        for _ in range(STEPS):
            _loss(model, x, y).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
                    if reset == "none":
                        p.grad = None
                    else:
                        p.grad.zero_()
    assert guard.findings == []


# ----------------------------------------------------------------------- interfaces


def test_warn_policy_warns_once_with_the_code_first():
    model, (x, y) = tiny_model(), tiny_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def train():
        with gradguard.Guard(model, opt):
            for _ in range(STEPS):
                _loss(model, x, y).backward()
                opt.step()  # <- warned step

    with pytest.warns(gradguard.FindingWarning, match=r"^GG101 missing-zero-grad") as record:
        train()
    mine = [w for w in record if issubclass(w.category, gradguard.GradGuardWarning)]
    assert len(mine) == 1
    assert mine[0].lineno == line_of("# <- warned step")
    assert same_file(mine[0].filename, __file__)


def test_raise_policy_stops_at_the_buggy_step():
    model, (x, y) = tiny_model(), tiny_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    steps_done = 0

    def train():
        nonlocal steps_done
        with gradguard.Guard(model, opt, policy="raise"):
            for _ in range(STEPS):
                _loss(model, x, y).backward()
                opt.step()
                steps_done += 1

    with pytest.raises(gradguard.FindingError) as info:
        train()
    assert steps_done == 1
    assert [f.code for f in info.value.findings] == ["GG101"]


BUGGY_SCRIPT = """
    import torch
    from torch import nn

    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for _ in range(5):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()  # the buggy step
"""


def test_gradguard_run_reports_the_step_line(write_script, run_cli, tmp_path):
    script = write_script(BUGGY_SCRIPT)
    proc = run_cli("run", "--json", "out.json", str(script))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    (finding,) = report["findings"]
    assert finding["code"] == "GG101"
    assert finding["name"] == "missing-zero-grad"
    assert finding["location"]["line"] == line_of("# the buggy step", str(script))
    assert finding["location"]["file"].endswith("train.py")
    assert finding["count"] == 4
    assert "GG101 missing-zero-grad" in proc.stderr
    assert "train.py:11" in proc.stderr


def test_gradguard_run_on_the_fixed_script_reports_nothing(write_script, run_cli, tmp_path):
    script = write_script(BUGGY_SCRIPT.replace("loss.backward()", "opt.zero_grad(); loss.backward()"))
    proc = run_cli("run", "--json", "out.json", "--strict", str(script))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out.json").read_text())["findings"] == []


def test_detector_state_round_trips():
    det = MissingZeroGrad()
    det.flagged_updates = 3
    state = det.state_dict()
    other = MissingZeroGrad()
    other.load_state_dict(state)
    assert other.flagged_updates == 3
    assert state == {"flagged_updates": 3}


def test_lazy_modules_are_tracked_once_materialised():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.Linear(8, 1))
    x, y = tiny_data()
    with gradguard.Guard(model, policy="collect") as guard:
        model(x)  # materialise before the optimizer is made, as usual with lazy modules
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        guard.add_optimizer(opt)
        for _ in range(STEPS):
            _loss(model, x, y).backward()
            opt.step()
    assert [f.code for f in guard.findings] == ["GG101"]
    assert "0.weight" in guard.findings[0].data["parameters"]
