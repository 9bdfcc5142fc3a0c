"""When a growth is a leak: the window test, a confirmation window, two censuses (GG301's decision).

A window whose trend grows makes a *suspicion*: the first census is taken, and the CUDA
allocator's history is recorded. After the confirmation window the growth must still be
there, the trend must hold again, and the census must not show only bounded containers
filling up. A rejected suspicion is looked at again later, twice as late each time.

A confirmed growth is *explained* when the census finds what grows (tensors, or containers
gaining entries) and it accounts for a quarter of the rate or more. One that nothing
explains is most often the allocator keeping what the program freed (a heap that fragments
and settles, RSS that malloc does not give back): it is *noted*, the detector reports it
as info, and the counter stays watched. Only if it keeps growing over a much longer
window (:meth:`GrowthWatch.persists`) does it become a warning; a later suspicion on the
same counter that the census does explain is reported on its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from gradguard.findings import Finding
from gradguard.introspect.naming import Namer
from gradguard.memory.census import Census, Growth, take_census
from gradguard.memory.containers import untracked
from gradguard.memory.cuda import cuda_allocation_sites, start_cuda_history, stop_cuda_history
from gradguard.memory.owners import explain, fill_steps
from gradguard.memory.series import Recorder, rise
from gradguard.memory.trend import Trend, growing, theil_sen

HOST = ("heap", "rss")


class Suspicion:
    """A growth seen in a window, waiting for the confirmation window and the second census."""

    __slots__ = ("census", "cuda_history", "long", "persisted", "samples", "signal", "step", "trend")

    def __init__(self, trend: Trend, step: int, census: Census | None, long: bool, *, persisted: bool = False) -> None:
        self.trend, self.signal, self.step, self.census, self.long = trend, trend.signal, step, census, long
        self.persisted = persisted  # a noted growth that kept growing: only the census is left to ask
        self.samples = 0
        self.cuda_history = False


@dataclasses.dataclass
class Noted:
    """A growth nothing explained, reported as info: from which step, found when, at what rate."""

    start: float
    found: int
    rate: float
    next_check: int


@dataclasses.dataclass
class Confirmed:
    """A growth confirmed, with what explains it (``explained``: the census found what grows)."""

    trend: Trend
    growths: list[Growth]
    sites: list[dict[str, Any]]
    census_steps: list[int]
    explained: bool = True
    persisted: bool = False  # a growth noted earlier that kept growing, still unexplained

    @property
    def signals(self) -> tuple[str, ...]:
        """The signals this finding speaks for (either host counter speaks for both)."""
        return HOST if self.trend.signal in HOST else (self.trend.signal,)


@dataclasses.dataclass
class Emitted:
    """A finding the detector published: as published (``first``, what a revision names), as it
    stands now (``current``), and the growth it reports."""

    first: Finding
    current: Finding
    signal: str
    step: int
    rate: float
    start: float
    explained: bool


class GrowthWatch:
    """The state of the decision: at most one suspicion at a time, and the back-off of each signal."""

    def __init__(
        self, window: int, confirm: int, min_rate: float, min_growth: float, census: bool, cuda_history: bool
    ) -> None:
        self.window, self.confirm = window, confirm
        self.min_rate, self.min_growth = min_rate, min_growth
        self.use_census, self.use_cuda_history = census, cuda_history
        self.suspicion: Suspicion | None = None
        #: signals with a growth that nothing explained: still suspected, for an explanation
        self.noted: set[str] = set()
        self._pending: dict[str, Noted] = {}  # by the signal the growth was found on
        self._backoff: dict[str, int] = {}

    def close(self) -> None:
        """End the series: no suspicion, nothing noted (a new series starts from nothing)."""
        if self.suspicion is not None and self.suspicion.cuda_history:
            stop_cuda_history()
        self.suspicion = None
        self.noted.clear()
        self._pending.clear()

    def step(
        self,
        x: int,
        rec: Recorder,
        flagged: list[str],
        namer: Callable[[], Namer],
        headroom: Callable[[str], tuple[int, int] | None],
    ) -> Confirmed | None:
        """After a sample at ``x``: a new suspicion, or a confirmed growth at the end of a confirmation."""
        suspicion = self.suspicion
        if suspicion is not None:
            suspicion.samples += 1
            long_len = len(rec.history[suspicion.signal]) // 4 if suspicion.long else 0
            if suspicion.samples < max(self.confirm, long_len):
                return None
            self.suspicion = None
            return self._confirm(suspicion, x, rec, namer, headroom)
        if self._recheck(x, rec, namer):
            return None
        for signal, window in rec.windows.items():
            if signal in flagged and signal not in self.noted:
                continue  # a warning speaks for it
            if len(window) < self.window or rec.seen < rec.next_check[signal]:
                continue
            rec.next_check[signal] = rec.seen + 2  # every other sample will do
            recent = list(window)[-self.window :]
            if rise(recent) < 0.5 * self.min_growth:
                continue  # not even the ends differ enough: skip the full test
            trend = self.growing(recent, signal, long=False)
            history = rec.history[signal]
            long = trend is None and len(history) >= 4 * self.window and rec.seen % self.window == 0
            if long:  # a slow leak, below the window's rate: the whole run since warm-up
                trend = self.growing(list(history), signal, long=True)
            if trend is not None:
                census = take_census(x, roots=untracked(namer())) if self.use_census else None
                self.suspicion = Suspicion(trend, x, census, long)
                if signal.startswith("cuda") and self.use_cuda_history:
                    self.suspicion.cuda_history = start_cuda_history()
                return None
        return None

    def _recheck(self, x: int, rec: Recorder, namer: Callable[[], Namer]) -> bool:
        """A noted growth that kept growing over a much longer window: ask the census once more."""
        for signal, noted in self._pending.items():
            if x < noted.next_check:
                continue
            noted.next_check = x + max(1, self.window // 2)
            trend = self.persists(x, rec, signal, noted.start, noted.found, noted.rate)
            if trend is not None:
                census = take_census(x, roots=untracked(namer())) if self.use_census else None
                self.suspicion = Suspicion(trend, x, census, long=False, persisted=True)
                return True
        return False

    def growing(self, points: list[tuple[int, int]], signal: str, *, long: bool) -> Trend | None:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if long:
            return growing(xs, ys, min_rate=1.0, min_growth=8 * self.min_growth, signal=signal)
        return growing(xs, ys, min_rate=self.min_rate, min_growth=self.min_growth, signal=signal)

    def _reject(self, rec: Recorder, signal: str, wait: int = 0) -> None:
        """Look again later, twice as late each time (the deeper look is not free)."""
        backoff = self._backoff.get(signal, self.window)
        for other in HOST if signal in HOST else (signal,):
            rec.next_check[other] = rec.seen + max(backoff, wait)
        self._backoff[signal] = min(backoff * 2, 64 * self.window)

    def _confirm(
        self,
        suspicion: Suspicion,
        x: int,
        rec: Recorder,
        namer: Callable[[], Namer],
        headroom: Callable[[str], tuple[int, int] | None],
    ) -> Confirmed | None:
        signal = suspicion.signal
        sites: list[dict[str, Any]] = []
        if suspicion.cuda_history:
            sites = cuda_allocation_sites()
            stop_cuda_history()
            suspicion.cuda_history = False
        if suspicion.persisted:
            trend = suspicion.trend  # it held over the longer window already
        else:
            points = rec.history[signal] if suspicion.long else rec.windows[signal]
            after = [p for p in points if p[0] >= suspicion.step]
            still, _ = theil_sen([p[0] for p in after], [p[1] for p in after])
            if still < 0.5 * suspicion.trend.slope:
                self._reject(rec, signal)  # it flattened out: a cache that filled, an allocator warming up
                return None
            window = list(points) if suspicion.long else list(points)[-self.window :]
            found_trend = self.growing(window, signal, long=suspicion.long)
            if found_trend is None:
                self._reject(rec, signal)
                return None
            trend = found_trend
        growths: list[Growth] = []
        census_steps: list[int] = []
        if suspicion.census is not None:
            census_steps = [suspicion.census.step, x]
            found = explain(suspicion.census, x, namer())
            suspicion.census = None
            growths = found.growths
            if growths or found.filling:
                fill = fill_steps(growths + found.filling, headroom(signal), trend.slope)
                if fill is not None:
                    self._reject(rec, signal, wait=min(fill, 64 * self.window))
                    return None
            if found.per_step_bytes < 0.25 * trend.slope:
                growths = []  # what the census found is too small to be the reason
        signals = HOST if signal in HOST else (signal,)
        if growths:
            self.noted.difference_update(signals)  # explained at last: that finding speaks for the counter
            for other in signals:
                self._pending.pop(other, None)
            return Confirmed(trend, growths, sites, census_steps)
        self._reject(rec, signal)  # look again later, for an explanation
        if suspicion.persisted:
            self._pending.pop(signal, None)
            return Confirmed(trend, [], sites, census_steps, explained=False, persisted=True)
        if signal in self.noted:
            return None  # already reported as info: its persistence decides
        self.noted.update(signals)
        first_check = int(max(x + 2 * self.window, trend.start + 4 * self.window))  # when persists() can tell
        self._pending[signal] = Noted(trend.start, x, trend.slope, first_check)
        return Confirmed(trend, [], sites, census_steps, explained=False)

    def persists(self, x: int, rec: Recorder, signal: str, start: float, found: int, rate: float) -> Trend | None:
        """The growth since ``start`` when a growth found at ``found`` (at ``rate`` bytes per step)
        kept growing, over a window much longer than the decision's: four trend windows or
        more in all, two of them or more since it was found, both halves growing at half its
        rate or more, the part since it was found too, and four times the smallest growth.
        An allocator that keeps freed memory settles within that; a leak does not.
        """
        if x - found < 2 * self.window or x - start < 4 * self.window:
            return None
        points = [p for p in rec.history.get(signal, ()) if p[0] >= start]
        if len(points) < 24:
            return None
        trend = growing(
            [p[0] for p in points],
            [p[1] for p in points],
            min_rate=0.5 * rate,
            min_growth=4 * self.min_growth,
            signal=signal,
        )
        if trend is None:
            return None
        after = [p for p in points if p[0] >= found]
        still, _ = theil_sen([p[0] for p in after], [p[1] for p in after])
        return trend if still >= 0.5 * rate else None
