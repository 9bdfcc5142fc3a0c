"""GradientAccumulator: equality with the big batch, order of a real step, state, findings, errors."""

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import gradguard
from gradguard import ConfigurationError, GradientAccumulator, Guard
from gradguard.detectors import MissingZeroGrad

OPTIMIZERS = ("sgd", "momentum", "adamw")


def make_model(seed=0, batchnorm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)]
    if batchnorm:
        layers.insert(1, nn.BatchNorm1d(4))
    return nn.Sequential(*layers)


def make_optimizer(kind, model):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1)
    if kind == "momentum":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=1e-2)


def make_data(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=gen), torch.randn(n, 2, generator=gen)) for n in sizes]


def item_losses(model, x, y):
    return F.mse_loss(model(x), y, reduction="none").mean(dim=1)  # one loss per item


def windows(seq, steps):
    return [seq[i : i + steps] for i in range(0, len(seq), steps)]


def big_batch_run(model, optimizer, batches, steps, weighted, max_grad_norm=None):
    """The reference: one optimizer step per window, on its micro-batches concatenated.

    Weighted, every item of the window weighs the same (the mean over the window's items);
    unweighted, every micro-batch weighs the same (the mean of the micro-batch means).
    """
    for window in windows(batches, steps):
        x = torch.cat([b[0] for b in window])
        y = torch.cat([b[1] for b in window])
        if weighted:
            weights = torch.full((len(x),), 1.0 / len(x))
        else:
            weights = torch.cat([torch.full((len(b[0]),), 1.0 / (len(b[0]) * len(window))) for b in window])
        (item_losses(model, x, y) * weights).sum().backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()


def accumulated_run(acc, model, batches, weighted):
    stepped = []
    for x, y in batches:
        loss = item_losses(model, x, y).mean()
        stepped.append(acc.backward(loss, num_items=len(x) if weighted else None))
    stepped.append(acc.flush())
    return stepped


def assert_same_params(a, b):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------- equality with the big batch
@settings(max_examples=30, deadline=None)
@given(
    steps=st.integers(1, 4),
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=9),
    weighted=st.booleans(),
    kind=st.sampled_from(OPTIMIZERS),
    seed=st.integers(0, 2**16),
)
def test_accumulation_equals_the_big_batch(steps, sizes, weighted, kind, seed):
    batches = make_data(sizes, seed)
    model, reference = make_model(seed), make_model(seed)
    opt, ref_opt = make_optimizer(kind, model), make_optimizer(kind, reference)

    stepped = accumulated_run(GradientAccumulator(opt, steps=steps), model, batches, weighted)
    big_batch_run(reference, ref_opt, batches, steps, weighted)

    assert_same_params(model, reference)
    full, rest = divmod(len(sizes), steps)
    assert sum(stepped) == full + (rest > 0)
    assert stepped[-1] == (rest > 0)  # flush() steps only on a partial window


@settings(max_examples=10, deadline=None)
@given(steps=st.integers(2, 4), partial=st.integers(1, 3), kind=st.sampled_from(OPTIMIZERS))
def test_equal_micro_batches_without_num_items_equal_the_concatenated_mean(steps, partial, kind):
    partial = min(partial, steps - 1)
    batches = make_data([4] * (2 * steps + partial), seed=steps)
    model, reference = make_model(1), make_model(1)
    opt, ref_opt = make_optimizer(kind, model), make_optimizer(kind, reference)
    accumulated_run(GradientAccumulator(opt, steps=steps), model, batches, weighted=False)
    for window in windows(batches, steps):  # plain mean over the concatenated batch
        x, y = torch.cat([b[0] for b in window]), torch.cat([b[1] for b in window])
        item_losses(reference, x, y).mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert_same_params(model, reference)


