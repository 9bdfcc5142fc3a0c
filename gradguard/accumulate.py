"""Gradient accumulation that equals the big batch: exact weights, partial windows, LR scaling, DDP.

The arithmetic lives in a small framework-free core (:class:`_Window` and
:func:`rescale_grads_`) that integrations reuse; :class:`GradientAccumulator` drives an
optimizer with it in a plain PyTorch loop.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from gradguard._frames import user_location
from gradguard.errors import ConfigurationError
from gradguard.findings import Finding, Location, Severity, format_names
from gradguard.lr import apply_lr_factor, lr_scale_factor, warmup_multiplier
from gradguard.rules import PAGES, RULES

#: A weight: a Python number, or a 0-dim tensor that stays on its device (never read back).
Weight = float | torch.Tensor

#: The key under which the accumulator records, in each param group, the LR factor it applied.
#: It travels with ``optimizer.state_dict()``, so a resumed run is never scaled twice.

_STATE_VERSION = 1

PAGES["GG601"] = """\
GG601 accumulation-batchnorm: BatchNorm sees micro-batches, not the accumulated batch.

**What it reports.** A ``gradguard.GradientAccumulator`` with ``steps > 1`` drives a
model that holds BatchNorm layers (any ``_BatchNorm``: ``BatchNorm1d/2d/3d``,
``SyncBatchNorm``, the lazy variants). It is an info finding, recorded once, when the
accumulator is made (and by any Guard attached later, at the next optimizer step).

**Why it matters.** Accumulation makes the *gradient* that of the whole window, but
BatchNorm normalises each forward with the mean and variance of that forward's
micro-batch, and updates its running statistics once per micro-batch. With small
micro-batches the statistics are noisy, and training differs from true large-batch
training in a way no normalisation of the gradient can undo.

