"""GradGuardCallback with real Trainer runs on CPU."""

from __future__ import annotations

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from gradguard.lightning import GradGuardCallback  # noqa: E402

from .helpers import line_of, tiny_trainer  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*is smaller than the logging interval:UserWarning"),
]


def _loader(n=32, batch=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=batch)


def _trainer(callbacks, **kwargs):
    return tiny_trainer(callbacks, **{"limit_train_batches": 6, "limit_val_batches": 2, **kwargs})


class Regressor(pl.LightningModule):
    def __init__(self, scheduler: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.scheduler = scheduler

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
        if not self.scheduler:
            return opt
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)]


class ManualNoZeroGrad(Regressor):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.manual_backward(loss)
        opt.step()  # <- manual step without zero_grad


class ManualCorrect(ManualNoZeroGrad):
    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        self.manual_backward(nn.functional.mse_loss(self(x), y))
        opt.step()


def test_manual_optimization_without_zero_grad_is_flagged():
    callback = GradGuardCallback(policy="collect")
    _trainer([callback]).fit(ManualNoZeroGrad(), _loader(), _loader())
    codes = [f.code for f in callback.findings]
    assert codes == ["GG101"]
    finding = callback.findings[0]
    assert finding.location.line == line_of("# <- manual step without zero_grad")
    assert finding.count == 5
    assert callback.guard is not None
    assert not callback.guard.attached  # detached in teardown


def test_manual_optimization_with_zero_grad_reports_nothing():
    callback = GradGuardCallback(policy="collect")
    _trainer([callback]).fit(ManualCorrect(), _loader(), _loader())
    assert callback.findings == []


def test_clean_run_with_accumulation_scheduler_clipping_and_validation_reports_nothing():
    callback = GradGuardCallback(policy="collect")
    trainer = _trainer(
        [callback], max_epochs=2, limit_train_batches=7, accumulate_grad_batches=4, gradient_clip_val=0.5
    )
    trainer.fit(Regressor(scheduler=True), _loader(), _loader())
    assert callback.findings == []
    assert trainer.global_step == 4  # two windows per epoch: 4 + the partial 3


