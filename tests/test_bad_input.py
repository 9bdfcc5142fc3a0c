"""Bad input that reaches gradguard's internals fails early and clearly, naming what is wrong."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from gradguard import ConfigurationError, GradientAccumulator, Guard
from gradguard.errors import GradGuardWarning, NothingWatchedWarning
from gradguard.findings import Finding, Location, Severity

from .helpers import line_of, tiny_data, tiny_model


# ---------------------------------------------------------------- Guard.load_state_dict
def fresh_guard() -> Guard:
    return Guard(policy="collect", detectors=["GG101"])


def saved_state() -> dict:
    """A guard's state that holds three findings."""
    with fresh_guard() as guard:
        pass
    findings = [
        Finding(
            "GG101", "missing-zero-grad", Severity.WARNING, f"gradients applied twice ({i})", "call zero_grad()",
            Location("train.py", 10 + i, "main"), where="fc.weight", step=i + 1, count=2, data={"steps": [i]},
        ).to_dict()
        for i in range(3)
    ]  # fmt: skip
    return {**guard.state_dict(), "step": 3, "iteration": 3, "clock": 3, "findings": findings}


def broken(path: tuple, value: object = None, *, drop: bool = False):
    """Makes ``saved_state()`` with the item at ``path`` replaced by ``value`` (or dropped)."""

    def make() -> dict:
        state = saved_state()
        parent = state
        for key in path[:-1]:
            parent = parent[key]
        if drop:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        return state

    return make


def test_a_saved_state_loads():
    guard = fresh_guard()
    guard.load_state_dict(saved_state())
    assert [f.message for f in guard.findings] == [f"gradients applied twice ({i})" for i in range(3)]
    assert (guard.step, guard.iteration, guard.run.clock) == (3, 3, 3)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: [("version", 1)], r"Expected state to be a dict from Guard.state_dict\(\) but got list"),
        (lambda: {"version": 99}, r"Expected state\['version'\] to be 1 .* but got 99"),
        (broken(("step",), "3"), r"Expected state\['step'\] to be an integer >= 0 but got '3'"),
        (broken(("clock",), -1), r"Expected state\['clock'\] to be an integer >= 0 but got -1"),
        (broken(("iteration",), True), r"Expected state\['iteration'\] to be an integer >= 0 but got True"),
        (broken(("findings",), {}), r"Expected state\['findings'\] to be a list of findings but got dict"),
        (
            broken(("findings", 2), "GG101"),
            r"Expected state\['findings'\]\[2\] to be a finding \(a dict with 'code', 'name', 'severity' and "
            r"'message', as Finding.to_dict\(\) makes\) but got str",
        ),
        (
            broken(("findings", 2, "severity"), drop=True),
            r"Expected state\['findings'\]\[2\] to be a finding .* but got a dict without 'severity'",
        ),
        (
            broken(("findings", 1, "severity"), "fatal"),
            r"Expected state\['findings'\]\[1\]\['severity'\] to be one of 'info', 'warning', 'error' but got 'fatal'",
        ),
        (
            broken(("findings", 1, "severity"), ["warning"]),
            r"Expected state\['findings'\]\[1\]\['severity'\] to be one of .* but got \['warning'\]",
        ),
        (broken(("findings", 0, "code"), 101), r"Expected state\['findings'\]\[0\]\['code'\] to be a str but got int"),
        (
            broken(("findings", 0, "count"), "2"),
            r"Expected state\['findings'\]\[0\]\['count'\] to be an integer >= 1 but got '2'",
        ),
        (broken(("findings", 0, "count"), 0), r"Expected state\['findings'\]\[0\]\['count'\] to be an integer >= 1"),
        (broken(("findings", 2, "step"), 1.5), r"Expected state\['findings'\]\[2\]\['step'\] to be an integer >= 0"),
        (
            broken(("findings", 2, "location"), "train.py:12"),
            r"Expected state\['findings'\]\[2\]\['location'\] to be None or a dict with 'file' and 'line' "
            r"but got 'train.py:12'",
        ),
        (
            broken(("findings", 2, "location", "line"), "12"),
            r"Expected state\['findings'\]\[2\]\['location'\]\['line'\] to be an integer >= 0 but got '12'",
        ),
        (
            broken(("findings", 2, "data"), [1]),
            r"Expected state\['findings'\]\[2\]\['data'\] to be a dict or None but got list",
        ),
        (
            broken(("detectors",), ["GG101"]),
            r"Expected state\['detectors'\] to be a dict of detector states by code but got list",
        ),
        (
            broken(("detectors", "GG101"), []),
            r"Expected state\['detectors'\]\['GG101'\] to be a dict \(the state of GG101\) but got list",
        ),
        (
            broken(("detectors", "GG101", "nonsense"), 1),
            r"Expected the keys of state\['detectors'\]\['GG101'\] among \[.*\] but got 'nonsense'",
        ),
    ],
)
def test_a_malformed_guard_state_is_a_clear_error_and_restores_nothing(make, match):
    state = make()
    frozen = copy.deepcopy(state)
    guard = fresh_guard()
    with pytest.raises(ConfigurationError, match=match):
        guard.load_state_dict(state)
    assert (guard.findings, guard.step, guard.iteration, guard.run.clock) == ([], 0, 0, 0)
    assert state == frozen  # the argument is left as it was


