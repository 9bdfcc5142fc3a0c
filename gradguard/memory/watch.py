"""When a growth is a leak: the window test, a confirmation window, two censuses (GG301's decision).

A window whose trend grows makes a *suspicion*: the first census is taken, and the CUDA
allocator's history is recorded. After the confirmation window the growth must still be
there, the trend must hold again, and the census must not show only bounded containers
filling up. A rejected suspicion is looked at again later, twice as late each time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from gradguard.introspect.naming import Namer
from gradguard.memory.census import Census, Growth, take_census
from gradguard.memory.cuda import cuda_allocation_sites, start_cuda_history, stop_cuda_history
from gradguard.memory.owners import explain, fill_steps
from gradguard.memory.series import Recorder, rise
from gradguard.memory.trend import Trend, growing, theil_sen

HOST = ("heap", "rss")


class Suspicion:
    """A growth seen in a window, waiting for the confirmation window and the second census."""

    __slots__ = ("census", "cuda_history", "long", "samples", "signal", "step", "trend")

    def __init__(self, trend: Trend, step: int, census: Census | None, long: bool) -> None:
        self.trend, self.signal, self.step, self.census, self.long = trend, trend.signal, step, census, long
        self.samples = 0
        self.cuda_history = False


@dataclasses.dataclass
class Confirmed:
    """A growth confirmed as a leak, with what explains it."""

    trend: Trend
    growths: list[Growth]
    sites: list[dict[str, Any]]
    census_steps: list[int]

    @property
    def signals(self) -> tuple[str, ...]:
        """The signals this finding speaks for (either host counter speaks for both)."""
        return HOST if self.trend.signal in HOST else (self.trend.signal,)


class GrowthWatch:
    """The state of the decision: at most one suspicion at a time, and the back-off of each signal."""

    def __init__(
        self, window: int, confirm: int, min_rate: float, min_growth: float, census: bool, cuda_history: bool
    ) -> None:
        self.window, self.confirm = window, confirm
        self.min_rate, self.min_growth = min_rate, min_growth
        self.use_census, self.use_cuda_history = census, cuda_history
        self.suspicion: Suspicion | None = None
        self._backoff: dict[str, int] = {}

    def close(self) -> None:
        if self.suspicion is not None and self.suspicion.cuda_history:
            stop_cuda_history()
        self.suspicion = None

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
        for signal, window in rec.windows.items():
            if signal in flagged or len(window) < self.window or rec.seen < rec.next_check[signal]:
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
                census = take_census(x) if self.use_census else None
                self.suspicion = Suspicion(trend, x, census, long)
                if signal.startswith("cuda") and self.use_cuda_history:
                    self.suspicion.cuda_history = start_cuda_history()
                return None
        return None

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
        points = rec.history[signal] if suspicion.long else rec.windows[signal]
        after = [p for p in points if p[0] >= suspicion.step]
        still, _ = theil_sen([p[0] for p in after], [p[1] for p in after])
        if still < 0.5 * suspicion.trend.slope:
            self._reject(rec, signal)  # it flattened out: a cache that filled, an allocator warming up
            return None
        window = list(points) if suspicion.long else list(points)[-self.window :]
        trend = self.growing(window, signal, long=suspicion.long)
        if trend is None:
            self._reject(rec, signal)
            return None
        growths: list[Growth] = []
        if suspicion.census is not None:
            growths = explain(suspicion.census, x, namer())
        if growths:
            fill = fill_steps(growths, headroom(signal))
            if fill is not None:
                self._reject(rec, signal, wait=fill)
                return None
        census_steps = [suspicion.census.step, x] if suspicion.census is not None else []
        return Confirmed(trend, growths, sites, census_steps)
