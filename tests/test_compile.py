"""torch.compile: a guard adds no graph break, changes no loss, and every detector still fires.

Each buggy loop runs eagerly and on a compiled model (``aot_eager``, which traces exactly
as the default backend does, without generating C++); one loop also runs with the default
backend. The correct version of each loop, compiled, reports nothing.
"""

from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import gradguard

from .helpers import tiny_data


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _breaks() -> int:
    return sum(counters["graph_break"].values())


def _compiled(model: nn.Module, how: str) -> nn.Module:
    if how == "eager":
        return model
    if how == "in-place":
        model.compile(backend="aot_eager")
        return model
    return torch.compile(model, backend="aot_eager")


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.fc = nn.Linear(8, 1)
        self.scale = nn.Parameter(torch.ones(1))
        self.detach_scale = False

    def forward(self, x):
        scale = self.scale.detach() if self.detach_scale else self.scale
        return self.fc(self.backbone(x)) * scale


def _train(model, call, opt, steps=6, reset=True, keep=None):
    x, y = tiny_data()
    for _ in range(steps):
        if reset:
            opt.zero_grad()
        loss = nn.functional.mse_loss(call(x), y)
        loss.backward()
        opt.step()
        if keep is not None:
            keep.append(loss)


def _gg101(how, bug):
    model = Head()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    call = _compiled(model, how)
    with gradguard.Guard(call, opt, policy="collect") as guard:
        _train(model, call, opt, reset=not bug)
    return guard


def _gg201(how, bug):
    model = Head()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    call = _compiled(model, how)
    total = []
    with gradguard.Guard(call, opt, policy="collect") as guard:
        x, y = tiny_data()
        total_loss = 0.0
        for _ in range(6):
            opt.zero_grad()
            loss = nn.functional.mse_loss(call(x), y)
            loss.backward()
            opt.step()
            total_loss += loss if bug else loss.item()
        total.append(total_loss)
    return guard


def _gg401(how, bug):
    model = Head()
    for p in model.backbone.parameters():
        if bug:
            p.requres_grad = False
        else:
            p.requires_grad = False
    model.backbone.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    call = _compiled(model, how)
    with gradguard.Guard(call, opt, policy="collect") as guard:
        _train(model, call, opt)
    return guard


def _gg402(how, bug):
    model = Head()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    call = _compiled(model, how)
    with gradguard.Guard(call, opt, policy="collect") as guard:
        _train(model, call, opt, steps=3)
        model.backbone.requires_grad_(False)
        model.backbone.eval()
        x, y = tiny_data()
        for _ in range(3):
            opt.zero_grad(set_to_none=not bug)
            nn.functional.mse_loss(call(x), y).backward()
            opt.step()
    return guard


def _gg403(how, bug):
    model = Head()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.fc = nn.Linear(8, 1)
    if not bug:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
    call = _compiled(model, how)
    with gradguard.Guard(call, opt, policy="collect") as guard:
        _train(model, call, opt)
    return guard


def _gg404(how, bug):
    model = Head()
    model.backbone.requires_grad_(False)
    opt = torch.optim.SGD([*model.fc.parameters(), model.scale], lr=0.01)
    model.train()
    if not bug:
        model.backbone.eval()
    call = _compiled(model, how)
    with gradguard.Guard(call, opt, policy="collect") as guard:
        _train(model, call, opt)
    return guard


def _gg405(how, bug):
    model = Head()
    model.detach_scale = bug
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    call = _compiled(model, how)
    with gradguard.Guard(call, opt, policy="collect", detectors=["GG405"]) as guard:
        _train(model, call, opt, steps=24)
    return guard


def _gg406(how, bug):
    model = Head()
    model.backbone.requires_grad_(False)
    model.backbone.eval()
    opt = torch.optim.SGD(model.backbone.parameters() if bug else [*model.fc.parameters(), model.scale], lr=0.01)
    call = _compiled(model, how)
    with gradguard.Guard(call, opt, policy="collect") as guard:
        _train(model, call, opt)
    return guard


