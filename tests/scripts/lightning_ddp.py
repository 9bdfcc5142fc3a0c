"""A manual-optimization bug under ``strategy="ddp"`` with 2 CPU processes (run by test_lightning)."""

import json
import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradguard.lightning import GradGuardCallback


class ManualNoZeroGrad(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        self.manual_backward(nn.functional.mse_loss(self.net(x), y))
        opt.step()  # no zero_grad

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main(out: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)
    callback = GradGuardCallback(policy="collect", json_path=os.path.join(out, "report.json"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        callbacks=[callback],
        max_epochs=1,
        limit_train_batches=5,
        logger=CSVLogger(out, name="run", version=0),
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(ManualNoZeroGrad(), loader)
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as fh:
        json.dump([f.to_dict() for f in callback.findings], fh)


if __name__ == "__main__":
    main(sys.argv[1])
