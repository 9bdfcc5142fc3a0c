"""Fine-tuning with Lightning, watched by gradguard, with exact gradient accumulation.

    python examples/lightning_finetune.py            # a correct run: no findings
    python examples/lightning_finetune.py --buggy    # BatchNorm of the frozen backbone left in
                                                     # train mode (GG404) and the step losses
                                                     # kept with their graphs (GG201)

Needs the ``[lightning]`` extra. Runs on CPU in a few seconds.
"""

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradguard.lightning import AccumulationCallback, GradGuardCallback


class FineTune(pl.LightningModule):
    def __init__(self, buggy: bool) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU())  # "pretrained"
        self.head = nn.Linear(32, 4)
        self.backbone.requires_grad_(False)
        self.buggy = buggy
        self.step_losses: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def on_train_epoch_start(self) -> None:
        if not self.buggy:
            self.backbone.eval()  # Lightning calls model.train() before each epoch

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.step_losses.append(loss if self.buggy else loss.detach())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        opt = torch.optim.AdamW(self.head.parameters(), lr=1e-3)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buggy", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y = torch.randn(200, 16), torch.randint(0, 4, (200,))
    train = DataLoader(TensorDataset(x[:160], y[:160]), batch_size=8)
    val = DataLoader(TensorDataset(x[160:], y[160:]), batch_size=8)

    guard = GradGuardCallback(json_path="reports/lightning_finetune.json")
    accumulation = AccumulationCallback(lr_scaling="sqrt", base_batch_size=8, warmup_steps=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        accumulate_grad_batches=3,  # 20 batches per epoch: the last window holds 2, and counts exactly
        gradient_clip_val=1.0,
        callbacks=[guard, accumulation],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(FineTune(args.buggy), train, val)
    print(f"lr factor {accumulation.lr_factor:.3f} for an effective batch of {8 * 3}")
    print(f"{len(guard.findings)} finding(s)")
    for finding in guard.findings:
        print(f"  {finding}\n      fix: {finding.hint}")


if __name__ == "__main__":
    main()
