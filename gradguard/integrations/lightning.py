"""Lightning adapter: ``GradGuardCallback`` maps a ``Trainer``'s events onto a :class:`Guard`.

The detectors run unchanged: the callback attaches a guard to the ``LightningModule`` in
``setup``, hands it the ``Trainer``'s optimizers once they exist, and detaches in
``teardown`` and ``on_exception``. Optimizer steps are seen through PyTorch's own
optimizer hooks, so manual optimization is watched like automatic optimization.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from gradguard.events import EpochEnd, EpochStart
from gradguard.findings import Finding
from gradguard.guard import DetectorSpec, Guard
from gradguard.policy import Policy

__all__ = ["GradGuardCallback"]


class GradGuardCallback(Callback):
    """Watch a Lightning ``Trainer`` run with gradguard's detectors.

    Args:
        detectors: codes, names, classes or instances; all registered detectors by default.
        policy: ``"warn"`` (default), ``"raise"`` or ``"collect"``.
        select: code prefixes or rule names to keep.
        ignore: code prefixes or rule names to drop.
        json_path: where to write the JSON report when a run ends (rank zero only).
        html_path: where to write the HTML report when a run ends (rank zero only).
        log: send finding counts (and text, where the logger takes text) to the
            ``Trainer``'s loggers once per run, on rank zero.

    After ``fit``, :attr:`findings` holds the findings, as :class:`gradguard.Finding`. The
    callback tells the detectors where epochs start and end (``EpochStart``/``EpochEnd``
    events, for training and validation), which is how ``GG301`` sees a torchmetrics
    metric whose list state is never reset between epochs; ``GG201`` sees a metric whose
    list state holds autograd graphs through the module's attributes.

    Example:
        >>> from gradguard.lightning import GradGuardCallback
        >>> callback = GradGuardCallback(policy="collect", ignore=["GG3"])
        >>> callback.findings
        []
    """

    def __init__(
        self,
        *,
        detectors: Sequence[DetectorSpec] | None = None,
        policy: str = "warn",
        select: Iterable[str] | str | None = None,
        ignore: Iterable[str] | str | None = None,
        json_path: str | os.PathLike[str] | None = None,
        html_path: str | os.PathLike[str] | None = None,
        log: bool = True,
    ) -> None:
        super().__init__()
        select = (select,) if isinstance(select, str) else tuple(select or ())
        ignore = (ignore,) if isinstance(ignore, str) else tuple(ignore or ())
        self._policy = Policy(policy, select=select, ignore=ignore)  # fails early on bad options
        self._policy_name = policy
        self._detectors = detectors
        self._json_path = os.fspath(json_path) if json_path is not None else None
        self._html_path = os.fspath(html_path) if html_path is not None else None
        self._log = log
        self.guard: Guard | None = None
        self._done: list[Finding] = []
        self._pending_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ public
    @property
    def findings(self) -> list[Finding]:
        """Every finding of the runs so far (all stages), merged by code and place."""
        merged: dict[Any, Finding] = {}
        for f in [*self._done, *(self.guard.findings if self.guard is not None else [])]:
            known = merged.get(f.key)
            merged[f.key] = f if known is None else dataclasses.replace(known, count=known.count + f.count)
        return list(merged.values())

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            policy=self._policy_name, select=self._policy.select, ignore=self._policy.ignore
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON report of the current or last run."""
        if self.guard is None:
            raise RuntimeError("GradGuardCallback has not run yet")
        return self.guard.to_dict()

    def write_html(self, path: str | os.PathLike[str]) -> None:
        """Write the report of the current or last run as one self-contained HTML page."""
        if self.guard is None:
            raise RuntimeError("GradGuardCallback has not run yet")
        self.guard.write_html(path)

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.guard is not None and self.guard.attached:
            return
        if self.guard is not None:
            self._done = self.findings
        self.guard = Guard(
            pl_module,
            detectors=self._detectors,
            policy=self._policy_name,
            select=self._policy.select,
            ignore=self._policy.ignore,
        )
        if self._pending_state is not None:
            self.guard.load_state_dict(self._pending_state)
            self._pending_state = None
        self.guard.attach()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._add_optimizers(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._add_optimizers(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish(EpochStart("train", trainer.current_epoch))

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish(EpochEnd("train", trainer.current_epoch))

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish(EpochStart("validate", trainer.current_epoch))

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._publish(EpochEnd("validate", trainer.current_epoch))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._finish(trainer)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish(trainer, raising=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.guard is not None:
            return self.guard.state_dict()
        return copy.deepcopy(self._pending_state) if self._pending_state is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.guard is not None and self.guard.attached:
            self.guard.load_state_dict(state_dict)
        else:
            self._pending_state = copy.deepcopy(state_dict)

    # ------------------------------------------------------------------ internals
    def _add_optimizers(self, trainer: pl.Trainer) -> None:
        if self.guard is None or not self.guard.attached:
            return
        for opt in trainer.optimizers:
            self.guard.add_optimizer(opt)

    def _finish(self, trainer: pl.Trainer, raising: bool = False) -> None:
        guard = self.guard
        if guard is None or not guard.attached:
            return
        guard.detach(_raising=not raising)
        if trainer.is_global_zero:
            if self._json_path is not None:
                guard.write_json(self._json_path)
            if self._html_path is not None:
                guard.write_html(self._html_path)
            if self._log:
                _log_findings(trainer, guard.findings)

    def _publish(self, event: EpochStart | EpochEnd) -> None:
        if self.guard is not None and self.guard.attached:
            self.guard.publish(event)


def _log_findings(trainer: pl.Trainer, findings: list[Finding]) -> None:
    if not trainer.loggers:
        return
    metrics: dict[str, float] = {"gradguard/findings": float(len(findings))}
    for f in findings:
        metrics[f"gradguard/{f.code}"] = metrics.get(f"gradguard/{f.code}", 0.0) + f.count
        rate = f.data.get("rate_mib_per_step")
        if f.code == "GG301" and isinstance(rate, (int, float)):
            metrics["gradguard/memory_growth_mib_per_step"] = float(rate)
    text = "\n".join(str(f) for f in findings) or "no findings"
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        log_text = getattr(logger, "log_text", None)
        experiment = getattr(logger, "experiment", None) if type(logger).__name__ == "TensorBoardLogger" else None
        if callable(log_text):
            log_text(key="gradguard/findings", columns=["finding"], data=[[str(f)] for f in findings])
        elif experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text("gradguard/findings", text, global_step=trainer.global_step)
        logger.save()
