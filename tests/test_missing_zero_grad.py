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


def _for_every_parameter(guard):
    """The findings, each GG101, together naming every parameter of the tiny model once."""
    assert {f.code for f in guard.findings} == {"GG101"}
    names = [n for f in guard.findings for n in f.data["parameters"]]
    assert sorted(names) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    return guard.findings


def test_hand_written_sgd_without_reset_is_flagged():
    model, (x, y) = tiny_model(), tiny_data()
    with gradguard.Guard(model, policy="collect") as guard:
        for _ in range(STEPS):
            _loss(model, x, y).backward()  # <- hand-written backward
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
    (finding,) = _for_every_parameter(guard)  # one mistake, one finding
    assert finding.location.line == line_of("# <- hand-written backward")
    assert finding.count == STEPS - 1


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


# ----------------------------------------------------------------------- updates through .data

DATA_STEPS = 6  # the third update in a row through .data with no reset is reported, then each one after it
DATA_UPDATES = {
    "p.data.add_": lambda p, lr: p.data.add_(p.grad, alpha=-lr),
    "w.data.sub_": lambda p, lr: p.data.sub_(lr * p.grad.data),
    "p.data =": lambda p, lr: setattr(p, "data", p.data - lr * p.grad),
}
DATA_RESETS = {
    "model.zero_grad before backward": lambda model: model.zero_grad(),
    "grad = None after update": lambda model: [setattr(p, "grad", None) for p in model.parameters()],
    "grad.zero_ after update": lambda model: [p.grad.zero_() for p in model.parameters()],
    "grad.data.zero_ after update": lambda model: [p.grad.data.zero_() for p in model.parameters()],
}


@pytest.mark.parametrize("update", list(DATA_UPDATES))
def test_updates_through_data_without_reset_are_flagged_at_the_backward_line(update):
    model, (x, y) = tiny_model(), tiny_data()
    with gradguard.Guard(model, policy="collect") as guard:
        for _ in range(DATA_STEPS):
            _loss(model, x, y).backward()  # <- backward into gradients never reset
            for p in model.parameters():
                DATA_UPDATES[update](p, 0.01)
    for finding in _for_every_parameter(guard):
        assert same_file(finding.location.file, __file__)
        assert finding.location.line == line_of("# <- backward into gradients never reset")
        assert finding.count == DATA_STEPS - 3  # backward() calls 4, 5 and 6
        assert finding.data["through"] == ".data"
        assert finding.data["optimizer"] is None
        assert "p.grad = None" in finding.hint


def test_update_through_detach_without_reset_is_flagged():
    model, (x, y) = tiny_model(), tiny_data()
    with gradguard.Guard(model, policy="collect") as guard:
        for _ in range(STEPS):
            _loss(model, x, y).backward()  # <- backward before a detach() update
            for p in model.parameters():
                p.detach().sub_(0.01 * p.grad)  # shares the parameter's version counter
    (finding,) = _for_every_parameter(guard)
    assert finding.location.line == line_of("# <- backward before a detach() update")


class _WordModel(nn.Module):
    """The shape of pytorch/examples' word-language model: embedding, LSTM, decoder."""

    def __init__(self, tokens=12, hidden=6):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Embedding(tokens, hidden)
        self.rnn = nn.LSTM(hidden, hidden)
        self.decoder = nn.Linear(hidden, tokens)

    def forward(self, tokens, state):
        out, state = self.rnn(self.encoder(tokens), state)
        return self.decoder(out), state


@pytest.mark.parametrize("reset", [False, True])
def test_word_language_model_loop_with_tbptt_and_clipping(reset):
    model = _WordModel()
    data = torch.randint(0, 12, (5 * 4 + 1, 2), generator=torch.Generator().manual_seed(0))
    with gradguard.Guard(model, policy="collect") as guard:
        state = (torch.zeros(1, 2, 6), torch.zeros(1, 2, 6))
        for i in range(0, 5 * 4, 4):  # truncated backpropagation through time, 4 tokens at a time
            state = tuple(s.detach() for s in state)
            if reset:
                model.zero_grad()
            out, state = model(data[i : i + 4], state)
            loss = nn.functional.cross_entropy(out.reshape(-1, 12), data[i + 1 : i + 5].reshape(-1))
            loss.backward()  # <- word model backward
            nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-0.5)
    if reset:
        assert guard.findings == []
        return
    (finding,) = guard.findings  # one mistake, one finding, naming every parameter
    assert finding.code == "GG101"
    assert set(finding.data["parameters"]) == {name for name, _ in model.named_parameters()}
    assert finding.location.line == line_of("# <- word model backward")
    assert finding.count == 2


