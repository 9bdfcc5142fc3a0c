"""The arithmetic of gradient accumulation, shared by ``GradientAccumulator`` and Lightning's callback.

:class:`Window` keeps the counters of the open window as plain data, and says how each
micro-batch is weighted and how a window closed early is normalised; :func:`rescale_grads_`
applies a factor to the accumulated gradients; :class:`LrRamp` applies the learning-rate
warm-up around one optimizer step.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from gradguard.lr import warmup_multiplier

#: A weight: a Python number, or a 0-dim tensor that stays on its device (never read back).
Weight = float | torch.Tensor


@dataclasses.dataclass
class Window:
    """The counters of gradient accumulation, as plain data (like optax's ``MultiStepsState``).

    The window's gradient is the weighted mean of its micro-batches' gradients. Gradients
    are linear in the loss, so the weights can be folded into each micro-batch's loss:

    - without ``num_items`` every micro-batch weighs ``1 / steps``; a window that
      :meth:`close_factor` closes early, after ``count < steps`` micro-batches, is rescaled
      by ``steps / count``;
    - with ``num_items`` micro-batch ``i`` (whose loss is a mean over its ``n_i`` items) is
      weighted by ``n_i`` until the last micro-batch of the window, which knows
      ``N = Σ n_i``: the gradient accumulated so far is multiplied by ``1 / N`` and the
      last loss by ``n_last / N``. The result is ``Σ n_i g_i / N``, the gradient of the
      mean over all the window's items, without knowing ``N`` in advance, and normalised
      before any gradient leaves the process (so DDP averages normalised gradients).

    ``total`` is ``Σ n_i`` of the open window, or ``None`` while it is unweighted;
    ``skipped`` counts the windows dropped with no optimizer step, their items adding up to 0.
    """

    steps: int
    count: int = 0
    total: Weight | None = None
    micro_batches: int = 0
    optimizer_steps: int = 0
    skipped: int = 0

    @property
    def closing(self) -> bool:
        """Whether the next micro-batch completes the window."""
        return self.count + 1 >= self.steps

    def weights(
        self, num_items: Weight | None, denominator: Callable[[Weight], Weight]
    ) -> tuple[Weight, Weight | None]:
        """The next micro-batch's loss weight, and a factor for the gradients already accumulated.

        ``denominator(N)`` turns a window's item count into what its gradient is divided by
        (``N``, or ``N_global / world_size`` when counts are summed across processes that
        average their gradients).
        """
        if num_items is None:
            return 1.0 / self.steps, None
        if not self.closing:
            return num_items, None
        total = num_items if self.total is None else self.total + num_items
        den = denominator(total)
        # n / N rather than n * (1 / N): a window of one micro-batch weighs exactly 1
        return ratio(num_items, den), (ratio(1.0, den) if self.count else None)

    def close_factor(self, denominator: Callable[[Weight], Weight]) -> Weight:
        """The factor that normalises the open window when it is closed before it is full."""
        if self.total is None:
            return self.steps / self.count
        return ratio(1.0, denominator(self.total))

    def add(self, num_items: Weight | None) -> None:
        """Count one micro-batch whose gradient was accumulated."""
        if num_items is not None:
            self.total = num_items if self.total is None else self.total + num_items
        self.count += 1
        self.micro_batches += 1

    def reset(self) -> None:
        """The window was applied by an optimizer step."""
        self.count = 0
        self.total = None
        self.optimizer_steps += 1

    def skip(self) -> None:
        """The window was dropped with no optimizer step (its items add up to 0)."""
        self.count = 0
        self.total = None
        self.skipped += 1


def ratio(numerator: Weight, denominator: Weight) -> Weight:
    """``numerator / denominator``, and 0 for an empty window (whose gradient is zero anyway).

    >>> ratio(1.0, 4), ratio(3, 0), ratio(1.0, torch.tensor(4.0))
    (0.25, 0.0, tensor(0.2500))
    """
    if isinstance(numerator, torch.Tensor) or isinstance(denominator, torch.Tensor):
        return torch.nan_to_num(torch.as_tensor(numerator) / denominator, nan=0.0, posinf=0.0, neginf=0.0)
    return numerator / denominator if denominator > 0 else 0.0


def rescale_grads_(grads: list[torch.Tensor], factor: Weight) -> None:
    """Multiply gradients in place by ``factor`` (a number, or a 0-dim tensor kept on the device).

    >>> g = [torch.ones(2), torch.full((1,), 4.0)]
    >>> rescale_grads_(g, 0.5); g
    [tensor([0.5000, 0.5000]), tensor([2.])]
    """
    if not grads or (not isinstance(factor, torch.Tensor) and factor == 1.0):
        return
    by_device: dict[torch.device, list[torch.Tensor]] = collections.defaultdict(list)
    with torch.no_grad():
        for g in grads:
            if g.is_sparse:
                g.mul_(factor.to(g.device) if isinstance(factor, torch.Tensor) else factor)
            else:
                by_device[g.device].append(g)
        for device, group in by_device.items():
            if isinstance(factor, torch.Tensor):
                torch._foreach_mul_(group, factor.to(device, non_blocking=True))
            else:
                torch._foreach_mul_(group, factor)


class LrRamp:
    """The linear warm-up from the unscaled to the scaled learning rate, around one step at a time.

    :meth:`apply` multiplies every param group's rate by the warm-up multiplier of that
    optimizer step just before it runs, and :meth:`restore` puts the rates back right after,
    so that the ramp composes with any scheduler.

    >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.4)
    >>> ramp = LrRamp(warmup_steps=4, factor=4.0)
    >>> ramp.apply(opt, 0); opt.param_groups[0]["lr"]
    0.1
    >>> ramp.restore(opt); opt.param_groups[0]["lr"]
    0.4
    """

    def __init__(self, warmup_steps: int, factor: float) -> None:
        self.warmup_steps = warmup_steps
        self.factor = factor
        self._saved: list[Any] | None = None

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Ramp the rates for optimizer step number ``step`` (counted from 0)."""
        self.restore(optimizer)
        ramp = warmup_multiplier(step, self.warmup_steps, self.factor) if self.warmup_steps else 1.0
        if ramp == 1.0:
            return
        self._saved = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * ramp

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        """Put back the rates :meth:`apply` changed, if any."""
        if self._saved is not None:
            for group, lr in zip(optimizer.param_groups, self._saved, strict=False):
                group["lr"] = lr
            self._saved = None
