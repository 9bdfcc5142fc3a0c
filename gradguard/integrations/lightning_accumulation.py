"""Exact gradient accumulation for Lightning's ``Trainer``: ``AccumulationCallback``.

Lightning's ``accumulate_grad_batches=K`` divides every micro-batch's loss by ``K``. A last
partial window of ``r < K`` micro-batches (the end of an epoch) is then applied with weight
``r / K`` (Lightning #19987), micro-batches with different numbers of items weigh the same
(#20350), and the learning rate is never adapted to the larger batch. This callback
corrects all three with the arithmetic of :class:`gradguard.GradientAccumulator`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from gradguard.accumulate.window import LrRamp, Weight, Window, ratio, rescale_grads_
from gradguard.errors import ConfigurationError
from gradguard.lr import RULES as LR_RULES
from gradguard.lr import apply_lr_factor, lr_scale_factor

__all__ = ["AccumulationCallback"]


class AccumulationCallback(Callback):
    """Make ``accumulate_grad_batches`` exact, optionally item-weighted, with LR scaling.

    Before each optimizer step the accumulated gradients are rescaled so that the step
    equals one on the concatenated micro-batches of its window:

    - a partial last window of ``r`` micro-batches is normalised by ``r``, not by
      ``accumulate_grad_batches``;
    - with ``count_items(batch) -> int`` (the tokens, or the items the loss averages over),
      micro-batch ``i`` weighs ``n_i / Σn``: the window's gradient is the mean over all its
      items, not the mean of the micro-batches' means.

    The counting and the normalisation are those of :class:`gradguard.GradientAccumulator`
    (its :class:`~gradguard.accumulate.Window`); Lightning has already divided each loss
    by ``accumulate_grad_batches``, which the weighted correction multiplies back. The
    weights are applied through a hook on each micro-batch's loss, so nothing is paid per
    parameter. The rescaling happens before Lightning clips the gradients; it is linear,
    so AMP's unscaling order does not matter.

    With ``lr_scaling`` (``"linear"`` or ``"sqrt"``), the learning rate of every param group
    is multiplied once, at the start of training, by the rule's factor for the effective
    batch ``batch_size * accumulate_grad_batches * world_size`` against
    ``base_batch_size``, schedulers included; a resumed run is not scaled twice.
    ``warmup_steps`` ramps linearly from the unscaled to the scaled rate over that many
    optimizer steps (Goyal et al. 2017).

    Args:
        count_items: returns the number of items a micro-batch's loss averages over.
        lr_scaling: ``None``, ``"linear"`` or ``"sqrt"``.
        base_batch_size: the batch size the learning rate was tuned for.
        warmup_steps: optimizer steps of linear warm-up to the scaled rate.
        batch_size: the micro-batch size; read from the train dataloader when omitted.

    Example:
        >>> from gradguard.lightning import AccumulationCallback
        >>> callback = AccumulationCallback(lr_scaling="sqrt", base_batch_size=32)
        >>> callback.lr_factor  # known once training starts
        1.0
    """

    def __init__(
        self,
        count_items: Callable[[Any], Any] | None = None,
        lr_scaling: str | None = None,
        base_batch_size: int | None = None,
        warmup_steps: int = 0,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if count_items is not None and not callable(count_items):
            raise ConfigurationError(f"Expected count_items to be callable but got {type(count_items).__name__}")
        if lr_scaling is not None and lr_scaling not in LR_RULES:
            raise ConfigurationError(f"Expected lr_scaling to be None, 'linear' or 'sqrt' but got {lr_scaling!r}")
        if lr_scaling is not None and base_batch_size is None:
            raise ConfigurationError("Expected base_batch_size with lr_scaling but got None")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ConfigurationError(f"Expected warmup_steps to be a non-negative int but got {warmup_steps!r}")
        if warmup_steps and lr_scaling is None:
            raise ConfigurationError("Expected lr_scaling with warmup_steps: warm-up ramps to the scaled rate")
        for arg, value in (("base_batch_size", base_batch_size), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"Expected {arg} to be a positive int but got {value!r}")
        self.count_items = count_items
        self.lr_scaling = lr_scaling
        self.base_batch_size = base_batch_size
        self.warmup_steps = warmup_steps
        self.batch_size = batch_size
        self.lr_factor = 1.0
        self._window = Window(steps=1)  # micro-batches (and Σ n_i / n_ref) of the open window
        self._ref: Weight | None = None  # n of the window's first micro-batch: keeps weights near 1
        self._weight: Weight = 1.0  # the next backward's loss weight
        self._ramp = LrRamp(warmup_steps, 1.0)
        self._handles: list[Any] = []

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps made so far."""
        return self._window.optimizer_steps

    @optimizer_steps.setter
    def optimizer_steps(self, value: int) -> None:
        self._window.optimizer_steps = int(value)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(lr_scaling=self.lr_scaling, base_batch_size=self.base_batch_size)

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ConfigurationError(
                "Expected automatic optimization with AccumulationCallback but the LightningModule sets "
                "automatic_optimization = False; use gradguard.GradientAccumulator in training_step instead"
            )
        self._window.steps = trainer.accumulate_grad_batches
        self._reset_window()
        if self.lr_scaling is not None:
            effective = self._batch_size(trainer) * trainer.accumulate_grad_batches * trainer.world_size
            self.lr_factor = lr_scale_factor(self.lr_scaling, self.base_batch_size or 0, effective)
            self._ramp.factor = self.lr_factor
            schedulers = {id(c.scheduler.optimizer): c.scheduler for c in trainer.lr_scheduler_configs}
            for opt in trainer.optimizers:
                apply_lr_factor(opt, self.lr_factor, schedulers.get(id(opt)))
                if self.warmup_steps:
                    self._handles.append(opt.register_step_post_hook(self._restore_lrs))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.count_items is None:
            return
        n = self.count_items(batch)
        if isinstance(n, numbers.Real) and not isinstance(n, bool):
            if not math.isfinite(n) or n < 0:
                raise ConfigurationError(f"Expected count_items(batch) to be a non-negative number but got {n!r}")
        elif not isinstance(n, torch.Tensor) or n.numel() != 1:
            raise ConfigurationError(f"Expected count_items(batch) to return a number but got {type(n).__name__}")
        if self._ref is None or (not isinstance(self._ref, torch.Tensor) and self._ref == 0):
            self._ref = n if (isinstance(n, torch.Tensor) or n > 0) else None
        self._weight = ratio(n, self._ref) if self._ref is not None else 0.0

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self.count_items is None:
            self._window.add(None)
            return
        weight = self._weight
        if isinstance(weight, torch.Tensor) or weight != 1.0:
            loss.register_hook(_scale_by(weight))
        self._window.add(weight)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        window = self._window
        window.steps = trainer.accumulate_grad_batches
        factor: Weight = 1.0
        if window.count:
            # the window's own normalisation; a weighted one also undoes Lightning's 1 / K
            factor = window.close_factor(lambda total: total)
            if window.total is not None:
                factor = factor * window.steps
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        rescale_grads_(grads, factor)
        self._ramp.apply(optimizer, window.optimizer_steps)
        window.reset()
        self._reset_window()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer_steps": self.optimizer_steps, "lr_factor": self.lr_factor}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._window.optimizer_steps = int(state_dict.get("optimizer_steps", 0))
        self.lr_factor = float(state_dict.get("lr_factor", 1.0))
        self._ramp.factor = self.lr_factor

    # ------------------------------------------------------------------ internals
    def _batch_size(self, trainer: pl.Trainer) -> int:
        if self.batch_size is not None:
            return self.batch_size
        size = getattr(trainer.train_dataloader, "batch_size", None)
        if not isinstance(size, int) or size < 1:
            raise ConfigurationError(
                "Expected a train dataloader with an int batch_size for lr_scaling but got "
                f"{size!r}; pass AccumulationCallback(batch_size=...)"
            )
        return size

    def _restore_lrs(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Runs right after optimizer.step(), before any scheduler reads the learning rate.
        self._ramp.restore(optimizer)

    def _reset_window(self) -> None:
        self._window.count = 0
        self._window.total = None
        self._ref = None
        self._weight = 1.0

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _scale_by(weight: Weight) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * (weight.to(grad.device) if isinstance(weight, torch.Tensor) else weight)

    return hook