def test_partial_window_is_not_down_weighted():
    # Dividing every micro-batch by steps (Lightning #19987, Accelerate #1847) gives a last
    # window of r micro-batches the weight r/steps; flush() normalises by r.
    batches = make_data([2] * 5)
    model, naive, reference = make_model(), make_model(), make_model()
    accumulated_run(GradientAccumulator(make_optimizer("sgd", model), steps=4), model, batches, weighted=False)
    big_batch_run(reference, make_optimizer("sgd", reference), batches, 4, weighted=False)
    naive_opt = make_optimizer("sgd", naive)
    for i, (x, y) in enumerate(batches):
        (item_losses(naive, x, y).mean() / 4).backward()
        if (i + 1) % 4 == 0 or i == len(batches) - 1:
            naive_opt.step()
            naive_opt.zero_grad()
    assert_same_params(model, reference)
    assert not torch.allclose(naive[0].weight, reference[0].weight, rtol=1e-4)


def test_num_items_gives_the_token_mean_not_the_mean_of_means():
    # trl#2175: averaging micro-batch token means gives sum(x_i / n_i) / K, not sum(x) / sum(n).
    batches = make_data([1, 7, 2])
    model, unweighted, reference = make_model(), make_model(), make_model()
    accumulated_run(GradientAccumulator(make_optimizer("sgd", model), steps=3), model, batches, weighted=True)
    opt = make_optimizer("sgd", unweighted)
    accumulated_run(GradientAccumulator(opt, steps=3), unweighted, batches, weighted=False)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    item_losses(reference, x, y).mean().backward()
    make_optimizer("sgd", reference).step()
    assert_same_params(model, reference)
    assert not torch.allclose(unweighted[0].weight, reference[0].weight, rtol=1e-4)


def test_num_items_as_tensors_and_floats():
    batches = make_data([3, 5, 2, 4])
    model, reference = make_model(), make_model()
    acc = GradientAccumulator(make_optimizer("momentum", model), steps=2)
    for i, (x, y) in enumerate(batches):
        n = torch.tensor(len(x)) if i % 2 else float(len(x))
        acc.backward(item_losses(model, x, y).mean(), num_items=n)
    big_batch_run(reference, make_optimizer("momentum", reference), batches, 2, weighted=True)
    assert_same_params(model, reference)


def adamw_accumulator(model, **kwargs):
    """AdamW with weight decay (a step on a zero gradient still moves the weights), a scheduler and a warm-up."""
    opt = make_optimizer("adamw", model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    acc = GradientAccumulator(
        opt,
        steps=2,
        scheduler=sched,
        lr_scaling="linear",
        base_batch_size=2,
        micro_batch_size=2,
        warmup_steps=3,
        **kwargs,
    )
    return acc, opt, sched


def test_a_window_without_items_makes_no_step_and_changes_nothing():
    model, reference = make_model(), make_model()
    acc, opt, sched = adamw_accumulator(model)
    before = copy.deepcopy(model.state_dict())
    (x, y), (x2, y2), (x3, y3), (x4, y4) = make_data([2, 2, 2, 2])
    assert not acc.backward(item_losses(model, x, y).mean(), num_items=0)
    with pytest.warns(gradguard.errors.EmptyWindowWarning, match=r"micro-batches 1-2\) add up to 0") as warned:
        assert not acc.backward(item_losses(model, x2, y2).mean(), num_items=0)
    assert len(warned) == 1
    assert warned[0].filename == __file__  # the user's acc.backward() line
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])
    assert opt.state_dict()["state"] == {}  # AdamW never stepped
    assert sched.last_epoch == 0
    assert all(p.grad is None for p in model.parameters())  # reset, as after a step
    assert (acc.optimizer_steps, acc.skipped_windows, acc.accumulated, acc.micro_batches) == (0, 1, 0, 2)
    # the next windows train exactly as if the empty one had never been: same warm-up, scheduler and AdamW steps
    ref_acc, ref_opt, ref_sched = adamw_accumulator(reference)
    for run, a in ((model, acc), (reference, ref_acc)):
        for xb, yb in ((x3, y3), (x4, y4), (x, y), (x2, y2)):
            a.backward(item_losses(run, xb, yb).mean(), num_items=len(xb))
    assert (acc.optimizer_steps, ref_acc.optimizer_steps) == (2, 2)
    assert sched.last_epoch == ref_sched.last_epoch == 2
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    for pa, pb in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_an_empty_window_warns_once_and_is_counted_each_time(recwarn):
    model = make_model()
    acc = GradientAccumulator(make_optimizer("adamw", model), steps=1)
    (x, y), (x2, y2) = make_data([2, 2])
    with pytest.warns(gradguard.errors.EmptyWindowWarning, match=r"\(micro-batch 1\)"):
        assert not acc.backward(item_losses(model, x, y).mean(), num_items=0)
    assert not acc.backward(item_losses(model, x2, y2).mean(), num_items=0.0)
    assert not [w for w in recwarn if issubclass(w.category, gradguard.errors.EmptyWindowWarning)]
    assert (acc.optimizer_steps, acc.skipped_windows) == (0, 2)
    state = acc.state_dict()
    assert state["skipped_windows"] == 2
    resumed = GradientAccumulator(make_optimizer("adamw", model), steps=1)
    resumed.load_state_dict(state)
    assert resumed.skipped_windows == 2


