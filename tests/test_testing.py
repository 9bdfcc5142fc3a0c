"""gradguard.testing: a window's accumulated gradients against the full batch's, and why they differ."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradguard
from gradguard.errors import ConfigurationError
from gradguard.testing import AccumulationComparison, assert_accumulation_matches_full_batch, compare_accumulation


def make_model(*, dropout: float = 0.0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 8)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 1)]
    return nn.Sequential(*layers)


def micro_batches(sizes=(4, 4, 4, 4)):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(sum(sizes), 4, generator=gen), torch.randn(sum(sizes), 1, generator=gen)
    return list(zip(x.split(list(sizes)), y.split(list(sizes)), strict=True))


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


# ----------------------------------------------------------------------- loops, as people write them


def averaged(model, batches):
    for batch in batches:
        (mse(model, batch) / len(batches)).backward()


def summed(model, batches):
    for batch in batches:
        mse(model, batch).backward()


def divided_by(steps):
    def loop(model, batches):
        for batch in batches:
            (mse(model, batch) / steps).backward()

    return loop


def sample_weighted(model, batches):
    total = sum(len(x) for x, _ in batches)
    for batch in batches:
        (mse(model, batch) * len(batch[0]) / total).backward()


def reset_inside(model, batches):
    for batch in batches:
        model.zero_grad()
        (mse(model, batch) / len(batches)).backward()


# ----------------------------------------------------------------------- correct loops pass


def test_a_correct_loop_matches_and_leaves_the_model_as_it_was():
    model = make_model(batchnorm=True)
    mse(model, micro_batches()[0]).backward()  # gradients already there: they must come back
    grads = {name: p.grad for name, p in model.named_parameters()}
    grad_values = {name: g.clone() for name, g in grads.items()}
    state = copy.deepcopy(model.state_dict())  # parameters and BatchNorm statistics
    model[0].eval()

    def sets_train_mode(model, batches):
        model.train()
        averaged(model, batches)

    result = assert_accumulation_matches_full_batch(model, mse, micro_batches(), sets_train_mode)

    assert isinstance(result, AccumulationComparison)
    assert result.matches
    assert result.cause == ""
    assert [p.name for p in result.parameters] == [name for name, _ in model.named_parameters()]
    assert result.max_rel_diff < 1e-6
    assert result.expected_weights == (0.25, 0.25, 0.25, 0.25)
    for name, p in model.named_parameters():
        assert p.grad is grads[name]
        assert torch.equal(p.grad, grad_values[name])
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert [m.training for m in model.modules()] == [True, False, True, True, True, True]
    assert str(result).startswith("accumulated gradients match the full batch in 6 parameter(s)")


def test_dropout_draws_the_same_masks_and_the_generator_advances_as_the_loop_makes_it():
    model, batches = make_model(dropout=0.5), micro_batches()
    torch.manual_seed(123)
    assert_accumulation_matches_full_batch(model, mse, batches, averaged)
    after = torch.get_rng_state()

    torch.manual_seed(123)
    averaged(copy.deepcopy(model), batches)
    assert torch.equal(after, torch.get_rng_state())


def test_frozen_parameters_are_left_out():
    model = make_model()
    model[0].requires_grad_(False)
    result = compare_accumulation(model, mse, micro_batches(), averaged)
    assert result.matches
    assert [p.name for p in result.parameters] == ["3.weight", "3.bias"]


def test_quiet_under_an_installed_guard():
    guard = gradguard.install(policy="collect")
    try:
        assert compare_accumulation(make_model(), mse, micro_batches(), averaged).matches
        assert not compare_accumulation(make_model(), mse, micro_batches(), summed).matches
    finally:
        gradguard.uninstall()
    assert guard.findings == []


# ----------------------------------------------------------------------- the classic mistakes


def test_loss_not_divided_by_the_number_of_micro_batches():
    model = make_model()
    with pytest.raises(AssertionError) as excinfo:
        assert_accumulation_matches_full_batch(model, mse, micro_batches(), summed)
    message = str(excinfo.value)
    assert message.startswith("accumulated gradients differ from the full batch in 4 of 4 parameter(s)")
    assert (
        "likely cause: accumulated gradients are 4.00x the full batch: divide each micro-batch loss by the "
        "number of micro-batches (4)"
    ) in message
    assert "micro-batch weights: accumulated [1, 1, 1, 1], full batch [0.25, 0.25, 0.25, 0.25]" in message
    assert "  0.weight: max abs diff " in message
    assert ", max rel diff 3" in message

    result = compare_accumulation(model, mse, micro_batches(), summed)
    assert result.factor == pytest.approx(4.0)
    assert result.weights == pytest.approx((1.0, 1.0, 1.0, 1.0))
    assert [p.name for p in result.mismatched] == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert all(p.max_rel_diff == pytest.approx(3.0) for p in result.mismatched)
    assert all(p.grad is None for p in model.parameters())


def test_last_partial_window_weighted_like_a_full_one():
    last_window = micro_batches()[:2]  # steps=4, and the data ran out after 2 micro-batches
    with pytest.raises(AssertionError, match=r"accumulated gradients are 0\.50x the full batch") as excinfo:
        assert_accumulation_matches_full_batch(make_model(), mse, last_window, divided_by(4), steps=4)
    assert (
        "the last partial window (2 of 4 micro-batches) is weighted like a full one: divide each micro-batch loss "
        "by the number of micro-batches it holds (2), not by 4"
    ) in str(excinfo.value)

    assert compare_accumulation(make_model(), mse, last_window, averaged, steps=4).matches
    assert compare_accumulation(make_model(), mse, micro_batches(), divided_by(4), steps=4).matches


def token_batches():
    """Padded sequences: dicts of inputs [batch, time, 4], targets and a mask of the real tokens."""
    gen = torch.Generator().manual_seed(2)
    out = []
    for lengths in ([3, 1], [7, 6], [5, 2], [1, 1]):
        time = max(lengths)
        mask = torch.arange(time)[None, :] < torch.tensor(lengths)[:, None]
        out.append(
            {"x": torch.randn(2, time, 4, generator=gen), "y": torch.randn(2, time, 1, generator=gen), "mask": mask}
        )
    return out


def token_loss(model, batch):
    """The mean over the micro-batch's real tokens."""
    errors = (model(batch["x"]) - batch["y"]).pow(2).squeeze(-1)
    return errors[batch["mask"]].mean()


