"""Gradient accumulation that equals the big batch: exact weights, partial windows, LR scaling, DDP.

The arithmetic lives in :mod:`gradguard.accumulate.window`, shared with the Lightning
callback; :class:`GradientAccumulator` drives an optimizer with it in a plain PyTorch loop.
"""

from __future__ import annotations

import collections
import math
import numbers
import warnings
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradguard.accumulate.distributed import all_reduce_grads, find_ddp, sum_across
from gradguard.accumulate.window import LrRamp, Weight, Window, rescale_grads_
from gradguard.errors import ConfigurationError, EmptyWindowWarning
from gradguard.events import AccumulatorWindow
from gradguard.findings import Finding
from gradguard.introspect import device
from gradguard.introspect.frames import user_location
from gradguard.lr import apply_lr_factor, lr_scale_factor

_STATE_VERSION = 1


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

    **A window with no items.** A window whose ``num_items`` add up to 0 has no gradient,
    and a step on it would still move the weights (AdamW's weight decay, momentum). It makes
    no optimizer step: no scheduler step, warm-up step or scaler update either; its
    gradients are reset as after a step, :attr:`skipped_windows` counts it, and the first
    one warns (:class:`~gradguard.errors.EmptyWindowWarning`, once per accumulator: it is
    no mistake in itself). The sum is known only where it needs no wait for a device:
    counts given as numbers or CPU tensors, in one process, or summed across processes by
    ``sync_num_items`` on a CPU backend (every process then skips the same windows). A count
    on a GPU, or a process's own count under DDP without ``sync_num_items`` (the others may
    have items), steps as any window does, on a zero gradient.

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

    **Findings.** The accumulator tells every attached :class:`~gradguard.Guard` when it is
    made and at each window (an ``AccumulatorWindow`` event), so that a model with
    BatchNorm yields ``GG601 accumulation-batchnorm`` (info): BatchNorm normalises and
    tracks statistics per micro-batch, not per window. :attr:`findings` holds what GG601
    says of this accumulator, with or without a guard.

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
        ddp = find_ddp(model)
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

        self._window = Window(steps)
        self._den: Weight | None = None  # what the closing window's gradient is divided by, once known
        self._warned_empty = False
        self._nonfinite = _NonFinite()
        self.lr_factor = 1.0
        effective = self.effective_batch_size
        if lr_scaling is not None and base_batch_size is not None and effective is not None:  # both checked above
            self.lr_factor = lr_scale_factor(lr_scaling, base_batch_size, effective)
            self._apply_lr_factor()

        self._ramp = LrRamp(warmup_steps, self.lr_factor)
        self._created_at = user_location()
        self._announce(0)
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
    def skipped_windows(self) -> int:
        """Windows closed with no optimizer step so far, their ``num_items`` adding up to 0."""
        return self._window.skipped

    @property
    def findings(self) -> list[Finding]:
        """What ``GG601 accumulation-batchnorm`` says of this accumulator (info), guard or not."""
        from gradguard.detectors.accumulation_batchnorm import AccumulationBatchNorm

        return AccumulationBatchNorm.check(self._event(0))

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
        self._den = None
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
            if self._empty(self._den):
                self._skip()
                return False
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
            self._den = None
            factor = window.close_factor(self._denominator)
            if self._empty(self._den):  # every process skips it alike: no all-reduce
                self._skip()
            else:
                rescale_grads_(self._grads(), factor)
                ddp = self._ddp()
                if ddp is not None:
                    all_reduce_grads(ddp, self.world_size, self._group)
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
            "skipped_windows": window.skipped,
            "lr_factor": self.lr_factor,
            "grads": grads,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, open window included. The argument is not modified.

        Raises:
            ConfigurationError: ``state`` is no state of this version, or a part of it is
                malformed (the message names it, ``state['grads'][3]`` say, and what it holds);
                nothing is restored then.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ConfigurationError(
                f"Expected a GradientAccumulator state dict of version {_STATE_VERSION} but got {state!r:.80}"
            )
        count = _int_at_least("state['count']", state.get("count"), 0)
        if count >= self.steps:
            raise ConfigurationError(
                f"Expected the saved window to hold fewer than steps={self.steps} micro-batches but it holds {count}"
            )
        counters = {
            key: _int_at_least(f"state[{key!r}]", state.get(key, 0), 0)
            for key in ("micro_batches", "optimizer_steps", "skipped_windows")
        }
        saved_steps = _int_at_least("state['steps']", state.get("steps", self.steps), 1)
        total = state.get("total")
        if total is not None and (
            isinstance(total, bool) or not isinstance(total, numbers.Real) or not math.isfinite(total) or total < 0
        ):
            raise ConfigurationError(
                f"Expected state['total'] to be a non-negative number or None but got {total!r:.80}"
            )
        grads = state.get("grads")
        params = self._params()
        if count:
            if not isinstance(grads, (list, tuple)) or len(grads) != len(params):
                got: Any = "none" if grads is None else type(grads).__name__
                if isinstance(grads, (list, tuple)):
                    got = len(grads)
                raise ConfigurationError(
                    f"Expected the saved gradients of the open window for {len(params)} parameters "
                    f"in state['grads'] but got {got}"
                )
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                if g is not None and not isinstance(g, torch.Tensor):
                    raise ConfigurationError(
                        f"Expected state['grads'][{i}] to be a torch.Tensor or None but got {type(g).__name__}"
                    )
                if g is not None and tuple(g.shape) != tuple(p.shape):
                    raise ConfigurationError(
                        f"Expected a saved gradient of shape {tuple(p.shape)} but got {tuple(g.shape)}"
                    )
        self._window = Window(
            steps=self.steps,
            count=count,
            total=None if total is None else float(total),
            micro_batches=counters["micro_batches"],
            optimizer_steps=counters["optimizer_steps"],
            skipped=counters["skipped_windows"],
        )
        if count and grads is not None:
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.grad = None if g is None else g.detach().to(device=p.device, dtype=p.dtype, copy=True)
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
        den = sum_across(total, self._group) / self.world_size if self.sync_num_items else total
        self._den = den
        return den

    def _empty(self, den: Weight | None) -> bool:
        """Whether the closing window's items add up to 0 in every process, known with no wait for a device."""
        if den is None or isinstance(den, torch.Tensor) or den != 0:
            return False  # unweighted, a count on a device (never read back), or items to learn from
        return self.sync_num_items or self.world_size == 1  # else other processes may hold items: step with them

    def _skip(self) -> None:
        """Close a window whose items add up to 0: gradients reset as after a step, and no step."""
        window = self._window
        first = window.micro_batches - window.count + 1
        count = window.count
        self.optimizer.zero_grad(set_to_none=True)
        window.skip()
        self._nonfinite.seal(window.optimizer_steps)
        self._prepare_sync()
        self._announce(count)
        if not self._warned_empty:
            self._warned_empty = True
            span = f"micro-batch {first}" if count == 1 else f"micro-batches {first}-{first + count - 1}"
            warnings.warn(
                f"gradguard: the num_items of an accumulation window ({span}) add up to 0, so it made no "
                "optimizer step (nor scheduler, warm-up or scaler step) and its gradients were reset; "
                "GradientAccumulator.skipped_windows counts such windows (this warning is issued once)",
                EmptyWindowWarning,
                stacklevel=3,
            )

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
        self._ramp.factor = self.lr_factor
        self._ramp.apply(optimizer, self._window.optimizer_steps)
        try:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        finally:
            self._ramp.restore(optimizer)
        optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        count = self._window.count
        self._window.reset()
        self._nonfinite.seal(self._window.optimizer_steps)
        self._prepare_sync()
        self._announce(count)

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

    def _event(self, count: int) -> AccumulatorWindow:
        model = self._model_ref() if self._model_ref is not None else None
        return AccumulatorWindow(model, self.steps, count, self.micro_batch_size, self._created_at)

    def _announce(self, count: int) -> None:
        from gradguard.guard import broadcast

        broadcast(self._event(count))