def test_a_partial_window_without_items_flushes_with_no_step():
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    acc, _, sched = adamw_accumulator(model, scaler=scaler)
    before = copy.deepcopy(model.state_dict())
    (x, y), (x2, y2), (x3, y3) = make_data([2, 2, 2])
    acc.backward(item_losses(model, x, y).mean(), num_items=1)
    acc.backward(item_losses(model, x2, y2).mean(), num_items=3)  # one real step: the scaler grows
    assert scaler.get_scale() == 2.0**9
    after_step = copy.deepcopy(model.state_dict())
    acc.backward(item_losses(model, x3, y3).mean(), num_items=0)
    with pytest.warns(gradguard.errors.EmptyWindowWarning, match=r"\(micro-batch 3\)"):
        assert not acc.flush()
    assert scaler.get_scale() == 2.0**9  # no scaler.update() for the empty window
    assert (acc.optimizer_steps, acc.skipped_windows, sched.last_epoch) == (1, 1, 1)
    assert any(not torch.equal(after_step[n], before[n]) for n in before)
    for name, p in model.named_parameters():
        assert torch.equal(p, after_step[name])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_steps_1_is_exactly_a_plain_loop(kind, weighted):
    batches = make_data([3, 2, 4, 1])
    model, plain = make_model(), make_model()
    stepped = accumulated_run(GradientAccumulator(make_optimizer(kind, model), steps=1), model, batches, weighted)
    opt = make_optimizer(kind, plain)
    for x, y in batches:
        item_losses(plain, x, y).mean().backward()
        opt.step()
        opt.zero_grad()
    assert stepped == [True, True, True, True, False]
    for pa, pb in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(pa, pb)  # bit for bit


def test_steps_1_with_any_num_items_is_exactly_a_plain_loop():
    batches = make_data([3, 2, 4, 1, 5])
    model, plain = make_model(), make_model()
    acc = GradientAccumulator(make_optimizer("adamw", model), steps=1)
    for (x, y), n in zip(batches, [49, 7, 93, 1, 0.3], strict=True):  # n * (1 / n) != 1 for n = 49
        acc.backward(item_losses(model, x, y).mean(), num_items=n)
    opt = make_optimizer("adamw", plain)
    for x, y in batches:
        item_losses(plain, x, y).mean().backward()
        opt.step()
        opt.zero_grad()
    for pa, pb in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_resume_with_more_micro_batches_per_step_keeps_the_weights():
    batches = make_data([2] * 5)
    model, reference = make_model(), make_model()
    opt = make_optimizer("sgd", model)
    acc = GradientAccumulator(opt, steps=2)
    acc.backward(item_losses(model, *batches[0]).mean())
    resumed = GradientAccumulator(opt, steps=5)
    resumed.load_state_dict(acc.state_dict())
    for x, y in batches[1:]:
        resumed.backward(item_losses(model, x, y).mean())
    big_batch_run(reference, make_optimizer("sgd", reference), batches, 5, weighted=False)
    assert resumed.optimizer_steps == 1
    assert_same_params(model, reference)


