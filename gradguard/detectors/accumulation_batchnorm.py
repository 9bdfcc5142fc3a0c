"""GG601 accumulation-batchnorm."""

from __future__ import annotations

from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from gradguard.detector import Detector, Findings, on
from gradguard.events import AccumulatorWindow
from gradguard.findings import Finding, Severity, format_names
from gradguard.rules import RULES

_HINT = (
    "Expected with accumulation; for small micro-batches prefer GroupNorm or LayerNorm, "
    "SyncBatchNorm across processes, or frozen BatchNorm statistics"
)


class AccumulationBatchNorm(Detector):
    """GG601 accumulation-batchnorm: BatchNorm sees micro-batches, not the accumulated batch.

    **What it detects.** A `gradguard.GradientAccumulator` with `steps > 1` drives a
    model that holds BatchNorm layers (any `_BatchNorm`: `BatchNorm1d/2d/3d`,
    `SyncBatchNorm`, the lazy variants).

    **What it reports.** An info finding, recorded once per model, from the
    `AccumulatorWindow` event the accumulator sends when it is made and at each window
    it applies (so a Guard attached after the accumulator was made records it at the next
    optimizer step). It points at the line that made the accumulator.

    **Why it matters.** Accumulation makes the *gradient* that of the whole window, but
    BatchNorm normalises each forward with the mean and variance of that forward's
    micro-batch, and updates its running statistics once per micro-batch. With small
    micro-batches the statistics are noisy, and training differs from true large-batch
    training in a way no normalisation of the gradient can undo.

    **How to fix it.** Often nothing: with micro-batches of a few dozen samples it is harmless.
    For small micro-batches, use GroupNorm or LayerNorm, SyncBatchNorm across processes (the
    statistics span every process's micro-batch), or freeze the BatchNorm statistics of a
    pretrained model (put those layers in `eval()` mode).

    **Example.**

    ```python
    acc = gradguard.GradientAccumulator(opt, steps=16, model=resnet, micro_batch_size=8)
    # train.py:31: GG601 accumulation-batchnorm [info] bn1, layer1.0.bn1, layer1.0.bn2
    # and 50 more: BatchNorm normalises with, and tracks, statistics of each
    # micro-batch (8 samples), not of the accumulated batch of 16 micro-batches
    ```
    """

    code = "GG601"
    name = "accumulation-batchnorm"
    severity = Severity.INFO
    hint = _HINT
    consumes = (AccumulatorWindow,)
    state_fields = ()

    def setup(self) -> None:
        self._seen: set[int] = set()

    @on(AccumulatorWindow)
    def _window(self, event: AccumulatorWindow) -> Findings:
        if event.model is None or id(event.model) in self._seen:
            return None
        self._seen.add(id(event.model))
        return [
            f if self._run is None else self.finding(f.message, where=f.where, location=f.location, data=dict(f.data))
            for f in self.check(event)
        ]

    @classmethod
    def check(cls, event: AccumulatorWindow) -> list[Finding]:
        """The finding for an accumulator, at step 0: ``[]`` without accumulation or BatchNorm."""
        model, steps = event.model, event.steps
        if model is None or steps == 1:
            return []
        root = getattr(model, "_orig_mod", model)
        if isinstance(root, DistributedDataParallel):
            root = root.module
        names = [name or type(m).__name__ for name, m in root.named_modules() if isinstance(m, _BatchNorm)]
        if not names:
            return []
        size = f"{event.micro_batch_size} samples" if event.micro_batch_size is not None else "one micro-batch"
        message = (
            f"BatchNorm normalises with, and tracks, statistics of each micro-batch ({size}), not of the "
            f"accumulated batch of {steps} micro-batches, in {len(names)} module(s): {format_names(names)}"
        )
        data = {
            "modules": names[:100],
            "num_modules": len(names),
            "steps": steps,
            "micro_batch_size": event.micro_batch_size,
        }
        return [
            Finding(
                cls.code,
                RULES[cls.code],
                cls.severity,
                message,
                hint=_HINT,
                location=event.created_at,
                where=format_names(names),
                data=data,
            )
        ]
