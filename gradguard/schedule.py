"""Which handlers receive each event: the per-step budget of the detectors.

Most checks need not run at every step once the run has warmed up: a mistake that persists
is found a few steps later all the same. Each detector declares ``every`` and ``duty``:
after the warm-up it receives the per-step events (forward, backward, optimizer steps, the
end of a step) for ``duty`` consecutive steps out of every ``every``, staggered so that the
steps share the load. A detector may also stop listening to an event while it has nothing
to do with it (no alias to watch, no evaluation loop), and listen again when it does.

The guard asks for the table of the step in progress once per step; the tables of a whole
cycle are built in advance, and again only when a detector comes, goes or changes what it
listens to, so choosing costs nothing per event.

Example:
    >>> from gradguard.detector import Detector, on
    >>> from gradguard.events import StepEnd
    >>> class Sometimes(Detector):
    ...     every, duty = 4, 1
    ...     consumes = (StepEnd,)
    ...     @on(StepEnd)
    ...     def _end(self, event):
    ...         return None
    >>> schedule = Schedule(Budget(warmup=2))
    >>> det = Sometimes()
    >>> schedule.add(det)
    >>> [StepEnd in schedule.table(step) for step in range(1, 9)]
    [True, True, False, True, False, False, False, True]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gradguard.events import (
    BackwardPost,
    BackwardPre,
    Event,
    ForwardPost,
    ForwardPre,
    IterationEnd,
    StepEnd,
    StepPost,
    StepPre,
)
from gradguard.sampling import Budget

if TYPE_CHECKING:
    from gradguard.detector import Detector

#: The events that belong to one training step: delivered only on a detector's duty steps.
PER_STEP: frozenset[type[Event]] = frozenset(
    {ForwardPre, ForwardPost, BackwardPre, BackwardPost, StepPre, StepPost, StepEnd, IterationEnd}
)

Handler = tuple["Detector", Callable[[Any], Any]]
Table = dict[type[Event], tuple[Handler, ...]]


class Schedule:
    """The handler tables of the attached detectors, step by step."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._detectors: list[Detector] = []
        self._muted: dict[int, set[type[Event]]] = {}
        self._cycle = 1
        self._tables: list[Table] = [{}]
        self._always: Table = {}
        #: called whenever the tables change (the guard takes the table of the step in progress)
        self.on_change: Callable[[], None] | None = None

    def add(self, detector: Detector) -> None:
        self._detectors.append(detector)
        self._rebuild()

    def remove(self, detector: Detector) -> None:
        self._detectors = [d for d in self._detectors if d is not detector]
        self._muted.pop(id(detector), None)
        self._rebuild()

    def listen(self, detector: Detector, event: type[Event], on: bool) -> None:
        """Start or stop delivering ``event`` to ``detector`` (one of the events it consumes)."""
        muted = self._muted.setdefault(id(detector), set())
        if (event not in muted) == on:
            return
        if on:
            muted.discard(event)
        else:
            muted.add(event)
        self._rebuild()

    def consumed(self) -> set[type[Event]]:
        """Every event some detector consumes (whether or not it listens right now)."""
        return {event for det in self._detectors for event in type(det).consumes}

    def table(self, step: int) -> Table:
        """The handlers of each event during step ``step`` (counted from 1)."""
        if step <= self.budget.warmup or self.budget.per_group is None:
            return self._always
        return self._tables[step % self._cycle]

    def _rebuild(self) -> None:
        everys = [max(1, type(d).every) for d in self._detectors] or [1]
        cycle = 1
        for every in everys:
            cycle = cycle * every // math.gcd(cycle, every)
        self._cycle = cycle
        self._always = self._build(None)
        self._tables = [self._build(phase) for phase in range(cycle)]
        if self.on_change is not None:
            self.on_change()

    def _build(self, phase: int | None) -> Table:
        table: dict[type[Event], list[Handler]] = {}
        for index, det in enumerate(self._detectors):
            cls = type(det)
            every, duty = max(1, cls.every), max(1, cls.duty)
            on_duty = phase is None or (phase + index) % every < duty
            muted = self._muted.get(id(det), ())
            for event, attr in cls.handlers().items():
                if event in muted or (event in PER_STEP and not on_duty):
                    continue
                table.setdefault(event, []).append((det, getattr(det, attr)))
        return {event: tuple(handlers) for event, handlers in table.items()}
