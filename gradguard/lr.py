"""Learning-rate scaling for a larger effective batch: the linear and square-root rules.

When gradient accumulation (or more processes) makes the batch ``k`` times larger, the
gradient's noise shrinks and the same learning rate takes ``k`` times fewer steps per
epoch. Two rules restore the training dynamics:

- **linear** (``lr * k``): Goyal et al. 2017, *Accurate, Large Minibatch SGD: Training
  ImageNet in 1 Hour*, for SGD with momentum, with a gradual warm-up from the original
  learning rate to the scaled one over the first few epochs;
- **sqrt** (``lr * sqrt(k)``): keeps the variance of the update constant (Krizhevsky 2014,
  *One weird trick for parallelizing convolutional neural networks*; Hoffer et al. 2017,
  *Train longer, generalize better*); it is the rule for Adam-type optimizers derived by
  Malladi et al. 2022, *On the SDEs and Scaling Rules for Adaptive Gradient Algorithms*.

Both are heuristics: they hold up to a problem-dependent batch size, past which a larger
batch stops helping (McCandlish et al. 2018, *An Empirical Model of Large-Batch Training*).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch

from gradguard.errors import ConfigurationError, GradGuardWarning

#: The param-group key that records the factor already applied, so a resumed run (whose
#: optimizer state carries it) is never scaled twice.
LR_FACTOR_KEY = "gradguard_lr_factor"

#: The rules :func:`lr_scale_factor` knows.
RULES = ("linear", "sqrt")

# Learning-rate values that schedulers keep in the param groups and scale with ``lr``.
_GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
# ... and in the scheduler itself (``_last_lr`` is what ``get_last_lr()`` returns).
_SCHEDULER_ATTRS = ("base_lrs", "max_lrs", "_last_lr")


def lr_scale_factor(rule: str, base_batch_size: int, effective_batch_size: int) -> float:
    """The factor that a rule applies to the learning rate for a larger (or smaller) batch.

    Args:
        rule: ``"linear"`` (``effective / base``, Goyal et al. 2017, for SGD) or ``"sqrt"``
            (its square root, for Adam-type optimizers, Malladi et al. 2022).
        base_batch_size: the batch size the learning rate was tuned for.
        effective_batch_size: the batch size of one optimizer step, all micro-batches and
            processes together.

    Example:
        >>> from gradguard import lr_scale_factor
        >>> lr_scale_factor("linear", base_batch_size=256, effective_batch_size=1024)
        4.0
        >>> lr_scale_factor("sqrt", base_batch_size=256, effective_batch_size=1024)
        2.0
    """
    if rule not in RULES:
        raise ConfigurationError(f"Expected rule to be one of {', '.join(map(repr, RULES))} but got {rule!r}")
    base = _positive_int("base_batch_size", base_batch_size)
    effective = _positive_int("effective_batch_size", effective_batch_size)
    ratio = effective / base
    return ratio if rule == "linear" else math.sqrt(ratio)


def scale_lr(optimizer: torch.optim.Optimizer, factor: float, scheduler: Any = None) -> None:
    """Multiply every param group's learning rate by ``factor``, schedulers included.

    The ratios between param groups are kept (a backbone at a tenth of the head's rate
    stays at a tenth). A scheduler created *after* this call sees the scaled rate; for one
    created *before*, pass it as ``scheduler``: its ``base_lrs`` (and ``max_lrs`` for
    ``CyclicLR``, the sub-schedulers of ``SequentialLR`` and ``ChainedScheduler``) are
    scaled too, as are the ``initial_lr``, ``max_lr`` and ``min_lr`` entries that
    schedulers keep in the param groups. Tensor learning rates are scaled in place.

    Args:
        optimizer: the optimizer whose learning rates to scale.
        factor: a positive finite number, for example from :func:`lr_scale_factor`.
        scheduler: a learning-rate scheduler of ``optimizer`` created before this call.

    Example:
        >>> import torch
        >>> from gradguard import scale_lr
        >>> head, body = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> opt = torch.optim.SGD([{"params": body.parameters(), "lr": 0.01},
        ...                        {"params": head.parameters()}], lr=0.1)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
        >>> scale_lr(opt, 4.0, scheduler=sched)
        >>> [g["lr"] for g in opt.param_groups], sched.base_lrs
        ([0.04, 0.4], [0.04, 0.4])
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigurationError(f"Expected optimizer to be a torch.optim.Optimizer but got {type(optimizer).__name__}")
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor) or factor <= 0:
        raise ConfigurationError(f"Expected factor to be a positive finite number but got {factor!r}")
    factor = float(factor)
    seen: set[int] = set()  # a tensor shared by two entries is scaled once
    for group in optimizer.param_groups:
        for key in _GROUP_KEYS:
            if key in group and group[key] is not None:
                group[key] = _scaled(group[key], factor, seen)
    if scheduler is not None:
        _scale_scheduler(scheduler, factor, seen)