class _LateEvent:
    """A device event that completes only after a few queries, as a busy GPU's would."""

    def __init__(self, queries):
        self.queries = queries

    def query(self):
        self.queries -= 1
        return self.queries < 0

    def synchronize(self):
        self.queries = -1


@pytest.mark.parametrize("backwards", [4, DATA_STEPS + 4])
def test_updates_through_data_are_found_when_the_device_answers_late(monkeypatch, backwards):
    from gradguard.introspect import device

    def late_flag(value):
        flag = device.DeviceFlag.__new__(device.DeviceFlag)
        flag.host, flag.event = value.reshape(()).clone(), _LateEvent(3)
        return flag

    monkeypatch.setattr(device, "flag", late_flag)
    model, (x, y) = tiny_model(), tiny_data()
    with gradguard.Guard(model, policy="collect") as guard:
        for _ in range(backwards):
            _loss(model, x, y).backward()  # <- backward, answered later
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-0.01)
    (finding,) = _for_every_parameter(guard)
    assert finding.location.line == line_of("# <- backward, answered later")
    assert finding.count == backwards - 3  # at the end of the run, the rest is waited for


@pytest.mark.parametrize("reset", list(DATA_RESETS))
def test_updates_through_data_with_a_reset_report_nothing(reset):
    model, (x, y) = tiny_model(), tiny_data()
    with gradguard.Guard(model, policy="collect") as guard:
        for _ in range(DATA_STEPS):
            if reset.endswith("before backward"):
                DATA_RESETS[reset](model)
            _loss(model, x, y).backward()
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-0.01)
            if reset.endswith("after update"):
                DATA_RESETS[reset](model)
    assert guard.findings == []


@pytest.mark.parametrize("reset", [True, False])
def test_hand_written_accumulation_through_data(reset):
    model, (x, y) = tiny_model(), tiny_data(24)
    with gradguard.Guard(model, policy="collect") as guard:
        for i, (xb, yb) in enumerate(zip(x.split(2), y.split(2), strict=True)):
            (_loss(model, xb, yb) / 3).backward()  # <- micro-batch backward
            if (i + 1) % 3 == 0:
                for p in model.parameters():
                    p.data.add_(p.grad, alpha=-0.01)
                    if reset:
                        p.grad = None
    if reset:
        assert guard.findings == []
    else:  # windows 2, 3 and 4 each start on the gradient of the windows before
        (finding,) = _for_every_parameter(guard)
        assert finding.location.line == line_of("# <- micro-batch backward")


def test_a_loop_that_only_evaluates_reports_nothing():
    model, (x, y) = tiny_model(), tiny_data()
    with gradguard.Guard(model, policy="collect") as guard:
        _loss(model, x, y).backward()  # gradients left from some earlier work
        with torch.no_grad():
            for _ in range(DATA_STEPS):
                _loss(model, x, y)
                for p in model.parameters():
                    p.data.mul_(0.5)  # changed, but no backward() follows
    assert guard.findings == []


def test_updates_through_data_after_the_warm_up_on_a_model_larger_than_the_budget():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])  # 12 tensors, 4 looked at per backward()
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    with gradguard.Guard(model, policy="collect") as guard:
        for i in range(120):
            if i < 40:
                model.zero_grad()  # correct during the warm-up, then the reset is dropped
            _loss(model, x, y).backward()  # <- backward after the warm-up
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-1e-3)
    assert guard.findings
    assert {f.code for f in guard.findings} == {"GG101"}
    assert {f.location.line for f in guard.findings} == {line_of("# <- backward after the warm-up")}
    assert all(f.step == 0 and f.data["through"] == ".data" for f in guard.findings)


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