def test_findings_are_logged_once_on_rank_zero(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    callback = GradGuardCallback(policy="collect")
    logger = CSVLogger(tmp_path, name="run", version=0)
    _trainer([callback], logger=logger).fit(ManualNoZeroGrad(), _loader(), _loader())
    text = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    header, *rows = text.strip().splitlines()
    assert "gradguard/findings" in header
    assert "gradguard/GG101" in header
    gg_rows = [r for r in rows if r.split(",")[header.split(",").index("gradguard/findings")]]
    assert len(gg_rows) == 2  # when found, then the totals at the end (the count grew since)
    row = dict(zip(header.split(","), gg_rows[-1].split(","), strict=True))
    assert float(row["gradguard/findings"]) == 1.0
    assert float(row["gradguard/GG101"]) == 5.0


def test_json_report_is_written(tmp_path):
    import json

    callback = GradGuardCallback(policy="collect", json_path=tmp_path / "report.json", html_path=tmp_path / "r.html")
    _trainer([callback]).fit(ManualNoZeroGrad(), _loader(), _loader())
    report = json.loads((tmp_path / "report.json").read_text())
    assert [f["code"] for f in report["findings"]] == ["GG101"]
    assert "GG101" in (tmp_path / "r.html").read_text()


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")
def test_two_instances_coexist_and_state_round_trips_through_a_checkpoint(tmp_path):
    first = GradGuardCallback(policy="collect")
    second = GradGuardCallback(policy="collect", ignore="GG1")
    assert first.state_key != second.state_key
    trainer = _trainer([first, second], enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(ManualNoZeroGrad(), _loader(), _loader())
    assert [f.code for f in first.findings] == ["GG101"]
    assert second.findings == []
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert saved[first.state_key]["step"] == 6
    assert saved[first.state_key]["findings"][0]["code"] == "GG101"

    resumed = GradGuardCallback(policy="collect")
    trainer = _trainer([resumed], max_epochs=2, default_root_dir=tmp_path)
    trainer.fit(ManualCorrect(), _loader(), _loader(), ckpt_path=ckpt)
    # the findings of the first run come back with the checkpoint; the resumed run adds none
    assert [(f.code, f.count) for f in resumed.findings] == [("GG101", 5)]
    assert resumed.guard is not None
    assert resumed.guard.step == 12


def test_an_exception_detaches_the_guard():
    class Crash(Regressor):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("crash")
            return super().training_step(batch, batch_idx)

    callback = GradGuardCallback(policy="collect")
    model = Crash()
    with pytest.raises(RuntimeError, match="crash"):
        _trainer([callback]).fit(model, _loader(), _loader())
    assert callback.guard is not None
    assert not callback.guard.attached
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


class MetricModule(Regressor):
    def __init__(self, detach: bool, reset: bool):
        super().__init__()
        from torchmetrics import CatMetric

        self.outputs = CatMetric()
        self.detach, self.reset_each_epoch = detach, reset

    def training_step(self, batch, batch_idx):
        x, y = batch
        pred = self(x)
        self.outputs.update(pred.detach() if self.detach else pred)
        return nn.functional.mse_loss(pred, y)

    def on_train_epoch_end(self):
        if self.reset_each_epoch:
            self.outputs.reset()


def test_torchmetrics_list_state_holding_graphs_is_flagged():
    callback = GradGuardCallback(policy="collect")
    _trainer([callback]).fit(MetricModule(detach=False, reset=True), _loader())
    (finding,) = [f for f in callback.findings if f.code == "GG201"]
    assert finding.where.endswith("outputs.value")
    assert "detach" in finding.hint


def test_torchmetrics_list_state_never_reset_is_flagged():
    callback = GradGuardCallback(policy="collect")
    _trainer([callback], max_epochs=3).fit(MetricModule(detach=True, reset=False), _loader())
    (finding,) = [f for f in callback.findings if f.code == "GG301"]
    assert finding.where == "outputs.value"
    assert finding.data["entries"] == 12


def test_torchmetrics_used_correctly_reports_nothing():
    callback = GradGuardCallback(policy="collect")
    _trainer([callback], max_epochs=3).fit(MetricModule(detach=True, reset=True), _loader())
    assert callback.findings == []


def test_ddp_with_two_cpu_processes_reports_on_rank_zero_only(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from .conftest import REPO

    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    script = os.path.join(REPO, "tests", "scripts", "lightning_ddp.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [[f["code"] for f in found] for found in per_rank] == [["GG101"], ["GG101"]]  # both ranks watch
    report = json.loads((tmp_path / "report.json").read_text())  # written by rank zero alone
    assert [f["code"] for f in report["findings"]] == ["GG101"]
    metrics = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().strip().splitlines()
    assert "gradguard/findings" in metrics[0]
    assert len(metrics) == 3  # rank zero's two rows: when found, then the totals at the end


# --------------------------------------------------------------------- every detector through the callback


class StepLosses(Regressor):
    def __init__(self):
        super().__init__()
        self.step_losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.step_losses.append(loss)  # <- keeps every step's graph
        return loss


def test_step_losses_kept_on_the_module_are_flagged():
    callback = GradGuardCallback(policy="collect")
    _trainer([callback], limit_train_batches=8).fit(StepLosses(), _loader(), _loader())
    (finding,) = [f for f in callback.findings if f.code == "GG201"]
    assert finding.where.endswith("step_losses")
    assert finding.location.line == line_of("# <- keeps every step's graph")
    assert {f.code for f in callback.findings} == {"GG201"}


class StepLossesOfASubmodule(pl.LightningModule):
    """``training_step`` calls ``self.net(x)``: the module's own forward never runs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.step_losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.step_losses.append(loss)  # <- a submodule's graph, every step
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_step_losses_of_a_module_that_calls_a_submodule_are_flagged():
    callback = GradGuardCallback(policy="collect")
    _trainer([callback], limit_train_batches=8).fit(StepLossesOfASubmodule(), _loader())
    (finding,) = callback.findings
    assert finding.code == "GG201"
    assert finding.where.endswith("step_losses")
    assert finding.location.line == line_of("# <- a submodule's graph, every step")
    assert finding.location.function == "training_step"


class ValidationWithGrad(Regressor):
    def __init__(self):
        super().__init__()
        self.val_outputs = []

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        with torch.enable_grad():
            self.val_outputs.append(self(x))  # <- outputs kept with their graphs


def test_validation_collecting_outputs_with_grad_is_flagged():
    callback = GradGuardCallback(policy="collect")
    trainer = _trainer([callback], inference_mode=False, limit_val_batches=6)
    trainer.validate(ValidationWithGrad(), _loader())
    (finding,) = [f for f in callback.findings if f.code == "GG201"]
    assert finding.where.endswith("val_outputs")
    assert finding.location.line == line_of("# <- outputs kept with their graphs")


class FineTune(pl.LightningModule):
    """A frozen backbone with BatchNorm and a trained head."""

    def __init__(self, backbone_eval: bool):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 1)
        self.backbone.requires_grad_(False)
        self.backbone_eval = backbone_eval

    def on_train_epoch_start(self):
        if self.backbone_eval:
            self.backbone.eval()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.head(self.backbone(x)), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.head(self.backbone(x)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.01)


def test_frozen_backbone_with_batchnorm_in_train_mode_is_flagged():
    callback = GradGuardCallback(policy="collect")
    _trainer([callback]).fit(FineTune(backbone_eval=False), _loader())
    (finding,) = callback.findings
    assert finding.code == "GG404"
    assert finding.where == "backbone.1"


def test_clean_fine_tuning_with_the_backbone_in_eval_mode_reports_nothing():
    callback = GradGuardCallback(policy="collect")
    _trainer([callback], max_epochs=2).fit(FineTune(backbone_eval=True), _loader(), _loader())
    assert callback.findings == []


def test_base_finetuning_unfreezing_at_epoch_one_reports_nothing():
    from lightning.pytorch.callbacks import BaseFinetuning

    class Unfreeze(BaseFinetuning):
        def freeze_before_training(self, pl_module):
            self.freeze(pl_module.backbone, train_bn=False)

        def finetune_function(self, pl_module, current_epoch, optimizer):
            if current_epoch == 1:
                self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, lr=1e-3)

    class Model(FineTune):
        def configure_optimizers(self):
            return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.01)

    callback = GradGuardCallback(policy="collect")
    trainer = _trainer([Unfreeze(), callback], max_epochs=3)
    trainer.fit(Model(backbone_eval=False), _loader(), _loader())
    assert len(trainer.optimizers[0].param_groups) == 2  # the backbone did join at epoch 1
    assert callback.findings == []


class BufferDataset(torch.utils.data.Dataset):
    """Built from one numpy buffer refilled for every sample: every item ends up the last one."""

    def __init__(self, n=32):
        import numpy as np

        rng = np.random.default_rng(0)
        buf = np.empty(4, dtype=np.float32)
        self.items = []
        for _ in range(n):
            buf[:] = rng.standard_normal(4)
            self.items.append(torch.from_numpy(buf))  # <- refilled buffer aliased again

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        x = self.items[i]
        return x, x.sum(0, keepdim=True)


def test_dataset_built_from_one_refilled_numpy_buffer_is_flagged():
    class Data(pl.LightningDataModule):
        def train_dataloader(self):  # called once the callback's guard is attached
            return DataLoader(BufferDataset(), batch_size=4)

    callback = GradGuardCallback(policy="collect")
    _trainer([callback]).fit(Regressor(), datamodule=Data())
    (finding,) = [f for f in callback.findings if f.code == "GG501"]
    assert finding.location.line == line_of("# <- refilled buffer aliased again")
    assert finding.where == "buf"
