"""What an optimizer holds: the rule GG403, GG405 and GG406 share, and what reading it costs."""

from __future__ import annotations

import torch
from torch import nn

import gradguard
from gradguard.holdings import CONFIRM, GradientSeen, left_behind


class CountedList(list):
    """A param group's list of tensors that counts how often it is read through."""

    reads = 0

    def __iter__(self):
        type(self).reads += 1
        return super().__iter__()


def _counted(opt):
    CountedList.reads = 0
    for group in opt.param_groups:
        group["params"] = CountedList(group["params"])
    return opt


def test_an_optimizer_that_updates_nothing_is_read_in_full_ever_more_rarely():
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    opt = _counted(torch.optim.SGD([frozen], lr=0.1))
    seen = GradientSeen()
    for _ in range(100):
        seen.look(opt)
    assert seen.idle(opt)
    assert CountedList.reads == CONFIRM + 5  # looks 1 to 3, then 4, 8, 16, 32 and 64


def test_an_optimizer_seen_with_a_gradient_is_never_read_again():
    model = nn.Linear(2, 1)
    opt = _counted(torch.optim.SGD(model.parameters(), lr=0.1))
    model(torch.ones(1, 2)).sum().backward()
    seen = GradientSeen()
    for _ in range(100):
        seen.look(opt)
    assert seen.busy(opt)
    assert not seen.undecided(opt)
    assert CountedList.reads == 1


def test_a_new_param_group_is_looked_at_at_once():
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    opt = torch.optim.SGD([frozen], lr=0.1)
    seen = GradientSeen()
    for _ in range(10):
        seen.look(opt)
    trained = nn.Parameter(torch.ones(2))
    trained.grad = torch.ones(2)
    opt.add_param_group({"params": [trained]})
    seen.look(opt)  # look 11: not a power of two, but the groups changed
    assert seen.busy(opt)


def test_the_old_tensors_of_a_replaced_layer_are_left_behind_under_their_old_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    old = list(model[1].parameters())
    with gradguard.Guard(model, opt, detectors=[], policy="collect") as guard:
        model[1] = nn.Linear(2, 1)  # the guard has not read the model's names yet
        run = guard.run
        assert left_behind(run, list(model.parameters()) + old) == old
        assert [run.param_name(p) for p in old] == ["1.weight", "1.bias"]
        assert run.replaced(old[0])
        assert not run.replaced(model[1].weight)
