"""Lightning adapter: ``GradGuardCallback`` maps a ``Trainer``'s events onto a :class:`Guard`.

The detectors run unchanged: the callback attaches a guard to the ``LightningModule`` in
``setup``, hands it the ``Trainer``'s optimizers once they exist, and detaches in
``teardown`` and ``on_exception``. Optimizer steps are seen through PyTorch's own
optimizer hooks, so manual optimization is watched like automatic optimization.
"""

from __future__ import annotations

import copy
import os
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from gradguard.findings import Finding, Severity
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

    After ``fit``, :attr:`findings` holds the findings, as :class:`gradguard.Finding`.
    Besides the core detectors (``GG201`` already sees a torchmetrics ``Metric`` whose list
    states hold autograd graphs, through the module's attributes), the callback reports
    metric list states that are never reset and grow from epoch to epoch (``GG301``),
    naming the metric's attribute.

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
        self._metrics: list[tuple[str, weakref.ref[Any]]] = []
        self._metric_sizes: dict[tuple[str, str], int] = {}
        self._metric_flagged: set[tuple[str, str, str]] = set()

    # ------------------------------------------------------------------ public
    @property
    def findings(self) -> list[Finding]:
        """Every finding of the runs so far (all stages), merged by code and place."""
        merged: dict[Any, Finding] = {}
        for f in [*self._done, *(self.guard.findings if self.guard is not None else [])]:
            known = merged.get(f.key)
            if known is None:
                merged[f.key] = copy.copy(f)
            else:
                known.count += f.count
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
        self._metrics = _find_metrics(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._add_optimizers(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._add_optimizers(trainer)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_metric_growth(trainer)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_metric_growth(trainer)

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
        self._metrics = []
        guard.detach(_raising=not raising)
        if trainer.is_global_zero:
            if self._json_path is not None:
                guard.write_json(self._json_path)
            if self._html_path is not None:
                guard.write_html(self._html_path)
            if self._log:
                _log_findings(trainer, guard.findings)

    def _emit(self, finding: Finding) -> None:
        if self.guard is not None and self.guard.attached:
            self.guard.emit(None, [finding])

    def _check_metric_growth(self, trainer: pl.Trainer) -> None:
        for path, ref in self._metrics:
            metric = ref()
            if metric is None:
                continue
            for state in _list_states(metric):
                values = getattr(metric, state, None) or []
                key = (path, state)
                before = self._metric_sizes.get(key)
                self._metric_sizes[key] = len(values)
                if (
                    before is None
                    or not values
                    or len(values) <= before
                    or (path, state, "GG301") in self._metric_flagged
                ):
                    continue
                if before > 0:  # not reset since the last epoch began, and still growing
                    self._metric_flagged.add((path, state, "GG301"))
                    self._emit(_metric_growth_finding(path, state, values, trainer.current_epoch))


def _find_metrics(module: torch.nn.Module) -> list[tuple[str, weakref.ref[Any]]]:
    try:
        from torchmetrics import Metric
    except ImportError:  # torchmetrics is optional
        return []
    return [(name, weakref.ref(m)) for name, m in module.named_modules() if isinstance(m, Metric) and name]


def _list_states(metric: Any) -> list[str]:
    return [name for name, default in getattr(metric, "_defaults", {}).items() if isinstance(default, list)]


def _metric_growth_finding(path: str, state: str, values: list[Any], epoch: int) -> Finding:
    nbytes = sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
    return Finding(
        code="GG301",
        name="memory-growth",
        severity=Severity.WARNING,
        message=(
            f"torchmetrics metric `{path}` was not reset between epochs: its list state `{state}` keeps "
            f"growing, now {len(values)} entries ({nbytes / 2**20:.1f} MiB) at epoch {epoch}"
        ),
        hint=(
            f"Reset it once per epoch: log the metric object (self.log(..., self.{path})) so Lightning "
            f"resets it, or call self.{path}.reset() after compute()"
        ),
        location=None,
        where=f"{path}.{state}",
        data={"metric": path, "state": state, "entries": len(values), "bytes": nbytes, "epoch": epoch},
    )


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
