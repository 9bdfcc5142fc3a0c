"""Lightning adapter: ``GradGuardCallback`` maps a ``Trainer``'s events onto a :class:`Guard`.

The detectors run unchanged: the callback attaches a guard to the ``LightningModule`` in
``setup``, hands it the ``Trainer``'s optimizers once they exist, and detaches in
``teardown`` and ``on_exception``. Optimizer steps are seen through PyTorch's own
optimizer hooks, so manual optimization is watched like automatic optimization. The
findings reach the ``Trainer``'s loggers as they are found, and warnings print through its
progress bar (``lightning_logging.py``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ProgressBar
from typing_extensions import override

from gradguard.events import EpochEnd, EpochStart
from gradguard.findings import Finding
from gradguard.guard import DetectorSpec, Guard
from gradguard.integrations.lightning_logging import BarPolicy, FindingsLog
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
        log: send the findings to the ``Trainer``'s loggers as they are found, from global
            rank zero: each new or revised finding logs one row of metrics at
            ``trainer.global_step`` (``gradguard/findings``, ``gradguard/warnings`` and
            ``gradguard/errors``: distinct findings; ``gradguard/<CODE>``: times seen;
            ``gradguard/memory_growth_mib_per_step``: ``GG301``'s rate), then
            ``logger.save()``, so that a killed run keeps it. A row holds the totals of the
            callback's runs so far, never increments: the last row is the summary, and rows
            are not to be summed. When a run ends, the totals are logged once more only if
            they changed since the last row (a finding seen again); a run with no findings
            logs one row of zeros. Loggers that take text get the list of findings too: a
            ``log_text(key, columns, data)`` method (W&B's; a table, one finding a row), or
            an experiment with ``add_text`` (TensorBoard's ``SummaryWriter``). A logger that
            raises is reported once as ``GG000`` and skipped for the rest of the run.

    Under the ``warn`` policy in a run of several processes, only global rank zero warns; the
    other ranks collect their findings silently. While a progress bar draws, a warning that
    Python would print on stderr prints through the bar's ``print`` instead, on its own line
    above the bar: it is still a :class:`~gradguard.errors.FindingWarning`, and ``warnings``
    filters (``ignore``, ``error``, ``once``) apply as usual. A warning that a
    ``catch_warnings(record=True)`` records, or that a replaced ``warnings.showwarning``
    shows, is left to them.

    After ``fit``, :attr:`findings` holds the findings, as :class:`gradguard.Finding`, and the
    callback holds neither the ``Trainer`` nor the module (it drops the module's ``log`` and
    ``log_dict``, which Lightning gives every callback at each run). The callback tells the
    detectors where epochs start and end (``EpochStart``/``EpochEnd`` events, for training
    and validation), which is how ``GG301`` sees a torchmetrics metric whose list state is
    never reset between epochs; ``GG201`` sees a metric whose list state holds autograd
    graphs through the module's attributes.

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
        self._sink = FindingsLog()
        self._trainer: weakref.ref[pl.Trainer] | None = None  # the run in progress
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
        quiet = self._policy_name == "warn" and trainer.world_size > 1 and not trainer.is_global_zero
        policy = "collect" if quiet else self._policy_name  # one warning per finding across ranks
        # the policy's warnings print through the trainer's progress bar while it draws
        bar_policy = BarPolicy(policy, self._policy.select, self._policy.ignore, self._bar)
        guard = self.guard = Guard(pl_module, detectors=self._detectors, policy=bar_policy)
        self._trainer = weakref.ref(trainer)
        if self._log and trainer.is_global_zero and trainer.loggers:
            self._sink.start()
            guard.finding_callbacks.append(self._on_finding)
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
        try:
            guard.detach(_raising=not raising)  # findings made now reach the loggers as they come
        finally:
            with contextlib.suppress(ValueError):
                guard.finding_callbacks.remove(self._on_finding)
            self._trainer = None
            for name in ("log", "log_dict"):  # the module's, which Lightning gives every callback at each run
                vars(self).pop(name, None)
        if trainer.is_global_zero:
            if self._log:
                self._send(trainer)  # the totals, if a finding seen again changed them
            if self._json_path is not None:
                guard.write_json(self._json_path)
            if self._html_path is not None:
                guard.write_html(self._html_path)

    def _on_finding(self, finding: Finding) -> None:
        """A new or revised finding (a ``Guard.finding_callbacks`` entry): the totals go to the loggers."""
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None:
            self._send(trainer)

    def _send(self, trainer: pl.Trainer) -> None:
        failed = self._sink.send(trainer.loggers, self.findings, trainer.global_step)
        guard = self.guard
        for what, exc in failed:  # reported once, as the guard reports its own failures
            if guard is not None:
                guard.ledger.publish(guard.ledger.internal_error(what, exc, None, guard.step))

    def _bar(self) -> ProgressBar | None:
        trainer = self._trainer() if self._trainer is not None else None
        return trainer.progress_bar_callback if trainer is not None else None

    def _publish(self, event: EpochStart | EpochEnd) -> None:
        if self.guard is not None and self.guard.attached:
            self.guard.publish(event)