def test_grads_are_set_to_none_after_each_step():
    model = make_model()
    acc = GradientAccumulator(make_optimizer("sgd", model), steps=2)
    (x, y), (x2, y2) = make_data([2, 2])
    acc.backward(item_losses(model, x, y).mean())
    assert all(p.grad is not None for p in model.parameters())
    acc.backward(item_losses(model, x2, y2).mean())
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- order of a real step
@pytest.mark.parametrize("weighted", [False, True])
def test_clipping_applies_to_the_normalised_window_gradient(weighted):
    batches = make_data([3, 1, 4, 2, 2])
    model, reference = make_model(), make_model()
    acc = GradientAccumulator(make_optimizer("momentum", model), steps=2, max_grad_norm=0.05)
    accumulated_run(acc, model, batches, weighted)
    big_batch_run(reference, make_optimizer("momentum", reference), batches, 2, weighted, max_grad_norm=0.05)
    assert_same_params(model, reference)


def test_grad_scaler_on_cpu_unscales_before_clipping():
    batches = make_data([3, 1, 4, 2, 2])
    model, reference = make_model(), make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    acc = GradientAccumulator(make_optimizer("adamw", model), steps=2, scaler=scaler, max_grad_norm=0.05)
    accumulated_run(acc, model, batches, weighted=True)
    big_batch_run(reference, make_optimizer("adamw", reference), batches, 2, weighted=True, max_grad_norm=0.05)
    assert_same_params(model, reference)
    assert scaler.get_scale() == 2.0**12  # no overflow, no growth yet


def test_grad_scaler_skips_a_window_with_an_infinite_loss():
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    opt = make_optimizer("momentum", model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    acc = GradientAccumulator(opt, steps=2, scaler=scaler, scheduler=sched)
    (x, y), (x2, y2) = make_data([2, 2])
    acc.backward(item_losses(model, x, y).mean() * float("inf"))  # left to the scaler
    with pytest.warns(UserWarning, match="lr_scheduler.step"):  # torch's own warning: the step was skipped
        assert acc.backward(item_losses(model, x2, y2).mean())
    assert scaler.get_scale() == 2.0**7
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])
    assert all(p.grad is None for p in model.parameters())