def test_a_configuration_error_is_a_value_error():
    with pytest.raises(ValueError, match=r"state\['findings'\]\[2\]"):
        fresh_guard().load_state_dict(broken(("findings", 2, "message"), drop=True)())


# ---------------------------------------------------------------- GradientAccumulator.load_state_dict
def accumulator_state():
    """A GradientAccumulator of tiny_model() with steps=3, its state in the middle of a window."""
    model = tiny_model()
    acc = GradientAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), steps=3)
    x, y = tiny_data()
    acc.backward(nn.functional.mse_loss(model(x), y), num_items=len(x))
    return acc, acc.state_dict()


TENSOR_OR_NONE = "to be a torch.Tensor or None but got"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"grads": [[0.0], None, None, None]}, rf"Expected state\['grads'\]\[0\] {TENSOR_OR_NONE} list"),
        ({"grads": [None, None, 3.0, None]}, rf"Expected state\['grads'\]\[2\] {TENSOR_OR_NONE} float"),
        ({"grads": {"0.weight": None}}, r"Expected the saved gradients .* in state\['grads'\] but got dict"),
        ({"grads": [None] * 3}, r"for 4 parameters in state\['grads'\] but got 3"),
        ({"count": "1"}, r"Expected state\['count'\] to be an integer >= 0 but got '1'"),
        ({"micro_batches": -1}, r"Expected state\['micro_batches'\] to be an integer >= 0 but got -1"),
        ({"optimizer_steps": 2.0}, r"Expected state\['optimizer_steps'\] to be an integer >= 0 but got 2.0"),
        ({"skipped_windows": None}, r"Expected state\['skipped_windows'\] to be an integer >= 0 but got None"),
        ({"steps": 0}, r"Expected state\['steps'\] to be a positive integer but got 0"),
        ({"total": "8"}, r"Expected state\['total'\] to be a non-negative number or None but got '8'"),
        ({"total": float("nan")}, r"Expected state\['total'\] to be a non-negative number or None but got nan"),
    ],
)
def test_a_malformed_accumulator_state_is_a_clear_error_and_restores_nothing(change, match):
    acc, state = accumulator_state()
    fresh = GradientAccumulator(acc.optimizer, steps=3)
    with pytest.raises(ConfigurationError, match=match):
        fresh.load_state_dict({**state, **change})
    assert (fresh.accumulated, fresh.micro_batches) == (0, 0)


def test_a_saved_accumulator_state_loads():
    acc, state = accumulator_state()
    fresh = GradientAccumulator(acc.optimizer, steps=3)
    fresh.load_state_dict(state)
    assert (fresh.accumulated, fresh.micro_batches) == (1, 1)


# ---------------------------------------------------------------- a Guard with no model
def train(model, opt, steps=3):
    x, y = tiny_data()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()  # the first iteration ends here
        opt.step()


def test_a_guard_given_nothing_warns_once_that_it_watches_nothing():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    warns = pytest.warns(NothingWatchedWarning, match=r"^gradguard: this Guard watches nothing")
    with warns as warned, Guard(None, policy="collect") as guard:
        train(model, opt)
    assert len(warned) == 1
    assert warned[0].lineno == line_of("# the first iteration ends here")
    assert issubclass(warned[0].category, GradGuardWarning)
    assert guard.findings == []  # a warning about gradguard's use, not a finding


def test_a_guard_given_only_an_optimizer_warns_that_it_watches_no_model():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    warns = pytest.warns(NothingWatchedWarning, match=r"was given no model: .* until guard.add_model\(model\)")
    with warns as warned, Guard(optimizer=opt, policy="collect") as guard:
        train(model, opt)
    assert len(warned) == 1
    assert guard.step == 3


def test_a_guard_given_its_model_later_or_global_says_nothing():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NothingWatchedWarning)
        with Guard(policy="collect") as later:
            later.add_model(model)
            later.add_optimizer(opt)
            train(model, opt)
        with Guard(global_hooks=True, policy="collect") as everywhere:
            train(model, opt)
        with Guard(policy="collect", detectors=["GG501"]):  # watches numpy aliases, needs no model
            train(model, opt)
    assert later.iteration == 3
    assert everywhere.step == 3
