"""Mistakes made after the warm-up, on a model larger than the budget, are still found within 100 steps.

After the first 32 steps gradguard looks at a few tensors per param group per step, and runs
most checks on some steps only. Each mistake below starts at step 40, on a model of 64
parameter tensors (16 times the per-group budget), and must be reported by step 140.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradguard

START, END = 40, 140


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        blocks = []
        for _ in range(15):
            blocks += [nn.Linear(8, 8), nn.Tanh()]
        self.backbone = nn.Sequential(*blocks, nn.BatchNorm1d(8))  # 32 tensors
        self.head = nn.Sequential(*[nn.Linear(8, 8) for _ in range(15)], nn.Linear(8, 1))  # 32 tensors
        self.scale = nn.Parameter(torch.ones(1))
        self.detach_scale = False

    def forward(self, x):
        scale = self.scale.detach() if self.detach_scale else self.scale
        return self.head(self.backbone(x)) * scale


def _run(mistake):
    model = Deep()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    first: dict[str, int] = {}
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for step in range(1, END + 1):
            reset = True
            if step == START:
                reset = mistake(model, opt)
            elif step > START and mistake.__name__ == "stop_zeroing":
                reset = False
            if reset:
                opt.zero_grad(set_to_none=mistake.__name__ != "freeze_with_momentum" or step < START)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            for f in guard.findings:
                first.setdefault(f.code, step)
    return first


def stop_zeroing(model, opt):
    return False


def freeze_with_momentum(model, opt):
    model.backbone.requires_grad_(False)
    model.backbone.eval()
    return True


def misspell_a_freeze(model, opt):
    for p in model.backbone.parameters():
        p.requres_grad = False
    return True


def replace_the_head(model, opt):
    model.head[7] = nn.Linear(8, 8)
    return True


def freeze_but_leave_in_train_mode(model, opt):
    model.backbone.requires_grad_(False)
    for p in model.backbone.parameters():
        p.grad = None
        opt.state.pop(p, None)
    return True


def detach_a_parameter(model, opt):
    model.detach_scale = True
    return True


MISTAKES = {
    "GG101": stop_zeroing,
    "GG402": freeze_with_momentum,
    "GG401": misspell_a_freeze,
    "GG403": replace_the_head,
    "GG404": freeze_but_leave_in_train_mode,
    "GG405": detach_a_parameter,
}


@pytest.mark.parametrize("code", MISTAKES)
def test_a_mistake_made_after_the_warm_up_is_found_within_100_steps(code):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = _run(MISTAKES[code])
    assert set(first) == {code}, first  # one mistake, one finding: the replaced layer's old tensors are GG403's
    assert START <= first[code] <= END


def test_the_same_run_without_a_mistake_reports_nothing():
    def nothing(model, opt):
        return True

    assert _run(nothing) == {}


def test_the_model_is_larger_than_the_budget():
    model = Deep()
    budget = gradguard.Budget()
    assert budget.per_group is not None
    assert sum(1 for _ in model.parameters()) >= 16 * budget.per_group