**How to fix it.** Often nothing: with micro-batches of a few dozen samples it is harmless.
For small micro-batches, use GroupNorm or LayerNorm, SyncBatchNorm across processes (the
statistics span every process's micro-batch), or freeze the BatchNorm statistics of a
pretrained model (put those layers in ``eval()`` mode).

**Example.** ``train.py:31: GG601 accumulation-batchnorm [info] bn1, layer1.0.bn1, layer1.0.bn2
and 50 more: BatchNorm normalises with, and tracks, statistics of each micro-batch (8
samples), not of the accumulated batch of 16 micro-batches, in 53 module(s): ...``
"""


# --------------------------------------------------------------------------- the core
@dataclasses.dataclass
class _Window:
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

    ``total`` is ``Σ n_i`` of the open window, or ``None`` while it is unweighted.
    """

    steps: int
    count: int = 0
    total: Weight | None = None
    micro_batches: int = 0
    optimizer_steps: int = 0

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


# --------------------------------------------------------------------------- the accumulator
class GradientAccumulator:
    """Accumulate gradients over ``steps`` micro-batches; the step equals one on the whole batch.

    Replace ``loss.backward(); optimizer.step(); optimizer.zero_grad()`` with
    ``acc.backward(loss)``, and call ``acc.flush()`` at the end of the data. After each
    optimizer step the parameters are those of one step on the concatenated micro-batches:

    - without ``num_items`` every micro-batch weighs the same (pass each micro-batch's
      *mean* loss);
    - with ``num_items=n`` micro-batch ``i`` weighs ``n_i / Σn`` over its window, so a
      token-mean loss over micro-batches of unequal lengths equals the token mean over the
      whole window (the weights are applied once, when the window closes, so ``Σn`` is
      never needed in advance);
    - a partial window closed by :meth:`flush` is normalised by what it holds, not by
      ``steps``.

    At each real step, in this order: normalise, unscale (``scaler.unscale_``), clip
    (``max_grad_norm``), ``optimizer.step()`` (through ``scaler.step``), ``scaler.update()``,
    ``optimizer.zero_grad(set_to_none=True)``, ``scheduler.step()``. The scheduler and the
    warm-up count optimizer steps, never micro-batches. With ``steps=1`` it is exactly a
    plain loop.

    **Learning rate.** With ``lr_scaling``, every param group's learning rate is multiplied
    at construction by ``effective / base_batch_size`` (``"linear"``, Goyal et al. 2017) or
    its square root (``"sqrt"``, for Adam-type optimizers), where the effective batch is
    ``micro_batch_size * steps * world_size``. The ratios between groups are kept, a
    ``scheduler`` passed here and any created afterwards see the scaled rate, and
    ``warmup_steps`` ramps the rate linearly from the unscaled to the scaled value over
    that many optimizer steps (the ramp multiplies the rate only while ``step()`` runs, so
    it composes with any scheduler). The factor is recorded in the param groups
    (``"gradguard_lr_factor"``), so an optimizer restored from a checkpoint is not scaled
    twice: build the accumulator *after* loading the optimizer's state.

    **DistributedDataParallel.** Only the last micro-batch of each window synchronises
    gradients. DDP decides this at *forward* time, and your forward runs before
    :meth:`backward`, so the accumulator sets ``model.require_backward_grad_sync`` (the
    flag behind ``model.no_sync()``) for the *next* micro-batch at construction and at the
    end of every :meth:`backward`: the loop needs no ``no_sync`` block and no other change.
    Do not use ``no_sync()`` yourself while the accumulator drives the model; every process
    must run the same number of micro-batches (as DDP already requires) and call
    :meth:`flush`. A partial window closed by :meth:`flush` ran without synchronisation;
    :meth:`flush` all-reduces its gradients once itself. The flag stays managed between
    windows and epochs; to train the model without the accumulator afterwards, set
    ``model.require_backward_grad_sync = True``. With ``sync_num_items=True``, each
    window's ``Σn`` is summed across processes (one scalar all-reduce per window), so a
    token-weighted loss is exact over all processes; otherwise each process normalises by
    its own ``Σn`` and DDP averages the processes.

    **Bad input** raises :class:`~gradguard.errors.ConfigurationError` (a ``ValueError``).
    A non-finite loss is reported immediately for a CPU loss; for a CUDA loss the check is
    folded into a flag on the device and reported at a later call once the GPU has
    produced it, so the loop never waits for the GPU. With a ``scaler``, non-finite losses
    are left to the scaler, which skips those steps.

    **Findings.** A model with BatchNorm yields ``GG601 accumulation-batchnorm`` (info):
    BatchNorm normalises and tracks statistics per micro-batch, not per window. It is
    recorded by every attached :class:`~gradguard.Guard` and kept in :attr:`findings`.

    Args:
        optimizer: the optimizer to step once per window.
        steps: micro-batches per optimizer step (``>= 1``).
        model: the model, plain or ``DistributedDataParallel`` (or ``torch.compile`` of
            one): used for DDP synchronisation and the BatchNorm check. The world size is
            that of its process group, or of ``torch.distributed`` when initialised.
        scheduler: a learning-rate scheduler to step after each optimizer step.
        scaler: an AMP ``torch.amp.GradScaler``.
        max_grad_norm: clip the window's gradient to this total 2-norm.
        lr_scaling: ``None``, ``"linear"`` or ``"sqrt"``.
        base_batch_size: the batch size the learning rate was tuned for.
        micro_batch_size: the number of samples per micro-batch (per process).
        warmup_steps: optimizer steps of linear warm-up to the scaled learning rate.
        sync_num_items: sum ``num_items`` across processes (needs ``torch.distributed``).

    Example:
        >>> import torch
        >>> from gradguard import GradientAccumulator
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> acc = GradientAccumulator(opt, steps=2)
        >>> x = torch.randn(10, 3)
        >>> [acc.backward(model(xb).pow(2).mean()) for xb in x.split(2)]
        [False, True, False, True, False]
        >>> acc.flush()                    # the last, partial window
        True
        >>> acc.optimizer_steps, acc.accumulated
        (3, 0)

        Token-weighted micro-batches of unequal sizes:

        >>> acc = GradientAccumulator(opt, steps=2)
        >>> for xb in x.split([3, 7]):
        ...     stepped = acc.backward(model(xb).pow(2).mean(), num_items=len(xb))
        >>> stepped
        True
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        steps: int,
        model: torch.nn.Module | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        max_grad_norm: float | None = None,
        lr_scaling: str | None = None,
        base_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        warmup_steps: int = 0,
        sync_num_items: bool = False,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigurationError(
                f"Expected optimizer to be a torch.optim.Optimizer but got {type(optimizer).__name__}"
            )
        steps = _int_at_least("steps", steps, 1)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ConfigurationError(f"Expected model to be a torch.nn.Module or None but got {type(model).__name__}")
        if scheduler is not None:
            if not callable(getattr(scheduler, "step", None)):
                raise ConfigurationError(
                    f"Expected scheduler to be a learning-rate scheduler but got {type(scheduler).__name__}"
                )
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise ConfigurationError(
                    "Expected scheduler to step without a metric but got ReduceLROnPlateau: "
                    "leave it out and call scheduler.step(metric) yourself"
                )
        if scaler is not None and not all(callable(getattr(scaler, m, None)) for m in _SCALER_METHODS):
            raise ConfigurationError(f"Expected scaler to be a torch.amp.GradScaler but got {type(scaler).__name__}")
        if max_grad_norm is not None and (
            isinstance(max_grad_norm, bool)
            or not isinstance(max_grad_norm, numbers.Real)
            or not math.isfinite(max_grad_norm)
            or max_grad_norm <= 0
        ):
            raise ConfigurationError(
                f"Expected max_grad_norm to be a positive number or None but got {max_grad_norm!r}"
            )
        if micro_batch_size is not None:
            micro_batch_size = _int_at_least("micro_batch_size", micro_batch_size, 1)
        warmup_steps = _int_at_least("warmup_steps", warmup_steps, 0)
        if lr_scaling is not None:
            if lr_scaling not in ("linear", "sqrt"):
                raise ConfigurationError(f"Expected lr_scaling to be None, 'linear' or 'sqrt' but got {lr_scaling!r}")
            if base_batch_size is None:
                raise ConfigurationError(
                    f"Expected base_batch_size (the batch size the learning rate was tuned for) "
                    f"with lr_scaling={lr_scaling!r} but got None"
                )
            if micro_batch_size is None:
                raise ConfigurationError(
                    f"Expected micro_batch_size (samples per micro-batch and process) with "
                    f"lr_scaling={lr_scaling!r} but got None"
                )
        elif warmup_steps:
            raise ConfigurationError(
                f"Expected lr_scaling with warmup_steps={warmup_steps}: the warm-up ramps from the "
                "unscaled to the scaled learning rate; use a scheduler for a warm-up of its own"
            )
        if not isinstance(sync_num_items, bool):
            raise ConfigurationError(f"Expected sync_num_items to be a bool but got {sync_num_items!r}")

        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.lr_scaling = lr_scaling
        self.base_batch_size = base_batch_size
        self.micro_batch_size = micro_batch_size
        self.warmup_steps = warmup_steps
        self.sync_num_items = sync_num_items

        self._model_ref = weakref.ref(model) if model is not None else None
        self._ddp_ref: weakref.ref[DistributedDataParallel] | None = None
        ddp = _find_ddp(model)
        if ddp is not None:
            self._ddp_ref = weakref.ref(ddp)
        self._group: Any = None
        self.world_size = 1
        if ddp is not None:
            self._group = ddp.process_group
            self.world_size = dist.get_world_size(self._group)
        elif dist.is_available() and dist.is_initialized():
            self.world_size = dist.get_world_size()
        if sync_num_items and not (dist.is_available() and dist.is_initialized()):
            raise ConfigurationError(
                "Expected torch.distributed to be initialised with sync_num_items=True but it is not: "
                "call torch.distributed.init_process_group() first, or leave sync_num_items=False"
            )

        self._window = _Window(steps)
        self._nonfinite = _DeviceChecks()
        self.lr_factor = 1.0
        effective = self.effective_batch_size
        if lr_scaling is not None and base_batch_size is not None and effective is not None:  # both checked above
            self.lr_factor = lr_scale_factor(lr_scaling, base_batch_size, effective)
            self._apply_lr_factor()

        self.findings: list[Finding] = []
        batchnorm = _batchnorm_finding(model, steps, micro_batch_size, user_location())
        if batchnorm is not None:
            self.findings.append(batchnorm)
        self._reported_to: weakref.WeakSet[Any] = weakref.WeakSet()
        self._report()
        self._prepare_sync()

    # ------------------------------------------------------------------ public
    @property
    def steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self._window.steps

    @property
    def accumulated(self) -> int:
        """Micro-batches accumulated in the open window."""
        return self._window.count

    @property
    def micro_batches(self) -> int:
        """Micro-batches seen so far."""
        return self._window.micro_batches

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps made so far."""
        return self._window.optimizer_steps

    @property
    def effective_batch_size(self) -> int | None:
        """``micro_batch_size * steps * world_size``, or ``None`` without ``micro_batch_size``."""
        if self.micro_batch_size is None:
            return None
        return self.micro_batch_size * self.steps * self.world_size

    def backward(self, loss: torch.Tensor, num_items: int | float | torch.Tensor | None = None) -> bool:
        """Accumulate one micro-batch's gradient; step the optimizer when the window is full.

        Args:
            loss: the micro-batch's loss, a scalar that is a *mean* over its items.
            num_items: how many items that mean is over (tokens, samples), to weigh the
                micro-batch by it. A number or a one-element tensor; a tensor on a GPU is
                used without being read back. Give it for every micro-batch or none.

        Returns:
            ``True`` when this call made an optimizer step.
        """
        if self._nonfinite.pending:
            self._raise_if_nonfinite(wait=False)
        self._check_loss(loss)
        window = self._window
        items = self._check_num_items(num_items, loss)
        if window.count and (items is None) != (window.total is None):
            raise ConfigurationError(
                f"Expected num_items for every micro-batch of a window or for none but got "
                f"{'None' if items is None else 'a count'} after {window.count} micro-batch(es) "
                f"{'with' if window.total is not None else 'without'} it"
            )
        closing = window.closing
        weight, rescale = window.weights(items, self._denominator)
        if rescale is not None:
            rescale_grads_(self._grads(), rescale)
        if isinstance(weight, torch.Tensor) or weight != 1.0:
            loss = loss * weight
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()
        window.add(items)
        if closing:
            self._step()
            return True
        self._prepare_sync()
        return False

    def flush(self) -> bool:
        """Step on the open window, if it holds any micro-batch. Call it at the end of the data.

        The window is normalised by what it holds (its micro-batch count, or its ``Σn``);
        under DDP its gradients are averaged across processes here (its micro-batches ran
        without synchronisation). Returns ``True`` when it made an optimizer step.
        """
        window = self._window
        stepped = False
        if window.count:
            rescale_grads_(self._grads(), window.close_factor(self._denominator))
            ddp = self._ddp()
            if ddp is not None:
                _all_reduce_grads(ddp, self.world_size, self._group)
            self._step()
            stepped = True
        self._raise_if_nonfinite(wait=True)
        return stepped

    def state_dict(self) -> dict[str, Any]:
        """The counters, and the gradient of the open window, to resume in the middle of it.

        Under DDP each process holds its own partial gradient: save one state per rank.
        """
        window = self._window
        total = window.total
        grads: list[torch.Tensor | None] | None = None
        if window.count:
            grads = [None if p.grad is None else p.grad.detach().clone() for p in self._params()]
        return {
            "version": _STATE_VERSION,
            "steps": window.steps,
            "count": window.count,
            "total": float(total) if total is not None else None,
            "micro_batches": window.micro_batches,
            "optimizer_steps": window.optimizer_steps,
            "lr_factor": self.lr_factor,
            "grads": grads,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, open window included. The argument is not modified."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ConfigurationError(
                f"Expected a GradientAccumulator state dict of version {_STATE_VERSION} but got {state!r:.80}"
            )
        count = _int_at_least("count", state.get("count"), 0)
        if count >= self.steps:
            raise ConfigurationError(
                f"Expected the saved window to hold fewer than steps={self.steps} micro-batches but it holds {count}"
            )
        total = state.get("total")
        grads = state.get("grads")
        params = self._params()
        if count:
            if not isinstance(grads, (list, tuple)) or len(grads) != len(params):
                raise ConfigurationError(
                    f"Expected the saved gradients of the open window for {len(params)} parameters "
                    f"but got {'none' if grads is None else len(grads)}"
                )
            for p, g in zip(params, grads, strict=True):
                if g is not None and tuple(g.shape) != tuple(p.shape):
                    raise ConfigurationError(
                        f"Expected a saved gradient of shape {tuple(p.shape)} but got {tuple(g.shape)}"
                    )
        self._window = _Window(
            steps=self.steps,
            count=count,
            total=None if total is None else float(total),
            micro_batches=_int_at_least("micro_batches", state.get("micro_batches", 0), 0),
            optimizer_steps=_int_at_least("optimizer_steps", state.get("optimizer_steps", 0), 0),
        )
        if count and grads is not None:
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.grad = None if g is None else g.detach().to(device=p.device, dtype=p.dtype, copy=True)
            saved_steps = state.get("steps", self.steps)
            if total is None and saved_steps != self.steps:  # its micro-batches weighed 1 / saved_steps
                rescale_grads_(self._grads(), saved_steps / self.steps)
        self._prepare_sync()

    def __repr__(self) -> str:
        extra = f", lr_scaling={self.lr_scaling!r}, lr_factor={self.lr_factor:g}" if self.lr_scaling else ""
        return (
            f"{type(self).__name__}({type(self.optimizer).__name__}, steps={self.steps}, "
            f"accumulated={self.accumulated}, optimizer_steps={self.optimizer_steps}{extra})"
        )

    # ------------------------------------------------------------------ internals
    def _ddp(self) -> DistributedDataParallel | None:
        return self._ddp_ref() if self._ddp_ref is not None else None

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def _denominator(self, total: Weight) -> Weight:
        if self.sync_num_items:
            return _sum_across(total, self._group) / self.world_size
        return total

    def _prepare_sync(self) -> None:
        # DDP reads the flag in the forward that precedes the next backward().
        ddp = self._ddp()
        if ddp is not None and self.steps > 1:
            ddp.require_backward_grad_sync = self._window.closing

    def _step(self) -> None:
        optimizer, scaler = self.optimizer, self.scaler
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._params(), self.max_grad_norm)
        ramp = warmup_multiplier(self._window.optimizer_steps, self.warmup_steps, self.lr_factor)
        saved = [group["lr"] for group in optimizer.param_groups] if ramp != 1.0 else None
        try:
            if saved is not None:
                for group in optimizer.param_groups:
                    group["lr"] = group["lr"] * ramp
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        finally:
            if saved is not None:
                for group, lr in zip(optimizer.param_groups, saved, strict=False):
                    group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self._window.reset()
        self._nonfinite.seal(self._window.optimizer_steps)
        self._prepare_sync()
        if self.findings:
            self._report()

    def _check_loss(self, loss: Any) -> None:
        if not isinstance(loss, torch.Tensor):
            raise ConfigurationError(f"Expected loss to be a torch.Tensor but got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ConfigurationError(
                f"Expected loss to be a scalar tensor but got one of shape {tuple(loss.shape)}: "
                "reduce it first (loss.mean())"
            )
        if not loss.requires_grad:
            raise ConfigurationError(
                "Expected loss to require grad but it does not: was it computed under torch.no_grad() or detached?"
            )
        if self.scaler is not None:
            return  # non-finite losses are the scaler's business: it skips those steps
        if loss.device.type == "cpu":
            value = loss.item()
            if not math.isfinite(value):
                raise ConfigurationError(
                    f"Expected loss to be finite but got {value} at micro-batch {self._window.micro_batches} "
                    f"(optimizer step {self._window.optimizer_steps}); nothing was accumulated"
                )
        elif loss.is_cuda:
            self._nonfinite.add(loss)

    def _check_num_items(self, num_items: Any, loss: torch.Tensor) -> Weight | None:
        if num_items is None:
            return None
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1 or num_items.is_complex():
                raise ConfigurationError(
                    f"Expected num_items to be a number or a one-element tensor but got a tensor of "
                    f"shape {tuple(num_items.shape)} and dtype {num_items.dtype}"
                )
            if num_items.device.type != "cpu":
                # read back nothing: a count on an accelerator is used as it is, unchecked
                return num_items.detach().reshape(()).to(loss.device, non_blocking=True)
            num_items = num_items.item()
        if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real):
            raise ConfigurationError(f"Expected num_items to be a number but got {type(num_items).__name__}")
        value = float(num_items)
        if not math.isfinite(value) or value < 0:
            raise ConfigurationError(f"Expected num_items to be a non-negative number but got {num_items!r}")
        return value

    def _raise_if_nonfinite(self, *, wait: bool) -> None:
        step = self._nonfinite.poll(wait=wait)
        if step is not None:
            raise ConfigurationError(
                f"Expected every loss to be finite but a micro-batch of the window applied by optimizer "
                f"step {step} had a nan or inf loss (found once the GPU got there, without waiting for it); "
                "the parameters may now hold NaN"
            )

    def _apply_lr_factor(self) -> None:
        apply_lr_factor(self.optimizer, self.lr_factor, self.scheduler, stacklevel=4)

    def _report(self) -> None:
        from gradguard.guard import active_guards

        for guard in active_guards():
            if guard in self._reported_to:
                continue
            self._reported_to.add(guard)
            mine = [
                dataclasses.replace(f, data=dict(f.data), step=guard.step)
                for f in self.findings
                if guard.policy.enabled(f.code)
            ]
            if mine:
                guard.emit(None, mine)