def test_scheduler_steps_once_per_optimizer_step():
    model = make_model()
    opt = make_optimizer("sgd", model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    acc = GradientAccumulator(opt, steps=3, scheduler=sched)
    accumulated_run(acc, model, make_data([2] * 7), weighted=False)
    assert acc.optimizer_steps == 3
    assert sched.last_epoch == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_scheduler_sees_the_lr_of_the_optimizer_step_it_follows():
    model = make_model()
    opt = make_optimizer("sgd", model)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(o.param_groups[0]["lr"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    acc = GradientAccumulator(opt, steps=2, scheduler=sched)
    accumulated_run(acc, model, make_data([2] * 6), weighted=False)
    assert seen == pytest.approx([0.1, 0.05, 0.1 / 3])


# ---------------------------------------------------------------- state
def test_resume_in_the_middle_of_a_window_is_exact(tmp_path):
    batches = make_data([2, 3, 1, 4, 2, 3, 1], seed=3)
    model, reference = make_model(), make_model()
    opt = make_optimizer("adamw", model)
    acc = GradientAccumulator(opt, steps=3)
    for x, y in batches[:5]:  # one full window, then 2 of 3 micro-batches
        acc.backward(item_losses(model, x, y).mean(), num_items=len(x))
    assert acc.accumulated == 2
    state = acc.state_dict()
    snapshot = copy.deepcopy(state)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "acc": state}, path)

    checkpoint = torch.load(path, weights_only=True)
    resumed = make_model(seed=5)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = make_optimizer("adamw", resumed)
    resumed_opt.load_state_dict(checkpoint["opt"])
    resumed_acc = GradientAccumulator(resumed_opt, steps=3)
    resumed_acc.load_state_dict(checkpoint["acc"])
    assert (resumed_acc.accumulated, resumed_acc.optimizer_steps, resumed_acc.micro_batches) == (2, 1, 5)
    for x, y in batches[5:]:
        resumed_acc.backward(item_losses(resumed, x, y).mean(), num_items=len(x))
    resumed_acc.flush()

    big_batch_run(reference, make_optimizer("adamw", reference), batches, 3, weighted=True)
    assert_same_params(resumed, reference)
    # the state dict given to load_state_dict is left as it was
    assert checkpoint["acc"].keys() == snapshot.keys()
    for key, value in snapshot.items():
        if key == "grads":
            for a, b in zip(checkpoint["acc"]["grads"], value, strict=True):
                assert torch.equal(a, b)
        else:
            assert checkpoint["acc"][key] == value


def test_state_dict_holds_no_gradient_between_windows():
    model = make_model()
    acc = GradientAccumulator(make_optimizer("sgd", model), steps=2)
    assert acc.state_dict()["grads"] is None
    state = acc.state_dict()
    acc.load_state_dict(state)
    assert state == acc.state_dict()


def test_load_state_dict_rejects_bad_states():
    model = make_model()
    acc = GradientAccumulator(make_optimizer("sgd", model), steps=2)
    with pytest.raises(ConfigurationError, match="Expected a GradientAccumulator state dict"):
        acc.load_state_dict({"count": 1})
    state = acc.state_dict()
    with pytest.raises(ConfigurationError, match="fewer than steps=2"):
        acc.load_state_dict({**state, "count": 2, "grads": [None] * 4})
    with pytest.raises(ConfigurationError, match="saved gradients of the open window for 4 parameters"):
        acc.load_state_dict({**state, "count": 1, "grads": None})


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, r"Expected steps to be a positive integer but got 0"),
        ({"steps": 2.0}, r"Expected steps to be a positive integer but got 2.0"),
        ({"steps": True}, r"Expected steps to be a positive integer but got True"),
        ({"lr_scaling": "linear"}, r"Expected base_batch_size .* but got None"),
        ({"lr_scaling": "linear", "base_batch_size": 32}, r"Expected micro_batch_size .* but got None"),
        ({"lr_scaling": "cubic", "base_batch_size": 32}, r"Expected lr_scaling to be None, 'linear' or 'sqrt'"),
        ({"warmup_steps": 5}, r"Expected lr_scaling with warmup_steps=5"),
        ({"warmup_steps": -1}, r"Expected warmup_steps to be an integer >= 0 but got -1"),
        ({"max_grad_norm": 0.0}, r"Expected max_grad_norm to be a positive number"),
        ({"scaler": object()}, r"Expected scaler to be a torch.amp.GradScaler but got object"),
        ({"scheduler": 3}, r"Expected scheduler to be a learning-rate scheduler but got int"),
        ({"sync_num_items": True}, r"Expected torch.distributed to be initialised"),
        ({"model": "net"}, r"Expected model to be a torch.nn.Module or None but got str"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs, match):
    model = make_model()
    args = {"steps": 2, **kwargs}
    with pytest.raises(ConfigurationError, match=match):
        GradientAccumulator(make_optimizer("sgd", model), **args)


def test_a_non_optimizer_is_a_clear_error():
    model = make_model()
    with pytest.raises(ConfigurationError, match=r"Expected optimizer to be a torch\.optim\.Optimizer but got Seq"):
        GradientAccumulator(model, steps=2)
    with pytest.raises(ValueError, match="Expected optimizer"):  # ConfigurationError is a ValueError
        GradientAccumulator(None, steps=2)


def test_reduce_lr_on_plateau_is_left_to_the_user():
    model = make_model()
    opt = make_optimizer("sgd", model)
    with pytest.raises(ConfigurationError, match="ReduceLROnPlateau"):
        GradientAccumulator(opt, steps=2, scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(opt))


