"""AccumulationCallback: Lightning's accumulation made exact, item-weighted, with LR scaling."""

from __future__ import annotations

import copy

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from gradguard import ConfigurationError  # noqa: E402
from gradguard.lightning import AccumulationCallback, GradGuardCallback  # noqa: E402

from .helpers import tiny_trainer  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
]

RTOL = 1e-6


def _optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    if kind == "momentum":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=0.01)


class Masked(pl.LightningModule):
    """Token regression: the loss is the mean over the valid tokens of the micro-batch."""

    def __init__(self, kind="sgd", scheduler=False):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 1)
        self.kind, self.scheduler = kind, scheduler

    def training_step(self, batch, batch_idx):
        x, y, mask = batch
        return _masked_loss(self.net, x, y, mask)

    def configure_optimizers(self):
        opt = _optimizer(self.kind, self.parameters())
        if not self.scheduler:
            return opt
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]


def _masked_loss(net, x, y, mask):
    err = (net(x).squeeze(-1) - y) ** 2
    return (err * mask).sum() / mask.sum()


def _data(n=10, seq=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, seq, 3, generator=gen)
    y = torch.randn(n, seq, generator=gen)
    lengths = torch.randint(1, seq + 1, (n,), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).float()
    return x, y, mask


def _reference(kind, data, windows, weighted):
    """One plain optimizer step per window, on the window's concatenated samples."""
    model = Masked(kind)
    opt = _optimizer(kind, model.parameters())
    x, y, mask = data
    for lo, hi in windows:
        opt.zero_grad()
        if weighted:
            loss = _masked_loss(model.net, x[lo:hi], y[lo:hi], mask[lo:hi])
        else:  # every micro-batch (of 2 samples) weighs the same
            parts = [_masked_loss(model.net, x[i : i + 2], y[i : i + 2], mask[i : i + 2]) for i in range(lo, hi, 2)]
            loss = torch.stack(parts).mean()
        loss.backward()
        opt.step()
    return model.net.state_dict()


def _fit(kind, data, callbacks, k=4, batch=2, **kwargs):
    model = Masked(kind)
    loader = DataLoader(TensorDataset(*data), batch_size=batch, shuffle=False)
    trainer = tiny_trainer(callbacks, accumulate_grad_batches=k, **kwargs)
    trainer.fit(model, loader)
    return model, trainer


def _assert_params_equal(actual, expected):
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adamw"])
def test_partial_last_window_matches_the_big_batch(kind):
    data = _data(n=10)
    windows = [(0, 8), (8, 10)]  # 4 micro-batches of 2, then a partial window of 1
    expected = _reference(kind, data, windows, weighted=False)
    model, trainer = _fit(kind, data, [AccumulationCallback()])
    assert trainer.global_step == 2
    _assert_params_equal(model.net.state_dict(), expected)

    plain, _ = _fit(kind, data, [])  # Lightning alone weighs the partial window 1/4
    with pytest.raises(AssertionError):
        _assert_params_equal(plain.net.state_dict(), expected)


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adamw"])
def test_count_items_gives_the_item_weighted_mean(kind):
    data = _data(n=10)
    windows = [(0, 8), (8, 10)]
    expected = _reference(kind, data, windows, weighted=True)
    callback = AccumulationCallback(count_items=lambda batch: batch[2].sum())
    model, _ = _fit(kind, data, [callback])
    _assert_params_equal(model.net.state_dict(), expected)
    callback = AccumulationCallback(count_items=lambda batch: int(batch[2].sum()))
    model, _ = _fit(kind, data, [callback])
    _assert_params_equal(model.net.state_dict(), expected)


def test_exact_with_gradient_clipping_applied_to_the_normalised_gradient():
    data = _data(n=10)
    model, _ = _fit("sgd", data, [AccumulationCallback()], gradient_clip_val=1e-3)
    reference = Masked("sgd")
    opt = _optimizer("sgd", reference.parameters())
    x, y, mask = data
    for lo, hi in [(0, 8), (8, 10)]:
        opt.zero_grad()
        parts = [_masked_loss(reference.net, x[i : i + 2], y[i : i + 2], mask[i : i + 2]) for i in range(lo, hi, 2)]
        torch.stack(parts).mean().backward()
        nn.utils.clip_grad_norm_(reference.parameters(), 1e-3)
        opt.step()
    _assert_params_equal(model.net.state_dict(), reference.net.state_dict())


