"""Learning-rate scaling: the rules, schedulers made before or after, warm-up, resume."""

import math

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as sched_mod

from gradguard import ConfigurationError, GradGuardWarning, GradientAccumulator, lr_scale_factor, scale_lr
from gradguard.lr import warmup_multiplier


def two_group_sgd(lr_body=0.01, lr_head=0.1, momentum=0.9):
    torch.manual_seed(0)
    body, head = nn.Linear(3, 3), nn.Linear(3, 1)
    model = nn.Sequential(body, head)
    opt = torch.optim.SGD(
        [{"params": body.parameters(), "lr": lr_body}, {"params": head.parameters(), "lr": lr_head}],
        lr=lr_head,
        momentum=momentum,
    )
    return model, opt


def lrs(opt):
    return [group["lr"] for group in opt.param_groups]


def run_windows(acc, model, windows):
    for _ in range(windows * acc.steps):
        acc.backward(model(torch.ones(2, 3)).pow(2).mean())


# ---------------------------------------------------------------- the rules
@pytest.mark.parametrize(
    ("rule", "base", "effective", "expected"),
    [
        ("linear", 256, 1024, 4.0),
        ("linear", 256, 64, 0.25),
        ("sqrt", 256, 1024, 2.0),
        ("sqrt", 32, 64, math.sqrt(2)),
        ("linear", 32, 32, 1.0),
    ],
)
def test_lr_scale_factor(rule, base, effective, expected):
    assert lr_scale_factor(rule, base, effective) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("cubic", 32, 64), r"Expected rule to be one of 'linear', 'sqrt' but got 'cubic'"),
        (("linear", 0, 64), r"Expected base_batch_size to be a positive integer but got 0"),
        (("linear", 32, 6.5), r"Expected effective_batch_size to be a positive integer but got 6.5"),
        (("sqrt", True, 64), r"Expected base_batch_size to be a positive integer but got True"),
    ],
)
def test_lr_scale_factor_rejects_bad_input(args, match):
    with pytest.raises(ConfigurationError, match=match):
        lr_scale_factor(*args)


@pytest.mark.parametrize("factor", [0, -2.0, float("nan"), float("inf"), "2", True])
def test_scale_lr_rejects_bad_factors(factor):
    _, opt = two_group_sgd()
    with pytest.raises(ConfigurationError, match="Expected factor to be a positive finite number"):
        scale_lr(opt, factor)


def test_scale_lr_rejects_a_non_optimizer():
    with pytest.raises(ConfigurationError, match=r"Expected optimizer to be a torch\.optim\.Optimizer but got object"):
        scale_lr(object(), 2.0)


def test_scale_lr_keeps_the_ratio_between_groups():
    _, opt = two_group_sgd(lr_body=0.01, lr_head=0.1)
    scale_lr(opt, 8.0)
    assert lrs(opt) == pytest.approx([0.08, 0.8])