@pytest.mark.parametrize(
    ("make_loss", "match"),
    [
        (lambda out: out.mean() * float("nan"), r"Expected loss to be finite but got nan"),
        (lambda out: out.mean() * float("inf"), r"Expected loss to be finite but got -?inf"),
        (lambda out: out.mean(dim=0), r"Expected loss to be a scalar tensor but got one of shape \(2,\)"),
        (lambda out: out.mean().detach(), r"Expected loss to require grad"),
        (lambda out: 1.5, r"Expected loss to be a torch.Tensor but got float"),
    ],
)
def test_bad_loss_is_a_clear_error_and_accumulates_nothing(make_loss, match):
    model = make_model()
    acc = GradientAccumulator(make_optimizer("sgd", model), steps=2)
    (x, _y), (x2, _y2) = make_data([2, 2])
    acc.backward(model(x).mean())
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ConfigurationError, match=match):
        acc.backward(make_loss(model(x2)))
    assert acc.accumulated == 1
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize(
    ("num_items", "match"),
    [
        (-1, r"Expected num_items to be a non-negative number but got -1"),
        (float("nan"), r"Expected num_items to be a non-negative number but got nan"),
        (torch.tensor(-3), r"Expected num_items to be a non-negative number but got -3"),
        (torch.tensor([1, 2]), r"Expected num_items to be a number or a one-element tensor"),
        ("7", r"Expected num_items to be a number but got str"),
        (True, r"Expected num_items to be a number but got bool"),
    ],
)
def test_bad_num_items_is_a_clear_error(num_items, match):
    model = make_model()
    acc = GradientAccumulator(make_optimizer("sgd", model), steps=2)
    with pytest.raises(ConfigurationError, match=match):
        acc.backward(model(torch.ones(2, 3)).mean(), num_items=num_items)
    assert acc.accumulated == 0


def test_num_items_for_some_micro_batches_of_a_window_is_an_error():
    model = make_model()
    acc = GradientAccumulator(make_optimizer("sgd", model), steps=3)
    acc.backward(model(torch.ones(2, 3)).mean(), num_items=2)
    with pytest.raises(ConfigurationError, match="Expected num_items for every micro-batch of a window or for none"):
        acc.backward(model(torch.ones(2, 3)).mean())


# ---------------------------------------------------------------- findings and the Guard
def test_batchnorm_gives_an_info_finding_through_the_guard():
    model = make_model(batchnorm=True)
    opt = make_optimizer("sgd", model)
    with Guard(model, opt, policy="collect") as guard:
        acc = GradientAccumulator(opt, steps=4, model=model, micro_batch_size=8)
        line = _this_line() - 1
        accumulated_run(acc, model, make_data([2] * 4), weighted=False)
    [finding] = [f for f in guard.findings if f.code == "GG601"]
    assert finding.name == "accumulation-batchnorm"
    assert finding.severity == "info"
    assert finding.where == "1"  # the module's name in the Sequential
    assert finding.location.file.endswith("test_accumulate.py")
    assert finding.location.line == line
    assert "each micro-batch (8 samples)" in finding.message
    assert [f.code for f in guard.findings] == ["GG601"]
    assert acc.findings[0].count == 1  # each guard records its own copy


def test_batchnorm_finding_reaches_a_guard_attached_later_and_is_silent_without_one(recwarn):
    model = make_model(batchnorm=True)
    opt = make_optimizer("sgd", model)
    acc = GradientAccumulator(opt, steps=2, model=model)
    assert [f.code for f in acc.findings] == ["GG601"]
    with Guard(model, opt, policy="warn") as guard:
        accumulated_run(acc, model, make_data([2] * 2), weighted=False)
    assert [f.code for f in guard.findings] == ["GG601"]
    assert not recwarn.list  # info findings never warn
    with Guard(model, opt, policy="collect", select="GG1") as selective:
        accumulated_run(acc, model, make_data([2] * 2), weighted=False)
    assert selective.findings == []


@pytest.mark.parametrize("batchnorm", [False, True])
def test_no_batchnorm_finding_without_accumulation_or_batchnorm(batchnorm):
    model = make_model(batchnorm=batchnorm)
    acc = GradientAccumulator(make_optimizer("sgd", model), steps=1 if batchnorm else 4, model=model)
    assert acc.findings == []


