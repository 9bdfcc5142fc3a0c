"""GradGuardCallback's findings in the Trainer's loggers as they are found, and its warnings."""

from __future__ import annotations

import csv
import gc
import sys
import warnings
import weakref

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, TQDMProgressBar  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, Logger  # noqa: E402
from lightning.pytorch.loggers.logger import rank_zero_experiment  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from gradguard.detector import Detector, on  # noqa: E402
from gradguard.errors import FindingWarning  # noqa: E402
from gradguard.events import Close, EpochEnd  # noqa: E402
from gradguard.lightning import GradGuardCallback  # noqa: E402

from .helpers import line_of, same_file, tiny_trainer  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*is smaller than the logging interval:UserWarning"),
]


def _loader():
    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _trainer(callbacks, **kwargs):
    return tiny_trainer(callbacks, **{"limit_train_batches": 6, **kwargs})


class NoZeroGrad(pl.LightningModule):
    """GG101 from the second step on: manual optimization that never clears the gradients."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.manual_backward(nn.functional.mse_loss(self.net(x), y))
        self.optimizers().step()  # <- no zero_grad

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Clean(NoZeroGrad):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = True

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)


class Recorder(Logger):
    """A logger that keeps what it receives; ``experiment`` counts its reads and creates nothing."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[dict[str, float], int | None]] = []
        self.saves = 0
        self.experiment_reads = 0

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    @property
    def experiment(self):
        self.experiment_reads += 1
        return object()

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((dict(metrics), step))

    def save(self):
        self.saves += 1

    def gradguard_rows(self):
        return [(row, step) for row, step in self.rows if "gradguard/findings" in row]


class Writer:
    """An experiment like TensorBoard's ``SummaryWriter``: scalars and text."""

    def __init__(self):
        self.texts: list[tuple[str, str, int]] = []

    def add_scalar(self, tag, value, step):
        pass

    def add_text(self, tag, text, global_step=None):
        self.texts.append((tag, text, global_step))


class WriterLogger(Recorder):
    """A logger of any class whose experiment, created when first read, takes text."""

    def __init__(self):
        super().__init__()
        self._experiment = None

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._experiment = Writer()
        return self._experiment