def _gg501(how, bug):
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    call = _compiled(model, how)
    rng = np.random.default_rng(0)
    with gradguard.Guard(call, opt, policy="collect") as guard:
        buf = np.empty(4, dtype=np.float32)
        data = []
        for _ in range(4):
            buf[:] = rng.random(4)
            data.append(torch.from_numpy(buf if bug else buf.copy()))
        for x in data:
            opt.zero_grad()
            call(x).pow(2).mean().backward()
            opt.step()
    return guard


def _gg301(how, bug):
    model = nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    call = _compiled(model, how)
    cache = {} if bug else collections.deque(maxlen=2)
    with gradguard.Guard(call, opt, policy="collect", detectors=["GG301"]) as guard:
        for step in range(60):
            opt.zero_grad()
            call(torch.randn(8, 16)).pow(2).mean().backward()
            opt.step()
            if bug:
                cache[step] = torch.randn(512, 1024)
            else:
                cache.append(torch.randn(512, 1024))
    return guard


LOOPS = {
    "GG101": _gg101,
    "GG201": _gg201,
    "GG301": _gg301,
    "GG401": _gg401,
    "GG402": _gg402,
    "GG403": _gg403,
    "GG404": _gg404,
    "GG405": _gg405,
    "GG406": _gg406,
    "GG501": _gg501,
}


@pytest.mark.parametrize("code", LOOPS)
@pytest.mark.parametrize("how", ["eager", "torch.compile", "in-place"])
def test_each_detector_fires_on_a_compiled_model_with_no_graph_break(code, how):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no compiler warning either
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        guard = LOOPS[code](how, bug=True)
    assert [f.code for f in guard.findings] == [code]
    assert _breaks() == 0


@pytest.mark.parametrize("code", LOOPS)
def test_each_correct_loop_on_a_compiled_model_reports_nothing(code):
    guard = LOOPS[code]("torch.compile", bug=False)
    assert guard.findings == []
    assert _breaks() == 0


def _losses(guarded: bool, backend: str | None) -> list[float]:
    torch._dynamo.reset()
    model = Head()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    call = torch.compile(model) if backend is None else torch.compile(model, backend=backend)
    losses: list[torch.Tensor] = []
    guard = gradguard.Guard(call, opt, policy="collect") if guarded else None
    if guard is not None:
        guard.attach()
    try:
        _train(model, call, opt, steps=5, keep=losses)
    finally:
        if guard is not None:
            guard.detach()
    return [loss.item() for loss in losses]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inside torch's default backend
def test_losses_are_those_of_the_unguarded_compiled_run_with_the_default_backend():
    unguarded = _losses(False, None)
    assert _losses(False, None) == unguarded  # the run-to-run spread: none on this machine
    counters.clear()
    assert _losses(True, None) == unguarded
    assert _breaks() == 0


def test_a_guard_attached_before_torch_compile_follows_the_wrapper():
    model = Head()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        call = torch.compile(model, backend="aot_eager")
        _train(model, call, opt, steps=4, reset=False)
        assert guard.models() == [model]
    assert guard.iteration == 4  # every forward seen, through the OptimizedModule
    assert [f.code for f in guard.findings] == ["GG101"]
    assert _breaks() == 0


def test_a_wrapper_made_before_the_guard_is_found_once_the_model_shows_no_forward():
    model = Head()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    call = torch.compile(model, backend="aot_eager")
    with gradguard.Guard(model, opt, policy="collect") as guard:
        _train(model, call, opt, steps=6)
    assert guard.iteration >= 4
    assert _breaks() == 0


COMPILED_SCRIPT = """\
import torch, torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
model = torch.compile(model, backend="aot_eager")
x, y = torch.randn(8, 4), torch.randn(8, 1)
total_loss = 0.0
for _ in range(6):
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    total_loss += loss
print("breaks", sum(counters["graph_break"].values()))
"""


def test_gradguard_run_on_a_compiled_model_adds_no_break_and_finds_the_bugs(write_script, run_cli, tmp_path):
    import json

    write_script(COMPILED_SCRIPT)
    proc = run_cli("run", "--json", "out.json", "--policy", "collect", "train.py")
    assert proc.returncode == 0, proc.stderr
    assert "breaks 0" in proc.stdout
    assert "Warning" not in proc.stderr
    codes = sorted(f["code"] for f in json.loads((tmp_path / "out.json").read_text())["findings"])
    assert codes == ["GG101", "GG201"]
