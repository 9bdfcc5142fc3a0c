"""Test helpers: check that a training loop's gradient accumulation equals one step on the full batch.

:func:`assert_accumulation_matches_full_batch` runs your accumulation code on a window of
micro-batches and compares the gradients it accumulated with those of the full batch; on
a mismatch it raises an ``AssertionError`` that names the parameters that differ, by how
much, and the likely cause. :func:`compare_accumulation` does the same and returns the
comparison (an :class:`AccumulationComparison`) instead of raising.

Usage, in a test:

.. code-block:: python

    from gradguard.testing import assert_accumulation_matches_full_batch

    def loss_fn(model, batch):                    # the mean loss over one micro-batch
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    def my_accumulation(model, micro_batches):    # the loop under test, without the step
        for batch in micro_batches:
            (loss_fn(model, batch) / len(micro_batches)).backward()

    def test_accumulation_equals_full_batch():
        model = make_model()
        micro_batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
        assert_accumulation_matches_full_batch(model, loss_fn, micro_batches, my_accumulation)

**What "the full batch" is.** The reference is the gradient of the mean loss over every
sample of the window (every item, with ``num_items``): ``Σ n_i ∇L_i / Σ n_i``, where
``L_i = loss_fn(model, micro_batch_i)`` is the mean over the ``n_i`` samples (or items) of
micro-batch ``i``. That is the gradient of ``loss_fn`` on the concatenated batch. It is
computed on a deep copy of the model, micro-batch by micro-batch, with the window
arithmetic of :class:`~gradguard.GradientAccumulator` (:class:`gradguard.accumulate.Window`),
so sequences of different lengths need no padding to a common length, dropout draws the
same masks in the reference as in your code (the random generators are replayed), and
memory stays that of one micro-batch. BatchNorm normalises per micro-batch in both (see
``GG601``): the check is about the weighting of the micro-batches, which is where
accumulation loops go wrong.

**Your model is left as it was.** Your accumulation code runs on your model itself (so it
may use your optimizer's ``zero_grad()``): its gradients are set aside before and put back
after (the same tensors), and its buffers (BatchNorm statistics) and train/eval modes are
restored. Its parameters must not change: code that steps the optimizer is an error (the
parameters are put back, the optimizer's state is not). The random generators advance as
your code makes them. Everything else is compared on copies; on a mismatch, a second copy
computes each micro-batch's gradient to find the weights your code gave them. Values come
back to the host once per comparison (twice on a mismatch).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from gradguard.accumulate.window import Window, rescale_grads_
from gradguard.errors import ConfigurationError

__all__ = [
    "AccumulationComparison",
    "ParameterDiff",
    "assert_accumulation_matches_full_batch",
    "compare_accumulation",
]

#: ``loss_fn(model, micro_batch)``: the micro-batch's loss, a scalar that is a *mean* over its items.
LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]
#: ``accumulate(model, micro_batches)``: the code under test; forward, scaled loss and backward per micro-batch.
AccumulateFn = Callable[[torch.nn.Module, list[Any]], object]
#: A count per micro-batch, or a function that counts the items of a micro-batch.
NumItems = Sequence[Any] | Callable[[Any], Any]

_SHOWN = 10  # mismatched parameters listed by name
_CLOSE = 1e-2  # relative closeness of a factor or a weight to a known mistake
_EXPLAINED = 1e-3  # relative residual under which a factor or weights explain the gradient


@dataclasses.dataclass(frozen=True)
class ParameterDiff:
    """How one parameter's accumulated gradient differs from the full batch's.

    ``max_rel_diff`` is ``max_abs_diff`` over the largest entry of the full batch's gradient
    of that parameter (so near-zero entries need no tolerance of their own).
    """

    name: str
    max_abs_diff: float
    max_rel_diff: float
    matches: bool
    note: str = ""

    def __str__(self) -> str:
        note = f" ({self.note})" if self.note else ""
        return f"{self.name}: max abs diff {self.max_abs_diff:.3g}, max rel diff {self.max_rel_diff:.3g}{note}"


@dataclasses.dataclass(frozen=True)
class AccumulationComparison:
    """The result of :func:`compare_accumulation`: the verdict and its evidence.

    Attributes:
        matches: whether every parameter's accumulated gradient is within tolerance of
            the full batch's: ``max|acc - ref| <= atol + rtol * max|ref|`` per parameter.
        parameters: one :class:`ParameterDiff` per parameter that has a gradient in either.
        expected_weights: the weight of each micro-batch in the full batch, ``n_i / Σ n``.
        weights: on a mismatch, the weights your code gave the micro-batches (fitted to the
            micro-batches' own gradients), when they explain its gradient; else ``None``.
        factor: on a mismatch, ``c`` when the accumulated gradient is ``c`` times the full
            batch's; else ``None``.
        cause: the likely cause of a mismatch, in words (``""`` when it matches).
        rtol: the relative tolerance used.
        atol: the absolute tolerance used.
    """

    matches: bool
    parameters: tuple[ParameterDiff, ...]
    expected_weights: tuple[float, ...]
    weights: tuple[float, ...] | None = None
    factor: float | None = None
    cause: str = ""
    rtol: float = 1e-4
    atol: float = 1e-8

    @property
    def mismatched(self) -> tuple[ParameterDiff, ...]:
        """The parameters whose gradients differ beyond tolerance."""
        return tuple(p for p in self.parameters if not p.matches)

    @property
    def max_abs_diff(self) -> float:
        """The largest absolute difference over all parameters."""
        return max((p.max_abs_diff for p in self.parameters), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        """The largest relative difference over all parameters."""
        return max((p.max_rel_diff for p in self.parameters), default=0.0)

    def __str__(self) -> str:
        n = len(self.parameters)
        if self.matches:
            return (
                f"accumulated gradients match the full batch in {n} parameter(s) "
                f"(max abs diff {self.max_abs_diff:.3g}, max rel diff {self.max_rel_diff:.3g})"
            )
        bad = self.mismatched
        lines = [
            f"accumulated gradients differ from the full batch in {len(bad)} of {n} parameter(s) "
            f"(rtol={self.rtol:g}, atol={self.atol:g})"
        ]
        if self.cause:
            lines.append(f"likely cause: {self.cause}")
        if self.weights is not None:
            weights, expected = _numbers(self.weights), _numbers(self.expected_weights)
            lines.append(f"micro-batch weights: accumulated {weights}, full batch {expected}")
        lines.extend(f"  {p}" for p in bad[:_SHOWN])
        if len(bad) > _SHOWN:
            lines.append(f"  and {len(bad) - _SHOWN} more")
        return "\n".join(lines)


def compare_accumulation(
    model: torch.nn.Module,
    loss_fn: LossFn,
    micro_batches: Iterable[Any],
    accumulate: AccumulateFn,
    *,
    num_items: NumItems | None = None,
    steps: int | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-8,
) -> AccumulationComparison:
    """Compare the gradients that ``accumulate`` leaves on ``model`` with those of the full batch.

    Args:
        model: the model, with the gradients it has now (they are put back afterwards).
        loss_fn: ``loss_fn(model, micro_batch)`` returns the micro-batch's loss, a scalar
            that is the *mean* over its samples (or its items, with ``num_items``).
        micro_batches: the micro-batches of one optimizer step (one window).
        accumulate: the code under test, ``accumulate(model, micro_batches)``: for each
            micro-batch, forward, scaled loss, ``backward()``; no ``optimizer.step()``.
        num_items: what the full batch averages over: ``None`` for samples (each
            micro-batch's first dimension), or a count per micro-batch (tokens, items), or
            a function that counts a micro-batch's items.
        steps: the micro-batches per optimizer step the loop is set up for; more than
            ``len(micro_batches)`` makes them the last, partial window. Default: all of them.
        rtol: the tolerance relative to each parameter's largest full-batch gradient entry.
        atol: the absolute tolerance.

    Returns:
        An :class:`AccumulationComparison`; ``str()`` of it is a readable report.

    Example:
        >>> import torch
        >>> from gradguard.testing import compare_accumulation
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> batches = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 16, 4)]
        >>> def loss_fn(model, batch):
        ...     return torch.nn.functional.mse_loss(model(batch[0]), batch[1])
        >>> def averaged(model, micro_batches):
        ...     for batch in micro_batches:
        ...         (loss_fn(model, batch) / len(micro_batches)).backward()
        >>> compare_accumulation(model, loss_fn, batches, averaged).matches
        True
        >>> def summed(model, micro_batches):             # forgets to divide
        ...     for batch in micro_batches:
        ...         loss_fn(model, batch).backward()
        >>> result = compare_accumulation(model, loss_fn, batches, summed)
        >>> result.matches, round(result.factor, 2)
        (False, 4.0)
        >>> print(result.cause)
        accumulated gradients are 4.00x the full batch: divide each micro-batch loss by the number of micro-batches (4)
        >>> model.weight.grad is None                     # the model is left as it was
        True
    """
    if not isinstance(model, torch.nn.Module):
        raise ConfigurationError(f"Expected model to be a torch.nn.Module but got {type(model).__name__}")
    if not callable(loss_fn):
        raise ConfigurationError(f"Expected loss_fn to be callable as loss_fn(model, batch) but got {loss_fn!r}")
    if not callable(accumulate):
        raise ConfigurationError(
            f"Expected accumulate to be callable as accumulate(model, micro_batches) but got {accumulate!r}"
        )
    if isinstance(micro_batches, (str, bytes, torch.Tensor)) or not isinstance(micro_batches, Iterable):
        raise ConfigurationError(
            f"Expected micro_batches to be a list of micro-batches but got {type(micro_batches).__name__}"
        )
    batches = list(micro_batches)
    if not batches:
        raise ConfigurationError("Expected micro_batches to hold at least one micro-batch but got none")
    k = len(batches)
    if steps is None:
        steps = k
    elif isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < k:
        raise ConfigurationError(
            f"Expected steps to be an integer >= len(micro_batches) = {k} (the micro-batches of one "
            f"optimizer step) but got {steps!r}"
        )
    rtol = _tolerance("rtol", rtol)
    atol = _tolerance("atol", atol)
    counts = _counts(num_items, batches)
    total = sum(counts)
    expected = tuple(n / total for n in counts)

    named: list[tuple[str, torch.Tensor]] = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    try:
        reference_model = copy.deepcopy(model)
    except Exception as exc:
        raise ConfigurationError(
            f"Expected a model that copy.deepcopy can copy but got {type(model).__name__}, which fails with {exc!r}"
        ) from exc
    ref_by_name = dict(reference_model.named_parameters())
    ref_params: list[torch.Tensor] = [ref_by_name[name] for name, _ in named]
    for ref_param in reference_model.parameters():
        ref_param.grad = None
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    rng = _rng_state(devices)

    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        reference = _reference(reference_model, ref_params, loss_fn, batches, counts)

    saved = _Saved(model)
    try:
        for param in model.parameters():
            param.grad = None
        accumulate(model, batches)
        accumulated = [None if p.grad is None else p.grad.detach() for p in params]
        stats = _stats(params, ref_params, reference, accumulated)
        changed = [name for (name, _), s in zip(named, stats, strict=True) if s[0]]
        if changed:
            with torch.no_grad():
                for p, ref_p in zip(params, ref_params, strict=True):
                    p.copy_(ref_p)
    finally:
        saved.restore()
    if changed:
        raise ConfigurationError(
            f"Expected accumulate to leave the parameters unchanged (accumulate gradients, no optimizer.step()) "
            f"but it changed {', '.join(changed[:_SHOWN])}; the parameters were put back, an optimizer's state was not"
        )

    diffs = _diffs(named, reference, accumulated, stats, rtol, atol)
    if all(d.matches for d in diffs):
        return AccumulationComparison(True, diffs, expected, rtol=rtol, atol=atol)

    factor = _factor(stats)
    weights = None
    if any(g is not None for g in accumulated):
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            _set_rng_state(rng, devices)
            weights = _fit_weights(model, named, loss_fn, batches, accumulated)
    cause = _cause(diffs, factor, weights, expected, counts, steps, per_item=num_items is not None)
    return AccumulationComparison(False, diffs, expected, weights, factor, cause, rtol, atol)


def assert_accumulation_matches_full_batch(
    model: torch.nn.Module,
    loss_fn: LossFn,
    micro_batches: Iterable[Any],
    accumulate: AccumulateFn,
    *,
    num_items: NumItems | None = None,
    steps: int | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-8,
) -> AccumulationComparison:
    """Assert that ``accumulate`` accumulates the full batch's gradient; raise ``AssertionError`` if not.

    Takes the arguments of :func:`compare_accumulation` and returns its result when the
    gradients match. The error's message names the parameters that differ, their largest
    absolute and relative differences, the weights the code gave the micro-batches against
    the full batch's, and the likely cause, for example ``accumulated gradients are 4.00x
    the full batch: divide each micro-batch loss by the number of micro-batches (4)``.

    Example:
        >>> import torch
        >>> from gradguard.testing import assert_accumulation_matches_full_batch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1)
        >>> tokens = [torch.randn(n, 3) for n in (2, 6)]          # two micro-batches of 2 and 6 items
        >>> def loss_fn(model, batch):
        ...     return model(batch).pow(2).mean()
        >>> def equal_weights(model, micro_batches):
        ...     for batch in micro_batches:
        ...         (loss_fn(model, batch) / 2).backward()
        >>> assert_accumulation_matches_full_batch(model, loss_fn, tokens, equal_weights,
        ...                                        num_items=[2, 6])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        AssertionError: accumulated gradients differ from the full batch in 2 of 2 parameter(s) (rtol=0.0001, ...)
        likely cause: micro-batches are weighted equally (0.5 each) though their item counts differ (2, 6): ...
        ...
    """
    __tracebackhide__ = True
    result = compare_accumulation(
        model, loss_fn, micro_batches, accumulate, num_items=num_items, steps=steps, rtol=rtol, atol=atol
    )
    if not result.matches:
        raise AssertionError(str(result))
    return result


# --------------------------------------------------------------------------- inputs
def _tolerance(arg: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ConfigurationError(f"Expected {arg} to be a non-negative finite number but got {value!r}")
    return float(value)


def _counts(num_items: NumItems | None, batches: list[Any]) -> list[float]:
    """The number of items each micro-batch's loss averages over."""
    if num_items is None:
        counts: list[Any] = []
        for i, batch in enumerate(batches):
            size = _batch_size(batch)
            if size is None:
                raise ConfigurationError(
                    f"Expected each micro-batch to be a tensor, or a tuple, list or dict holding one, whose first "
                    f"dimension counts its samples, but micro-batch {i} is a {type(batch).__name__}: pass num_items"
                )
            counts.append(size)
    elif callable(num_items):
        counts = [num_items(batch) for batch in batches]
    elif isinstance(num_items, Sequence) and not isinstance(num_items, str):
        counts = list(num_items)
        if len(counts) != len(batches):
            raise ConfigurationError(
                f"Expected num_items to hold one count per micro-batch ({len(batches)}) but got {len(counts)}"
            )
    else:
        raise ConfigurationError(
            f"Expected num_items to be None, a count per micro-batch or a function of a micro-batch but got "
            f"{type(num_items).__name__}"
        )
    out: list[float] = []
    for i, n in enumerate(counts):
        value = n.item() if isinstance(n, torch.Tensor) and n.numel() == 1 else n
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ConfigurationError(
                f"Expected num_items to count the items of each micro-batch (a non-negative number) but got "
                f"{n!r} for micro-batch {i}"
            )
        out.append(float(value))
    if sum(out) <= 0:
        raise ConfigurationError(f"Expected num_items to count at least one item in all but got {out}")
    return out


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    values: Iterable[Any] = ()
    if isinstance(batch, Mapping):
        values = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    for value in values:
        size = _batch_size(value)
        if size is not None:
            return size
    return None


