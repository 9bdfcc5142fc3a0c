"""Correct fine-tuning loops: no frozen-layer finding (GG401-GG405) with every detector on."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

import gradguard


def make_model():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))
    return nn.Sequential(OrderedDict(backbone=backbone, head=nn.Linear(8, 2)))


DATA = (torch.randn(8, 4), torch.randint(0, 2, (8,)))


def fine_tune(model, opt, steps=25, set_to_none=True):
    x, y = DATA
    for _ in range(steps):
        model.train()
        model.backbone.eval()
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_frozen_backbone_in_eval_mode_with_an_optimizer_over_the_head():
    model = make_model()
    model.backbone.requires_grad_(False)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        fine_tune(model, opt)
    assert guard.findings == []


@pytest.mark.parametrize("make_opt", [torch.optim.SGD, torch.optim.AdamW])
def test_optimizer_over_all_parameters_skips_the_frozen_ones(make_opt):
    # frozen before any backward: their .grad stays None, even with set_to_none=False
    model = make_model()
    for p in model.backbone.parameters():
        p.requires_grad = False
    opt = make_opt(model.parameters(), lr=0.01, weight_decay=1e-2)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    with gradguard.Guard(model, opt, policy="collect") as guard:
        fine_tune(model, opt, set_to_none=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.backbone.parameters(), strict=True))
    assert guard.findings == []


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # lightning 2.6 on a newer torch
@pytest.mark.filterwarnings("ignore:.*does not have many workers.*")
def test_lightning_base_finetuning_unfreezing_schedule():
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import BaseFinetuning

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.backbone(x))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1, momentum=0.9)

        def train_dataloader(self):
            ds = torch.utils.data.TensorDataset(torch.randn(96, 4), torch.randint(0, 2, (96,)))
            return torch.utils.data.DataLoader(ds, batch_size=8)

    class Unfreeze(BaseFinetuning):
        def freeze_before_training(self, pl_module):
            self.freeze(pl_module.backbone, train_bn=False)  # BatchNorm frozen too, in train mode

        def finetune_function(self, pl_module, current_epoch, optimizer):
            if current_epoch == 1:
                self.unfreeze_and_add_param_group(pl_module.backbone, optimizer)

    class Watch(pl.Callback):
        guard = None

        def on_train_start(self, trainer, pl_module):
            self.guard = gradguard.Guard(pl_module, trainer.optimizers, policy="collect").attach()

        def on_train_end(self, trainer, pl_module):
            self.guard.detach()

    watch = Watch()
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=12,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[Unfreeze(), watch],
    )
    module = Module()
    trainer.fit(module)
    assert watch.guard.step == 24
    assert all(p.requires_grad for p in module.parameters())  # the schedule did unfreeze
    assert len(trainer.optimizers[0].param_groups) == 2
    assert watch.guard.findings == []


def test_lazy_modules_under_install_yield_nothing():
    # the parameters are uninitialised when the model becomes known (its first forward)
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(8), nn.LazyBatchNorm1d(), nn.ReLU(), nn.Linear(8, 2))
    x, y = DATA
    guard = gradguard.install(policy="collect", select="GG4")
    try:
        model(x)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(25):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    finally:
        gradguard.uninstall()
    assert guard.findings == []
    summary = guard.to_dict()["detectors"]["GG405"]["parameters"]["Sequential"]
    assert summary["3"]["trainable"] == 18
    assert summary["0"]["trainable_tensors"] == 2