_SCALER_METHODS = ("scale", "unscale_", "step", "update")


class _DeviceChecks:
    """Non-finite CUDA losses, found without ever waiting for the GPU.

    Each micro-batch folds ``~isfinite(loss)`` into one flag on the device. At each optimizer
    step the flag is copied to pinned host memory behind a CUDA event, and read at a later
    call once the event has completed (or, at ``flush()``, after waiting for it).
    """

    def __init__(self) -> None:
        self.flag: torch.Tensor | None = None
        self.pending: collections.deque[tuple[torch.Tensor, Any, int]] = collections.deque()

    def add(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach().reshape(()))
        if self.flag is None:
            self.flag = bad
        else:
            self.flag.logical_or_(bad)

    def seal(self, step: int) -> None:
        flag, self.flag = self.flag, None
        if flag is None:
            return
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(flag.device))
        self.pending.append((host, event, step))

    def poll(self, *, wait: bool) -> int | None:
        """The optimizer step of the first window found with a non-finite loss, if any."""
        while self.pending:
            host, event, step = self.pending[0]
            if not wait and not event.query():
                return None
            event.synchronize()
            self.pending.popleft()
            if bool(host):
                self.pending.clear()
                return step
        return None


# --------------------------------------------------------------------------- helpers
def _find_ddp(model: torch.nn.Module | None) -> DistributedDataParallel | None:
    module = getattr(model, "_orig_mod", model)  # torch.compile(ddp_model)
    return module if isinstance(module, DistributedDataParallel) else None


