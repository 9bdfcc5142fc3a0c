"""The contract every detector keeps, checked for each registered detector."""

import json

import pytest
import torch
from torch import nn

from gradguard import RULES, Guard
from gradguard.detectors import DETECTORS
from gradguard.explain import explain


def test_codes_and_names_are_unique_and_reserved():
    codes = [d.code for d in DETECTORS]
    names = [d.name for d in DETECTORS]
    assert len(set(codes)) == len(codes)
    assert len(set(names)) == len(names)
    assert codes == sorted(codes)
    for det in DETECTORS:
        assert RULES[det.code] == det.name


@pytest.mark.parametrize("det", DETECTORS, ids=lambda d: d.code)
def test_rule_page_has_every_section_and_an_example(det):
    page = explain(det.code)
    assert page.startswith(f"{det.code} {det.name}: ")
    for section in ("What it detects", "Why it matters", "How to fix it", "Example"):
        assert section in page, section
    assert det.hint
    assert det.hint[0].isupper()
    assert det.severity in ("info", "warning", "error")


def _loop(model, opt, steps=3):
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _hooks(model, opt):
    out = [len(model._forward_pre_hooks), len(model._forward_hooks), len(model._backward_hooks)]
    out += [len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)]
    for p in model.parameters():
        out += [len(p._backward_hooks or {}), len(p._post_accumulate_grad_hooks or {})]
    return out


@pytest.mark.parametrize("det", DETECTORS, ids=lambda d: d.code)
def test_no_hook_is_left_after_detach(det):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _hooks(model, opt)
    with Guard(model, opt, detectors=[det], policy="collect") as guard:
        _loop(model, opt)
    assert _hooks(model, opt) == before
    assert guard.findings == [] or all(f.code in (det.code, "GG000") for f in guard.findings)
    assert not any(f.code == "GG000" for f in guard.findings)


@pytest.mark.parametrize("det", DETECTORS, ids=lambda d: d.code)
def test_state_dict_round_trips_through_a_file_without_mutating_its_input(det, tmp_path):
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Guard(model, opt, detectors=[det], policy="collect") as guard:
        _loop(model, opt)
        state = guard.detector(det.code).state_dict()
    path = tmp_path / "state.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    snapshot = json.dumps(loaded, sort_keys=True, default=repr)
    fresh = det()
    fresh.load_state_dict(loaded)
    assert json.dumps(loaded, sort_keys=True, default=repr) == snapshot
    assert fresh.state_dict() == state