def test_linear_lr_scaling_scales_groups_and_schedulers_once(tmp_path):
    data = _data(n=16)
    callback = AccumulationCallback(lr_scaling="linear", base_batch_size=2)
    model = Masked("sgd", scheduler=True)
    loader = DataLoader(TensorDataset(*data), batch_size=2)
    trainer = tiny_trainer([callback], accumulate_grad_batches=4, default_root_dir=tmp_path)
    trainer.fit(model, loader)
    assert callback.lr_factor == 4.0  # 2 x 4 x 1 against 2
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [pytest.approx(0.4)]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.4 * 0.5)  # StepLR after one epoch
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = AccumulationCallback(lr_scaling="linear", base_batch_size=2)
    trainer = tiny_trainer([resumed], accumulate_grad_batches=4, max_epochs=2, default_root_dir=tmp_path)
    trainer.fit(Masked("sgd", scheduler=True), loader, ckpt_path=ckpt)
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == [pytest.approx(0.4)]  # not 1.6


def test_sqrt_rule_and_warmup_over_optimizer_steps():
    data = _data(n=24)
    seen = []
    callback = AccumulationCallback(lr_scaling="sqrt", base_batch_size=2, warmup_steps=2)

    class Recorder(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    _, trainer = _fit("sgd", data, [callback, Recorder()])
    assert callback.lr_factor == pytest.approx(2.0)  # sqrt(2 x 4 / 2)
    assert seen == [pytest.approx(0.2)] * 12  # the ramp never leaks past the optimizer step
    assert trainer.global_step == 3


def test_warmup_ramps_the_rate_the_optimizer_steps_with():
    data = _data(n=24)
    callback = AccumulationCallback(lr_scaling="linear", base_batch_size=2, warmup_steps=2)
    rates = []

    class Spy(pl.Callback):  # runs after the AccumulationCallback, right before the update
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            rates.append(optimizer.param_groups[0]["lr"])

    _fit("sgd", data, [callback, Spy()])
    # factor 4: start at the unscaled 0.1, ramp to 0.4 over 2 optimizer steps
    assert rates == [pytest.approx(0.1), pytest.approx(0.25), pytest.approx(0.4)]


def test_with_gradguard_the_exact_run_reports_nothing():
    data = _data(n=10)
    guard = GradGuardCallback(policy="collect")
    _fit("momentum", data, [AccumulationCallback(count_items=lambda b: b[2].sum()), guard], max_epochs=2)
    assert guard.findings == []


def test_manual_optimization_is_refused():
    class Manual(Masked):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(ConfigurationError, match="automatic optimization"):
        tiny_trainer([AccumulationCallback()]).fit(Manual(), DataLoader(TensorDataset(*_data()), batch_size=2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr_scaling": "cubic", "base_batch_size": 8}, "lr_scaling"),
        ({"lr_scaling": "linear"}, "base_batch_size"),
        ({"warmup_steps": 10}, "lr_scaling"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"count_items": 3}, "count_items"),
        ({"lr_scaling": "linear", "base_batch_size": 0}, "base_batch_size"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        AccumulationCallback(**kwargs)


def test_negative_item_count_is_refused():
    with pytest.raises(ConfigurationError, match="count_items"):
        _fit("sgd", _data(), [AccumulationCallback(count_items=lambda b: -1)])


def test_state_round_trips():
    callback = AccumulationCallback(lr_scaling="linear", base_batch_size=2)
    callback.optimizer_steps, callback.lr_factor = 7, 4.0
    state = copy.deepcopy(callback.state_dict())
    other = AccumulationCallback(lr_scaling="linear", base_batch_size=2)
    other.load_state_dict(state)
    assert (other.optimizer_steps, other.lr_factor) == (7, 4.0)
    assert state == callback.state_dict()
