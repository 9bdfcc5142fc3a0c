"""The per-step budget: a rotating sample covers every tensor within its bound, and stays small."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradguard
from gradguard import Budget, ConfigurationError
from gradguard.sampling import Rotation


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=12),
    per_group=st.integers(min_value=1, max_value=6),
    max_groups=st.integers(min_value=1, max_value=5),
    dwell=st.integers(min_value=1, max_value=3),
)
def test_every_item_is_checked_within_the_coverage_bound(sizes, per_group, max_groups, dwell):
    budget = Budget(per_group=per_group, max_groups=max_groups, warmup=2, sweep_every=0)
    groups = [[(g, i) for i in range(n)] for g, n in enumerate(sizes)]
    rotation = Rotation(budget, dwell=dwell)
    bound = budget.coverage(sizes, dwell=dwell)
    seen: set[tuple[int, int]] = set()
    largest = 0
    for tick in range(budget.warmup + 1, budget.warmup + 1 + bound):
        chosen = rotation.select(groups, tick)
        largest = max(largest, len(chosen))
        seen.update(chosen)
    assert seen == {item for group in groups for item in group}
    assert largest <= per_group * max_groups  # the cost of a tick does not grow with the groups


def test_everything_is_checked_during_the_warm_up_and_at_sweeps():
    budget = Budget(per_group=1, warmup=3, sweep_every=10)
    rotation = Rotation(budget)
    groups = [list(range(20))]
    assert [len(rotation.select(groups, t)) for t in (1, 2, 3, 4, 9, 10, 11, 20)] == [20, 20, 20, 1, 1, 20, 1, 20]
    assert len(Rotation(Budget(per_group=None)).select(groups, 500)) == 20


def test_a_dwell_keeps_the_same_sample_for_consecutive_ticks():
    rotation = Rotation(Budget(per_group=2, warmup=0, sweep_every=0), dwell=3)
    groups = [list(range(6))]
    picks = [tuple(rotation.select(groups, t)) for t in range(1, 10)]
    assert picks == [(0, 1)] * 3 + [(2, 3)] * 3 + [(4, 5)] * 3


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (0, "Expected budget to be a positive int"),
        ("4", "Expected budget to be a positive int"),
        (True, "Expected budget to be a positive int"),
    ],
)
def test_bad_budgets_are_clear_errors(value, match):
    with pytest.raises(ConfigurationError, match=match):
        gradguard.Guard(budget=value)


def test_budget_fields_are_checked():
    with pytest.raises(ConfigurationError, match="Expected warmup to be an int from 0 to 32 but got 100"):
        Budget(warmup=100)
    with pytest.raises(ConfigurationError, match="Expected per_group to be a positive int or None"):
        Budget(per_group=0)
    assert gradguard.Guard(budget=None).budget.per_group is None
    assert gradguard.Guard(budget=2).budget.per_group == 2


def test_after_the_warm_up_each_check_looks_at_a_bounded_number_of_tensors(monkeypatch):
    looked: list[int] = []
    original = Rotation.pairs

    def counting(self, groups, tick):
        out = original(self, groups, tick)
        if tick > self.budget.warmup:
            looked.append(len(out))
        return out

    monkeypatch.setattr(Rotation, "pairs", counting)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(200)])  # 400 tensors in one group
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(2, 4)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(60):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    budget = guard.budget
    assert looked  # the rotations did run after the warm-up
    assert budget.per_group is not None
    assert max(looked) <= 4 * budget.per_group * budget.max_groups  # GG405's blocks are the widest
    assert guard.findings == []