def _sum_across(value: Weight, group: Any) -> Weight:
    """Sum a count over the processes of ``group``: a Python number on CPU backends, else a tensor."""
    on_cuda = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    if isinstance(value, torch.Tensor):
        total = value.detach().to(device=device, dtype=torch.float64).reshape(1)
    else:
        total = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(total, group=group)
    if on_cuda or isinstance(value, torch.Tensor):
        return total.reshape(())
    return total.item()


def _all_reduce_grads(ddp: DistributedDataParallel, world_size: int, group: Any) -> None:
    """Average the gradients of a DDP model across processes, as its synchronised backward would.

    Parameters without a gradient on any process keep none; where some process has one,
    the others contribute zeros.
    """
    ignored: set[str] = getattr(ddp, "parameters_to_ignore", set())
    params = [p for n, p in ddp.module.named_parameters() if p.requires_grad and n not in ignored]
    if not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad, group=group)
    present = has_grad.tolist()
    grads = []
    for p, count in zip(params, present, strict=True):
        if count and p.grad is None:
            p.grad = torch.zeros_like(p)
        if count:
            grads.append(p.grad)
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = collections.defaultdict(list)
    for g in grads:
        buckets[(g.device, g.dtype)].append(g)
    with torch.no_grad():
        for bucket in buckets.values():
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)
            flat.div_(world_size)
            for g, reduced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True):
                g.copy_(reduced)