# ---------------------------------------------------------------- schedulers before and after
SCHEDULERS = {
    "StepLR": lambda opt: sched_mod.StepLR(opt, step_size=2, gamma=0.5),
    "ExponentialLR": lambda opt: sched_mod.ExponentialLR(opt, gamma=0.9),
    "LambdaLR": lambda opt: sched_mod.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
    "CosineAnnealingLR": lambda opt: sched_mod.CosineAnnealingLR(opt, T_max=5),
    "LinearLR": lambda opt: sched_mod.LinearLR(opt, start_factor=0.1, total_iters=4),
    "PolynomialLR": lambda opt: sched_mod.PolynomialLR(opt, total_iters=6, power=2.0),
    "OneCycleLR": lambda opt: sched_mod.OneCycleLR(opt, max_lr=[0.05, 0.5], total_steps=10),
    "CyclicLR": lambda opt: sched_mod.CyclicLR(opt, base_lr=[0.001, 0.01], max_lr=[0.01, 0.1], step_size_up=3),
    "SequentialLR": lambda opt: sched_mod.SequentialLR(
        opt,
        [sched_mod.LinearLR(opt, start_factor=0.5, total_iters=2), sched_mod.ExponentialLR(opt, gamma=0.8)],
        milestones=[2],
    ),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_scheduler_made_before_scaling_follows_the_scaled_lr(name):
    # Scaling (opt, scheduler) afterwards gives the same trajectory as a scheduler made on
    # an optimizer whose learning rates were scaled from the start.
    _, before = two_group_sgd()
    sched_before = SCHEDULERS[name](before)
    scale_lr(before, 4.0, scheduler=sched_before)

    _, after = two_group_sgd(lr_body=0.04, lr_head=0.4)
    if name in ("OneCycleLR", "CyclicLR"):  # these take their range from arguments: scale them too
        sched_after = {
            "OneCycleLR": lambda opt: sched_mod.OneCycleLR(opt, max_lr=[0.2, 2.0], total_steps=10),
            "CyclicLR": lambda opt: sched_mod.CyclicLR(opt, base_lr=[0.004, 0.04], max_lr=[0.04, 0.4], step_size_up=3),
        }[name](after)
    else:
        sched_after = SCHEDULERS[name](after)

    for _ in range(8):
        assert lrs(before) == pytest.approx(lrs(after), rel=1e-12)
        assert sched_before.get_last_lr() == pytest.approx(sched_after.get_last_lr(), rel=1e-12)
        before.step()
        after.step()
        sched_before.step()
        sched_after.step()


def test_a_scheduler_made_after_the_accumulator_sees_the_scaled_lr():
    model, opt = two_group_sgd()
    acc = GradientAccumulator(opt, steps=4, lr_scaling="linear", base_batch_size=16, micro_batch_size=8)
    sched = sched_mod.CosineAnnealingLR(opt, T_max=10)
    assert sched.base_lrs == pytest.approx([0.02, 0.2])
    acc.scheduler = sched
    run_windows(acc, model, 1)
    assert lrs(opt) == pytest.approx([0.02 * (1 + math.cos(math.pi / 10)) / 2, 0.2 * (1 + math.cos(math.pi / 10)) / 2])


def test_tensor_learning_rates_are_scaled_once_in_place():
    model = nn.Linear(2, 1)
    lr = torch.tensor(0.01)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = sched_mod.StepLR(opt, step_size=1)
    scale_lr(opt, 3.0, scheduler=sched)
    assert opt.param_groups[0]["lr"] is lr
    assert float(lr) == pytest.approx(0.03)
    assert float(opt.param_groups[0]["initial_lr"]) == pytest.approx(0.03)
    assert float(sched.base_lrs[0]) == pytest.approx(0.03)


# ---------------------------------------------------------------- the accumulator's scaling
@pytest.mark.parametrize(("rule", "factor"), [("linear", 4.0), ("sqrt", 2.0)])
def test_accumulator_scales_every_group_by_the_effective_batch(rule, factor):
    _, opt = two_group_sgd()
    acc = GradientAccumulator(opt, steps=8, lr_scaling=rule, base_batch_size=32, micro_batch_size=16)
    assert acc.effective_batch_size == 128
    assert acc.lr_factor == pytest.approx(factor)
    assert lrs(opt) == pytest.approx([0.01 * factor, 0.1 * factor])


def test_accumulator_scales_a_scheduler_it_is_given():
    model, opt = two_group_sgd()
    sched = sched_mod.LambdaLR(opt, lambda s: 0.5**s)
    acc = GradientAccumulator(opt, steps=2, scheduler=sched, lr_scaling="linear", base_batch_size=4, micro_batch_size=4)
    run_windows(acc, model, 2)
    assert lrs(opt) == pytest.approx([0.02 * 0.25, 0.2 * 0.25])


def test_accumulator_warns_about_a_scheduler_it_was_not_given():
    _, opt = two_group_sgd()
    sched_mod.LambdaLR(opt, lambda s: 1.0)
    with pytest.warns(GradGuardWarning, match="not passed as scheduler="):
        GradientAccumulator(opt, steps=2, lr_scaling="linear", base_batch_size=4, micro_batch_size=4)


def test_the_lr_is_never_scaled_twice():
    _, opt = two_group_sgd()
    GradientAccumulator(opt, steps=4, lr_scaling="linear", base_batch_size=8, micro_batch_size=8)
    assert lrs(opt) == pytest.approx([0.04, 0.4])
    GradientAccumulator(opt, steps=4, lr_scaling="linear", base_batch_size=8, micro_batch_size=8)
    assert lrs(opt) == pytest.approx([0.04, 0.4])

    # resume: build the optimizer afresh, load its saved state, then the accumulator
    state = opt.state_dict()
    _, fresh = two_group_sgd()
    fresh.load_state_dict(state)
    acc = GradientAccumulator(fresh, steps=4, lr_scaling="linear", base_batch_size=8, micro_batch_size=8)
    assert lrs(fresh) == pytest.approx([0.04, 0.4])
    # a resumed run with twice the micro-batches per step rescales by the ratio only
    GradientAccumulator(fresh, steps=8, lr_scaling="linear", base_batch_size=8, micro_batch_size=8)
    assert lrs(fresh) == pytest.approx([0.08, 0.8])
    assert acc.lr_factor == 4.0


# ---------------------------------------------------------------- warm-up
def test_warmup_ramps_from_the_unscaled_to_the_scaled_lr_over_optimizer_steps():
    model, opt = two_group_sgd()
    used = []
    opt.register_step_pre_hook(lambda o, args, kwargs: used.append(lrs(o)))
    acc = GradientAccumulator(opt, steps=3, lr_scaling="linear", base_batch_size=6, micro_batch_size=8, warmup_steps=4)
    assert acc.lr_factor == 4.0
    run_windows(acc, model, 6)  # 18 micro-batches, 6 optimizer steps
    expected = [0.25 + 0.75 * t / 4 if t < 4 else 1.0 for t in range(6)]
    assert [u[1] for u in used] == pytest.approx([0.4 * m for m in expected])
    assert [u[0] / u[1] for u in used] == pytest.approx([0.1] * 6)  # per-group ratio kept
    assert lrs(opt) == pytest.approx([0.04, 0.4])  # the warm-up never writes the param groups


def test_warmup_composes_with_a_scheduler():
    model, opt = two_group_sgd()
    used = []
    opt.register_step_pre_hook(lambda o, args, kwargs: used.append(o.param_groups[1]["lr"]))
    sched = sched_mod.ExponentialLR(opt, gamma=0.5)
    acc = GradientAccumulator(
        opt,
        steps=2,
        scheduler=sched,
        lr_scaling="sqrt",
        base_batch_size=2,
        micro_batch_size=2,
        warmup_steps=2,
    )
    run_windows(acc, model, 3)
    scaled = 0.1 * math.sqrt(2)
    ramp = [1 / math.sqrt(2), 1 / math.sqrt(2) + (1 - 1 / math.sqrt(2)) / 2, 1.0]
    assert used == pytest.approx([scaled * 0.5**t * ramp[t] for t in range(3)])


def test_warmup_multiplier_reaches_one():
    assert warmup_multiplier(0, 10, 4.0) == 0.25
    assert warmup_multiplier(10, 10, 4.0) == 1.0
    assert warmup_multiplier(3, 0, 4.0) == 1.0
    values = [warmup_multiplier(t, 10, 4.0) for t in range(12)]
    assert values == sorted(values)


def test_warmup_resumes_where_it_was():
    model, opt = two_group_sgd()
    kwargs = {"steps": 2, "lr_scaling": "linear", "base_batch_size": 2, "micro_batch_size": 2, "warmup_steps": 4}
    acc = GradientAccumulator(opt, **kwargs)
    run_windows(acc, model, 2)
    state = acc.state_dict()
    used = []
    opt.register_step_pre_hook(lambda o, args, kwargs: used.append(o.param_groups[1]["lr"]))
    resumed = GradientAccumulator(opt, **kwargs)
    resumed.load_state_dict(state)
    run_windows(resumed, model, 1)
    assert used == pytest.approx([0.2 * (0.5 + 0.5 * 2 / 4)])