@pytest.mark.parametrize("weighted", [False, True])
def test_correct_accumulation_is_never_reported_as_missing_zero_grad(weighted):
    model = make_model()
    opt = make_optimizer("momentum", model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    with Guard(model, opt, policy="raise") as guard:  # every detector
        acc = GradientAccumulator(opt, steps=3, model=model, scheduler=sched, max_grad_norm=1.0)
        accumulated_run(acc, model, make_data([2, 3, 1, 2, 2, 3, 1, 2]), weighted)
    assert acc.optimizer_steps == 3
    assert guard.step == 3
    assert guard.findings == []


def test_hand_written_accumulation_that_never_zeroes_is_reported():
    model = make_model()
    opt = make_optimizer("sgd", model)
    with Guard(model, opt, detectors=[MissingZeroGrad], policy="collect") as guard:
        for i, (x, y) in enumerate(make_data([2] * 6)):
            (item_losses(model, x, y).mean() / 3).backward()
            if (i + 1) % 3 == 0:
                opt.step()  # never zeroed: the second window adds to the first
                line = _this_line()
    [finding] = guard.findings
    assert finding.code == "GG101"
    assert finding.location.line == line - 1
    assert finding.where == "opt (SGD)"
    assert finding.data["parameters"] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_accumulator_under_gradguard_run_reports_nothing(write_script, run_cli, tmp_path):
    script = write_script(
        """
        import torch
        from gradguard import GradientAccumulator

        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        acc = GradientAccumulator(opt, steps=4)
        for _ in range(10):
            x = torch.randn(8, 4)
            acc.backward(torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)))
        acc.flush()
        print("steps", acc.optimizer_steps)
        """
    )
    result = run_cli("run", "--json", str(tmp_path / "out.json"), "--policy", "collect", str(script))
    assert result.returncode == 0, result.stderr
    assert "steps 3" in result.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["findings"] == []
    assert report["summary"]["steps"] == 3


def test_public_names():
    assert gradguard.GradientAccumulator is GradientAccumulator
    assert gradguard.RULES["GG601"] == "accumulation-batchnorm"
    assert "GradientAccumulator" in repr(GradientAccumulator(make_optimizer("sgd", make_model()), steps=2))


# ---------------------------------------------------------------- CUDA (skipped without a GPU)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_grad_scaler_and_device_num_items_equal_the_big_batch():
    batches = [(x.cuda(), y.cuda()) for x, y in make_data([3, 1, 4, 2, 2])]
    model, reference = make_model().cuda(), make_model().cuda()
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    acc = GradientAccumulator(make_optimizer("adamw", model), steps=2, scaler=scaler, max_grad_norm=0.05)
    for x, y in batches:
        acc.backward(item_losses(model, x, y).mean(), num_items=torch.tensor(len(x), device="cuda"))
    acc.flush()
    big_batch_run(reference, make_optimizer("adamw", reference), batches, 2, weighted=True, max_grad_norm=0.05)
    for pa, pb in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@cuda
def test_cuda_nan_loss_is_reported_without_waiting_for_the_gpu():
    model = make_model().cuda()
    acc = GradientAccumulator(make_optimizer("sgd", model), steps=2)
    x = torch.ones(2, 3, device="cuda")
    acc.backward(model(x).mean())
    acc.backward(model(x).mean() * float("nan"))  # no error yet: the GPU is not waited for
    with pytest.raises(ConfigurationError, match="optimizer step 1 had a nan or inf loss"):
        acc.flush()  # flush() waits for pending checks


def _this_line():
    import sys

    return sys._getframe(1).f_lineno


def test_gg601_has_a_rule_page():
    page = gradguard.explain("accumulation-batchnorm")
    assert page.startswith("GG601 accumulation-batchnorm: ")
    for section in ("What it reports", "Why it matters", "How to fix it", "Example"):
        assert section in page