# --------------------------------------------------------------------------- the gradients
def _loss(loss_fn: LossFn, model: torch.nn.Module, batch: Any, i: int) -> torch.Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        kind = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ConfigurationError(f"Expected loss_fn to return a scalar tensor but got {kind} for micro-batch {i}")
    if not loss.requires_grad:
        raise ConfigurationError(
            f"Expected loss_fn's loss to require grad but it does not for micro-batch {i}: is it detached?"
        )
    return loss.reshape(())


def _reference(
    model: torch.nn.Module, params: list[torch.Tensor], loss_fn: LossFn, batches: list[Any], counts: list[float]
) -> list[torch.Tensor | None]:
    """The full batch's gradient, accumulated with the window arithmetic of ``GradientAccumulator``."""
    window = Window(len(batches))
    for i, (batch, n) in enumerate(zip(batches, counts, strict=True)):
        loss = _loss(loss_fn, model, batch, i)
        weight, rescale = window.weights(n, _identity)
        if rescale is not None:
            rescale_grads_([p.grad for p in params if p.grad is not None], rescale)
        (loss * weight).backward()
        window.add(n)
    return [None if p.grad is None else p.grad.detach() for p in params]


def _identity(total: float | torch.Tensor) -> float | torch.Tensor:
    return total


def _wide(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    return t.float() if t.device.type == "mps" else t.double()


#: Per parameter: changed, |acc - ref| max, |ref| max, |acc| max, <acc, ref>, <ref, ref>, <acc, acc>.
_Stats = list[float]


def _stats(
    params: list[torch.Tensor],
    ref_params: list[torch.Tensor],
    reference: list[torch.Tensor | None],
    accumulated: list[torch.Tensor | None],
) -> list[_Stats]:
    rows: list[torch.Tensor] = []
    with torch.no_grad():
        for p, q, ref, acc in zip(params, ref_params, reference, accumulated, strict=True):
            a, b = _wide(p), _wide(q)
            changed = (~((a == b) | (a.isnan() & b.isnan()))).any().to(a.dtype)
            r = _wide(ref) if ref is not None else torch.zeros_like(a)
            g = _wide(acc) if acc is not None else torch.zeros_like(a)
            if a.numel() == 0:
                zero = a.new_zeros(())
                rows.append(torch.stack([changed, zero, zero, zero, zero, zero, zero]).cpu())
                continue
            rows.append(
                torch.stack(
                    [
                        changed,
                        (g - r).abs().max(),
                        r.abs().max(),
                        g.abs().max(),
                        (g * r).sum(),
                        (r * r).sum(),
                        (g * g).sum(),
                    ]
                ).to("cpu", torch.float64, non_blocking=True)
            )
    if not rows:
        return []
    if any(p.device.type == "cuda" for p in params):
        torch.cuda.synchronize()
    return [[float(v) for v in row] for row in torch.stack(rows).tolist()]


def _diffs(
    named: list[tuple[str, torch.Tensor]],
    reference: list[torch.Tensor | None],
    accumulated: list[torch.Tensor | None],
    stats: list[_Stats],
    rtol: float,
    atol: float,
) -> tuple[ParameterDiff, ...]:
    out: list[ParameterDiff] = []
    for (name, _), ref, acc, s in zip(named, reference, accumulated, stats, strict=True):
        if ref is None and acc is None:
            continue
        _, diff, ref_max, _, _, _, _ = s
        rel = diff / ref_max if ref_max > 0 else (0.0 if diff == 0 else math.inf)
        note = ""
        if acc is None:
            note = "accumulate left no gradient"
        elif ref is None:
            note = "the full batch has no gradient here"
        elif not math.isfinite(diff):
            note = "not finite"
        matches = not note and diff <= atol + rtol * ref_max
        out.append(ParameterDiff(name, diff, rel, matches, note))
    return tuple(out)


def _factor(stats: list[_Stats]) -> float | None:
    """``c`` when the accumulated gradient is ``c`` times the reference, else ``None``."""
    gr = sum(s[4] for s in stats)
    rr = sum(s[5] for s in stats)
    gg = sum(s[6] for s in stats)
    if not (rr > 0 and gg > 0 and math.isfinite(gr + rr + gg)):
        return None
    c = gr / rr
    residual = max(gg - 2 * c * gr + c * c * rr, 0.0)
    return c if residual <= _EXPLAINED**2 * gg else None


def _fit_weights(
    model: torch.nn.Module,
    named: list[tuple[str, torch.Tensor]],
    loss_fn: LossFn,
    batches: list[Any],
    accumulated: list[torch.Tensor | None],
) -> tuple[float, ...] | None:
    """The weights ``a`` with ``accumulated ≈ Σ a_i g_i`` (``g_i``: micro-batch ``i``'s gradient), if they fit."""
    copied = copy.deepcopy(model)
    by_name = dict(copied.named_parameters())
    params: list[torch.Tensor] = [by_name[name] for name, _ in named]
    k = len(batches)
    grads: list[list[torch.Tensor | None]] = []
    for i, batch in enumerate(batches):
        for p in copied.parameters():
            p.grad = None
        _loss(loss_fn, copied, batch, i).backward()
        grads.append([None if p.grad is None else p.grad.detach() for p in params])
    del copied
    # One (k+1) x (k+1) Gram matrix of [g_0 .. g_k-1, accumulated] per parameter, summed on the host.
    blocks: list[torch.Tensor] = []
    with torch.no_grad():
        for index, acc in enumerate(accumulated):
            columns = [grads[i][index] for i in range(k)] + [acc]
            present = [c for c in columns if c is not None]
            if not present:
                continue
            like = _wide(present[0]).reshape(-1)
            rows = torch.stack([like.new_zeros(like.shape) if c is None else _wide(c).reshape(-1) for c in columns])
            blocks.append((rows @ rows.T).to("cpu", torch.float64, non_blocking=True))
    if any(p.device.type == "cuda" for p in params):
        torch.cuda.synchronize()
    if not blocks:
        return None
    total = torch.stack(blocks).sum(0)
    gram, b, gg = total[:k, :k], total[:k, k], float(total[k, k])
    if not (gg > 0 and math.isfinite(gg)) or not bool(torch.isfinite(gram).all()):
        return None
    eigen = torch.linalg.eigvalsh(gram)
    if eigen[0] <= 1e-10 * eigen[-1]:  # micro-batch gradients too alike to tell their weights apart
        return None
    a = torch.linalg.solve(gram, b)
    residual = gg - 2 * float(a @ b) + float(a @ gram @ a)
    if residual > _EXPLAINED**2 * gg:
        return None
    return tuple(float(v) for v in a)


# --------------------------------------------------------------------------- the diagnosis
def _cause(
    diffs: tuple[ParameterDiff, ...],
    factor: float | None,
    weights: tuple[float, ...] | None,
    expected: tuple[float, ...],
    counts: list[float],
    steps: int,
    *,
    per_item: bool,
) -> str:
    k = len(expected)
    missing = [d.name for d in diffs if d.note == "accumulate left no gradient"]
    if missing and len(missing) == len(diffs):
        return (
            "accumulate left no gradient on the model: call backward() on each micro-batch's loss, "
            "computed with the model passed to accumulate, and do not reset the gradients at the end"
        )
    causes: list[str] = []
    if missing:
        causes.append(f"accumulate left no gradient on {', '.join(missing[:_SHOWN])}")
    extra = [d.name for d in diffs if d.note == "the full batch has no gradient here"]
    if extra:
        causes.append(f"accumulate gave gradients to {', '.join(extra[:_SHOWN])}, which loss_fn does not reach")
    if factor is not None:
        causes.append(_factor_cause(factor, k, steps))
    elif weights is not None:
        causes.append(_weights_cause(weights, expected, counts, per_item=per_item))
    elif not causes:
        causes.append(
            "the accumulated gradient is not a weighted sum of the micro-batches' gradients: check that "
            "accumulate backpropagates loss_fn's loss of every micro-batch, with the model in the same mode, "
            "and that nothing (clipping, an unscaled GradScaler) changes the gradients afterwards"
        )
    return "; ".join(causes)


def _factor_cause(c: float, k: int, steps: int) -> str:
    head = f"accumulated gradients are {c:.2f}x the full batch"
    if _near(c, 1.0, _EXPLAINED):
        return f"{head}, off by a rounding-sized amount: loosen rtol or atol if that is expected"
    if k < steps and _near(c, k / steps):
        return (
            f"{head}: the last partial window ({k} of {steps} micro-batches) is weighted like a full one: "
            f"divide each micro-batch loss by the number of micro-batches it holds ({k}), not by {steps}"
        )
    if k > 1 and _near(c, k):
        return f"{head}: divide each micro-batch loss by the number of micro-batches ({k})"
    if k > 1 and _near(c, 1.0 / k):
        return (
            f"{head}: the micro-batch losses are divided by the number of micro-batches ({k}) twice "
            "(in the loss and again afterwards?)"
        )
    if _near(c, -1.0):
        return f"{head}: the sign of the loss is flipped"
    return f"{head}: every micro-batch loss is scaled by a wrong constant; scale micro-batch i by n_i / Σn"


def _weights_cause(
    weights: tuple[float, ...], expected: tuple[float, ...], counts: list[float], *, per_item: bool
) -> str:
    scale = max(abs(w) for w in weights)
    silent = [
        str(i) for i, (a, w) in enumerate(zip(weights, expected, strict=True)) if w > 0 and abs(a) <= _CLOSE * scale
    ]
    if silent:
        return (
            f"micro-batch(es) {', '.join(silent)} of {len(weights)} contribute nothing to the accumulated gradient: "
            "is a micro-batch skipped, or zero_grad() called inside the micro-batch loop?"
        )
    equal = max(weights) - min(weights) <= _CLOSE * scale
    if equal and max(expected) - min(expected) > _CLOSE * max(expected):
        what, unit = ("item counts", "items") if per_item else ("sizes", "samples")
        return (
            f"micro-batches are weighted equally ({weights[0]:.3g} each) though their {what} differ "
            f"({', '.join(f'{n:g}' for n in counts)}): weigh each micro-batch's mean loss by its share of the "
            f"{unit}, n_i / Σn (Σn = {sum(counts):g}), as GradientAccumulator(num_items=...) does"
        )
    return "the micro-batches are weighted differently from the full batch (see the weights below)"


def _near(value: float, target: float, tolerance: float = _CLOSE) -> bool:
    return abs(value - target) <= tolerance * abs(target)


def _numbers(values: Sequence[float]) -> str:
    """Numbers for a message; those a billion times smaller than the largest print as 0."""
    scale = max((abs(v) for v in values), default=0.0)
    return "[" + ", ".join("0" if abs(v) <= 1e-9 * scale else f"{v:.3g}" for v in values) + "]"


# --------------------------------------------------------------------------- the user's state
class _Saved:
    """A model's gradients, buffers and train/eval modes, to put back after the code under test."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.grads = [(p, p.grad) for p in model.parameters()]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.modes = [(m, m.training) for m in model.modules()]

    def restore(self) -> None:
        with torch.no_grad():
            for p, grad in self.grads:
                p.grad = grad
            for b, value in self.buffers:
                if b.shape == value.shape:
                    b.copy_(value)
        for m, training in self.modes:
            m.training = training


def _rng_state(devices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor]], devices: list[int]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda, strict=True):
        torch.cuda.set_rng_state(s, d)