_SCALER_METHODS = ("scale", "unscale_", "step", "update")


class _NonFinite:
    """Non-finite CUDA losses, found without ever waiting for the GPU.

    Each micro-batch folds ``~isfinite(loss)`` into one flag on the device; at each optimizer
    step the flag goes to the host behind an event, and is read at a later call once the
    GPU has produced it (or, at ``flush()``, after waiting for it).
    """

    def __init__(self) -> None:
        self.flag: torch.Tensor | None = None
        self.pending: collections.deque[tuple[device.DeviceFlag, int]] = collections.deque()

    def add(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach().reshape(()))
        self.flag = bad if self.flag is None else self.flag.logical_or_(bad)

    def seal(self, step: int) -> None:
        flag, self.flag = self.flag, None
        if flag is not None:
            self.pending.append((device.DeviceFlag(flag), step))

    def poll(self, *, wait: bool) -> int | None:
        """The optimizer step of the first window found with a non-finite loss, if any."""
        while self.pending:
            flag, step = self.pending[0]
            value = device.resolve(flag, wait=wait)
            if value is None:
                return None
            self.pending.popleft()
            if value:
                self.pending.clear()
                return step
        return None


def _int_at_least(arg: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ConfigurationError(f"Expected {arg} to be {kind} but got {value!r}")
    return int(value)