def count_tokens(batch):
    return batch["mask"].sum()


def equal_weights(model, batches):
    for batch in batches:
        (token_loss(model, batch) / len(batches)).backward()


def token_weighted(model, batches):
    total = sum(int(count_tokens(b)) for b in batches)
    for batch in batches:
        (token_loss(model, batch) * count_tokens(batch) / total).backward()


def test_equal_weights_for_unequal_token_counts():
    with pytest.raises(AssertionError) as excinfo:
        assert_accumulation_matches_full_batch(
            make_model(), token_loss, token_batches(), equal_weights, num_items=count_tokens
        )
    message = str(excinfo.value)
    assert (
        "micro-batches are weighted equally (0.25 each) though their item counts differ (4, 13, 7, 2): weigh each "
        "micro-batch's mean loss by its share of the items, n_i / Σn (Σn = 26)"
    ) in message
    assert (
        "micro-batch weights: accumulated [0.25, 0.25, 0.25, 0.25], full batch [0.154, 0.5, 0.269, 0.0769]" in message
    )

    result = assert_accumulation_matches_full_batch(
        make_model(), token_loss, token_batches(), token_weighted, num_items=[4, 13, 7, 2]
    )
    assert result.expected_weights == pytest.approx((4 / 26, 13 / 26, 7 / 26, 2 / 26))