def _batchnorm_finding(
    model: torch.nn.Module | None, steps: int, micro_batch_size: int | None, location: Location | None
) -> Finding | None:
    if model is None or steps == 1:
        return None
    root = getattr(model, "_orig_mod", model)
    if isinstance(root, DistributedDataParallel):
        root = root.module
    names = [name or type(m).__name__ for name, m in root.named_modules() if isinstance(m, _BatchNorm)]
    if not names:
        return None
    size = f"{micro_batch_size} samples" if micro_batch_size is not None else "one micro-batch"
    return Finding(
        code="GG601",
        name=RULES["GG601"],
        severity=Severity.INFO,
        message=(
            f"BatchNorm normalises with, and tracks, statistics of each micro-batch ({size}), not of the "
            f"accumulated batch of {steps} micro-batches, in {len(names)} module(s): {format_names(names)}"
        ),
        hint=(
            "Expected with accumulation; for small micro-batches prefer GroupNorm or LayerNorm, "
            "SyncBatchNorm across processes, or frozen BatchNorm statistics"
        ),
        location=location,
        where=format_names(names),
        data={"modules": names[:100], "num_modules": len(names), "steps": steps, "micro_batch_size": micro_batch_size},
    )


def _int_at_least(arg: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ConfigurationError(f"Expected {arg} to be {kind} but got {value!r}")
    return int(value)