class TableLogger(Recorder):
    """A logger with W&B's ``log_text(key, columns, data, dataframe, step)``."""

    def __init__(self):
        super().__init__()
        self.tables = []

    def log_text(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables.append((key, columns, data, step))


class OtherTextLogger(Recorder):
    """A ``log_text`` of another shape, which gradguard does not call."""

    def log_text(self, text):
        raise AssertionError("called with the wrong arguments")


class BrokenLogger(Recorder):
    def log_metrics(self, metrics, step=None):
        if "gradguard/findings" in metrics:
            super().log_metrics(metrics, step)
            raise OSError("disk full")


def _csv_rows(path):
    with open(path, newline="") as fh:
        return [row for row in csv.DictReader(fh) if row.get("gradguard/findings")]


# --------------------------------------------------------------------------- loggers


def test_a_csv_logger_holds_the_row_while_training_runs(tmp_path):
    logger = CSVLogger(tmp_path, name="run", version=0)
    path = tmp_path / "run" / "version_0" / "metrics.csv"
    seen_during_training = []

    class ReadTheFile(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 4:
                seen_during_training.extend(_csv_rows(path))

    callback = GradGuardCallback(policy="collect")
    _trainer([callback, ReadTheFile()], logger=logger).fit(NoZeroGrad(), _loader())
    (row,) = seen_during_training  # written and saved when found, long before the run ends
    assert float(row["gradguard/findings"]) == 1.0
    assert float(row["gradguard/warnings"]) == 1.0
    assert float(row["gradguard/errors"]) == 0.0
    assert float(row["gradguard/GG101"]) == 1.0
    assert int(row["step"]) == 1  # found in the second step, before its update
    # the end of the run adds the totals once more, as they grew: the last row is the summary
    rows = _csv_rows(path)
    assert len(rows) == 2
    assert float(rows[-1]["gradguard/findings"]) == 1.0
    assert float(rows[-1]["gradguard/GG101"]) == 5.0
    assert int(rows[-1]["step"]) == 6


def test_a_clean_run_logs_one_row_of_zeros_at_the_end():
    logger = Recorder()
    _trainer([GradGuardCallback(policy="collect")], logger=logger).fit(Clean(), _loader())
    assert logger.gradguard_rows() == [
        ({"gradguard/findings": 0.0, "gradguard/warnings": 0.0, "gradguard/errors": 0.0}, 6)
    ]
    assert logger.saves >= 1


class EpochAndCloseFinder(Detector):
    """GG301-shaped findings made outside any training step: at an epoch's end and at close."""

    code = "GG301"
    name = "memory-growth"
    consumes = (EpochEnd, Close)

    @on(EpochEnd)
    def _epoch_end(self, event):
        if event.stage != "train":
            return None
        return [self.finding("grew between epochs", where="epoch", data={"rate_mib_per_step": 2.5})]

    @on(Close)
    def _close(self, event):
        return [self.finding("grew until the end", where="close")]


def test_findings_made_between_epochs_and_at_teardown_are_logged_at_the_trainers_step():
    logger = Recorder()
    callback = GradGuardCallback(policy="collect", detectors=[EpochAndCloseFinder])
    _trainer([callback], logger=logger, limit_train_batches=3).fit(Clean(), _loader())
    rows = logger.gradguard_rows()
    assert [step for _, step in rows] == [3, 3]
    assert [row["gradguard/findings"] for row, _ in rows] == [1.0, 2.0]
    assert rows[0][0]["gradguard/memory_growth_mib_per_step"] == 2.5
    assert rows[1][0]["gradguard/GG301"] == 2.0  # no third row at the end: the totals did not change


def test_an_experiment_with_add_text_gets_the_findings_whatever_the_logger_class():
    logger = WriterLogger()
    _trainer([GradGuardCallback(policy="collect")], logger=logger).fit(NoZeroGrad(), _loader())
    texts = logger.experiment.texts
    assert [(tag, step) for tag, _, step in texts] == [("gradguard/findings", 1), ("gradguard/findings", 6)]
    assert "GG101 missing-zero-grad" in texts[0][1]
    assert f":{line_of('# <- no zero_grad')}:" in texts[0][1]
    assert "seen 5 times" in texts[1][1]
    assert len(logger.gradguard_rows()) == 2


def test_a_log_text_of_w_and_bs_shape_gets_a_table_and_another_shape_is_left_alone():
    table, other = TableLogger(), OtherTextLogger()
    callback = GradGuardCallback(policy="collect")
    _trainer([callback], logger=[table, other]).fit(NoZeroGrad(), _loader())
    key, columns, data, step = table.tables[0]
    assert (key, columns, step) == ("gradguard/findings", ["finding"], 1)
    assert len(data) == 1
    assert "GG101" in data[0][0]
    assert len(other.gradguard_rows()) == 2  # its metrics still arrive
    assert [f.code for f in callback.findings] == ["GG101"]  # no GG000: its log_text was never called


def test_a_logger_without_text_gets_metrics_only_and_its_experiment_is_not_read():
    logger = Recorder()
    reads_at_start = []

    class CountReads(Callback):
        def on_train_start(self, trainer, pl_module):
            reads_at_start.append(logger.experiment_reads)  # Lightning reads it in setup, before the run

    _trainer([GradGuardCallback(policy="collect"), CountReads()], logger=logger).fit(NoZeroGrad(), _loader())
    assert len(logger.gradguard_rows()) == 2
    assert logger.experiment_reads == reads_at_start[0]


def test_a_logger_that_raises_does_not_break_training_and_is_reported_once():
    broken, healthy = BrokenLogger(), Recorder()
    callback = GradGuardCallback(policy="collect")
    trainer = _trainer([callback], logger=[broken, healthy])
    trainer.fit(NoZeroGrad(), _loader())
    assert trainer.global_step == 6
    assert len(broken.gradguard_rows()) == 1  # tried once, skipped for the rest of the run
    gg000 = [f for f in callback.findings if f.code == "GG000"]
    assert len(gg000) == 1
    assert gg000[0].where == "logging to BrokenLogger"
    assert "OSError: disk full" in gg000[0].message
    assert healthy.gradguard_rows()[-1][0]["gradguard/GG000"] == 1.0


def test_log_false_sends_nothing():
    logger = Recorder()
    _trainer([GradGuardCallback(policy="collect", log=False)], logger=logger).fit(NoZeroGrad(), _loader())
    assert logger.gradguard_rows() == []


def test_the_callback_holds_neither_its_finding_callback_nor_the_trainer_after_the_run():
    callback = GradGuardCallback(policy="collect")
    model = NoZeroGrad()
    trainer = _trainer([callback], logger=Recorder())
    trainer.fit(model, _loader())
    assert callback.guard is not None
    assert callback.guard.finding_callbacks == []
    ref = weakref.ref(trainer)
    del trainer, model
    gc.collect()
    assert ref() is None
    assert [f.code for f in callback.findings] == ["GG101"]


# --------------------------------------------------------------------------- warnings


class FakeRanks(pl.Trainer):
    """A single-process Trainer that says it is one of two processes."""

    def __init__(self, rank, **kwargs):
        self._fake_rank = rank
        super().__init__(**kwargs)

    @property
    def world_size(self):
        return 2

    @property
    def global_rank(self):
        return self._fake_rank

    @property
    def is_global_zero(self):
        return self._fake_rank == 0


def _fake_rank_trainer(rank, callbacks, logger):
    return FakeRanks(
        rank,
        callbacks=callbacks,
        logger=logger,
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=4,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )


@pytest.mark.parametrize("rank", [0, 1])
def test_under_several_processes_only_rank_zero_warns_and_logs(rank):
    callback = GradGuardCallback()  # the warn policy
    logger = Recorder()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _fake_rank_trainer(rank, [callback], logger).fit(NoZeroGrad(), _loader())
    warned = [w for w in seen if issubclass(w.category, FindingWarning)]
    assert [f.code for f in callback.findings] == ["GG101"]  # every rank collects
    if rank == 0:
        assert [w.message.finding.code for w in warned] == ["GG101"]
        assert len(logger.gradguard_rows()) == 2
    else:
        assert warned == []
        assert logger.gradguard_rows() == []


@pytest.fixture
def bar_prints(monkeypatch):
    """What ``TQDMProgressBar.print`` is called with (it still prints)."""
    calls = []
    original = TQDMProgressBar.print

    def spy(self, *args, **kwargs):
        calls.append((args, kwargs))
        original(self, *args, **kwargs)

    monkeypatch.setattr(TQDMProgressBar, "print", spy)
    return calls


@pytest.fixture
def stderr_display():
    """Python's own display of warnings, as outside pytest's capture; yields what it would print."""
    shown = []
    with warnings.catch_warnings():
        # pytest records warnings (catch_warnings(record=True)); a display that is no list's append
        # stands for Python's printing on stderr
        warnings._showwarnmsg_impl = lambda msg: shown.append(msg)  # type: ignore[attr-defined]
        yield shown


def _fit_with_bar(callback):
    _trainer([callback], enable_progress_bar=True).fit(NoZeroGrad(), _loader())


def test_a_warning_prints_through_the_progress_bar(bar_prints, stderr_display):
    warnings.simplefilter("always", FindingWarning)
    callback = GradGuardCallback()
    _fit_with_bar(callback)
    texts = [(args, kwargs) for args, kwargs in bar_prints if "GG101" in str(args)]
    assert len(texts) == 1
    (text,), kwargs = texts[0]
    filename, lineno, rest = text.split(":", 2)  # formatted by warnings.formatwarning
    assert same_file(filename, __file__)
    assert int(lineno) == line_of("# <- no zero_grad")
    assert "GG101 missing-zero-grad" in rest
    assert kwargs == {"file": sys.stderr}
    assert stderr_display == []  # printed once, through the bar


def test_an_ignored_warning_reaches_neither_the_bar_nor_stderr(bar_prints, stderr_display):
    warnings.filterwarnings("ignore", message="GG101", category=FindingWarning)
    callback = GradGuardCallback()
    _fit_with_bar(callback)
    assert [f.code for f in callback.findings] == ["GG101"]
    assert bar_prints == []
    assert stderr_display == []


def test_a_recorded_warning_stays_with_the_recorder_when_a_bar_draws(bar_prints):
    with pytest.warns(FindingWarning, match="GG101"):
        _fit_with_bar(GradGuardCallback())
    assert bar_prints == []


def test_a_warning_with_no_bar_drawing_is_shown_as_usual(bar_prints, stderr_display):
    warnings.simplefilter("always", FindingWarning)
    _trainer([GradGuardCallback()], enable_progress_bar=False).fit(NoZeroGrad(), _loader())
    assert bar_prints == []
    shown = [str(m.message) for m in stderr_display if m.category is FindingWarning]
    assert len(shown) == 1
    assert shown[0].startswith("GG101 missing-zero-grad")


def test_a_warning_after_the_bar_closed_is_shown_as_usual(bar_prints, stderr_display):
    warnings.simplefilter("always", FindingWarning)
    callback = GradGuardCallback(detectors=[EpochAndCloseFinder])
    _trainer([callback], enable_progress_bar=True, limit_train_batches=2).fit(Clean(), _loader())
    through_bar = [args[0] for args, _ in bar_prints if "GG301" in str(args)]
    shown = [str(m.message) for m in stderr_display if m.category is FindingWarning]
    assert len(through_bar) == 1  # at the epoch's end, while the bar draws
    assert "grew between epochs" in through_bar[0]
    assert len(shown) == 1  # at teardown: the bar is closed, and its print would drop the text
    assert "grew until the end" in shown[0]