def test_equal_weights_for_micro_batches_of_unequal_sizes():
    batches = micro_batches((4, 4, 4, 2))  # the tail of the data set
    with pytest.raises(
        AssertionError, match=r"weighted equally \(0.25 each\) though their sizes differ \(4, 4, 4, 2\)"
    ):
        assert_accumulation_matches_full_batch(make_model(), mse, batches, averaged)
    assert compare_accumulation(make_model(), mse, batches, sample_weighted).matches


def test_zero_grad_inside_the_micro_batch_loop():
    result = compare_accumulation(make_model(), mse, micro_batches(), reset_inside)
    assert not result.matches
    assert result.cause.startswith("micro-batch(es) 0, 1, 2 of 4 contribute nothing to the accumulated gradient")
    assert result.weights is not None
    assert result.weights[3] == pytest.approx(0.25)


def test_a_loop_that_leaves_no_gradient():
    def forgets_backward(model, batches):
        for batch in batches:
            mse(model, batch)

    result = compare_accumulation(make_model(), mse, micro_batches(), forgets_backward)
    assert not result.matches
    assert result.cause.startswith("accumulate left no gradient on the model")
    assert all(p.note == "accumulate left no gradient" for p in result.parameters)


def test_tolerances():
    def off_by(scale):
        def loop(model, batches):
            for batch in batches:
                (mse(model, batch) * scale / len(batches)).backward()

        return loop

    assert compare_accumulation(make_model(), mse, micro_batches(), off_by(1 + 1e-6)).matches
    strict = compare_accumulation(make_model(), mse, micro_batches(), off_by(1 + 1e-6), rtol=1e-8)
    assert not strict.matches
    assert "off by a rounding-sized amount" in strict.cause
    assert not compare_accumulation(make_model(), mse, micro_batches(), off_by(1.01)).matches
    assert compare_accumulation(make_model(), mse, micro_batches(), off_by(1.01), rtol=0.02).matches


# ----------------------------------------------------------------------- misuse


def test_a_loop_that_steps_is_an_error_and_the_parameters_are_put_back():
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def steps(model, batches):
        averaged(model, batches)
        opt.step()

    with pytest.raises(ConfigurationError, match=r"Expected accumulate to leave the parameters unchanged .* 0\.weight"):
        compare_accumulation(model, mse, micro_batches(), steps)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(p.grad is None for p in model.parameters())


def test_an_error_in_the_loop_propagates_and_the_gradients_are_put_back():
    model = make_model()
    mse(model, micro_batches()[0]).backward()
    grads = [p.grad for p in model.parameters()]

    def fails(model, batches):
        averaged(model, batches[:1])
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        compare_accumulation(model, mse, micro_batches(), fails)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "net"}, "Expected model to be a torch.nn.Module but got str"),
        ({"loss_fn": None}, "Expected loss_fn to be callable"),
        ({"accumulate": 3}, "Expected accumulate to be callable"),
        ({"micro_batches": []}, "Expected micro_batches to hold at least one micro-batch but got none"),
        ({"micro_batches": torch.ones(4, 4)}, "Expected micro_batches to be a list of micro-batches but got Tensor"),
        ({"micro_batches": ["a", "b"]}, "micro-batch 0 is a str: pass num_items"),
        ({"steps": 2}, r"Expected steps to be an integer >= len\(micro_batches\) = 4 .* but got 2"),
        ({"num_items": [1, 2]}, r"Expected num_items to hold one count per micro-batch \(4\) but got 2"),
        ({"num_items": [1, 2, -1, 3]}, "got -1 for micro-batch 2"),
        ({"num_items": [0, 0, 0, 0]}, "Expected num_items to count at least one item in all"),
        ({"rtol": -1.0}, "Expected rtol to be a non-negative finite number but got -1.0"),
        ({"loss_fn": lambda model, batch: model(batch[0])}, r"scalar tensor but got a tensor of shape \(4, 1\)"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = {"model": make_model(), "loss_fn": mse, "micro_batches": micro_batches(), "accumulate": averaged}
    args.update(kwargs)
    with pytest.raises(ConfigurationError, match=match):
        compare_accumulation(**args)