def apply_lr_factor(
    optimizer: torch.optim.Optimizer, factor: float, scheduler: Any = None, stacklevel: int = 2
) -> None:
    """Bring the learning rate to ``factor`` times its unscaled value, once.

    The factor already applied is recorded in each param group under :data:`LR_FACTOR_KEY`;
    calling again with the same factor (as a resumed run does, after loading the optimizer's
    state) changes nothing.
    """
    groups = optimizer.param_groups
    applied = {float(group.get(LR_FACTOR_KEY, 1.0)) for group in groups}
    if len(applied) > 1:
        raise ConfigurationError(
            f"Expected the param groups to carry one {LR_FACTOR_KEY!r} but got {sorted(applied)}: "
            "scale the learning rate of groups added later yourself"
        )
    ratio = factor / (applied.pop() if applied else 1.0)
    if ratio != 1.0:
        if scheduler is None and any("initial_lr" in group for group in groups):
            warnings.warn(
                "gradguard: the optimizer already has a learning-rate scheduler (its param groups "
                "carry 'initial_lr') that was not passed as scheduler=, so its base_lrs stay "
                "unscaled; pass it, or create it afterwards",
                GradGuardWarning,
                stacklevel=stacklevel,
            )
        scale_lr(optimizer, ratio, scheduler)
    for group in groups:
        group[LR_FACTOR_KEY] = factor


def warmup_multiplier(step: int, warmup_steps: int, factor: float) -> float:
    """The multiplier of the scaled learning rate at optimizer step ``step`` (0-based).

    Goyal et al. 2017 (section 2.2): start from the unscaled rate (``1 / factor`` of the
    scaled one) and ramp it up linearly to the scaled rate over ``warmup_steps`` steps.

    >>> [warmup_multiplier(t, 4, 4.0) for t in range(5)]
    [0.25, 0.4375, 0.625, 0.8125, 1.0]
    """
    if step >= warmup_steps:
        return 1.0
    start = 1.0 / factor
    return start + (1.0 - start) * step / warmup_steps


def _scaled(value: Any, factor: float, seen: set[int]) -> Any:
    if isinstance(value, torch.Tensor):
        if id(value) not in seen:
            seen.add(id(value))
            with torch.no_grad():
                value.mul_(factor)
        return value
    return value * factor


def _scale_scheduler(scheduler: Any, factor: float, seen: set[int], depth: int = 0) -> None:
    if depth > 8 or id(scheduler) in seen:  # nested schedulers never go this deep; no cycles
        return
    seen.add(id(scheduler))
    for attr in _SCHEDULER_ATTRS:
        values = getattr(scheduler, attr, None)
        if isinstance(values, (list, tuple)):
            setattr(scheduler, attr, type(values)(_scaled(v, factor, seen) for v in values))
    for child in getattr(scheduler, "_schedulers", None) or ():
        _scale_scheduler(child, factor, seen, depth + 1)


def _positive_int(arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigurationError(f"Expected {arg} to be a positive integer but got {value!r}")
    return int(value)
