"""A run's memory samples: when to take them, and how they are kept (bounded, whatever the run's length).

Example:
    >>> rec = Recorder(warmup=2, window=8, confirm=3)
    >>> for step in range(1, 6):
    ...     rec.record(step, {"rss": 100 + step})
    >>> rec.padded()["rss"], [v for _, v in rec.windows["rss"]]
    ([101, 102, 103, 104, 105], [103, 104, 105])
"""

from __future__ import annotations

import math
import time
from collections import deque


def ema(mean: float, value: float) -> float:
    """A moving average that one preempted measurement cannot blow up."""
    if not mean:
        return value
    return 0.9 * mean + 0.1 * min(value, 3 * mean)


class Cadence:
    """When to take a memory sample, and which host counters to read with it.

    Steps far shorter than a sample get a stride (every n-th event) that keeps the rest of
    a sample (the CUDA counters, the bookkeeping) under 5% of a step. The host counters cost
    a system call (RSS, from ``/proc``) or a walk of malloc's free lists (the heap,
    ``mallinfo2``, slower on a fragmented heap): they are read at every sample for the first
    ``EVERY_SAMPLE`` samples, then together every m-th sample so that they cost under
    ``BUDGET_S`` per step on average, whatever the step and however fragmented the heap (a
    cost that does not grow with the model), except a counter the detector asks for at every
    sample (``dense``): when its sparse readings already rise, or while a growth is being
    confirmed.
    """

    EVERY_SAMPLE = 32
    BUDGET_S = 30e-6
    COUNTERS = ("rss", "heap")

    def __init__(self) -> None:
        self.stride = 1
        self.every = 1
        self.cost = dict.fromkeys(self.COUNTERS, 0.0)
        self.base_cost = 0.0
        self.dense: set[str] = set()
        self._since = 0
        self._last = 0.0
        self._dt = 0.0
        self._samples = 0

    def due(self, *, force: bool = False) -> bool:
        now = time.perf_counter()
        if self._last:
            self._dt = ema(self._dt, now - self._last)
        self._last = now
        self._since += 1
        if self._since < self.stride and not force:
            return False
        self._since = 0
        return True

    def reads(self, counter: str) -> bool:
        """Whether this sample reads ``counter`` (``"rss"`` or ``"heap"``)."""
        return counter in self.dense or self._samples < self.EVERY_SAMPLE or self._samples % self.every == 0

    def measured(self, total: float, costs: dict[str, float]) -> None:
        """What this sample cost in all, and what each counter read with it cost: adapt the cadence."""
        self._samples += 1
        self.base_cost = ema(self.base_cost, max(total - sum(costs.values()), 0.0))
        for counter, cost in costs.items():
            self.cost[counter] = ema(self.cost[counter], cost)
        if self._dt > 0:
            self.stride = max(1, min(16, int(self.base_cost * 20 / self._dt)))
            self.every = max(1, min(64, math.ceil(sum(self.cost.values()) * self.stride / self.BUDGET_S)))


class Recorder:
    """The samples: a series for the report (halved in density when long), and per signal a
    sliding window and a bounded long view for the trend tests, after the warm-up."""

    SIGNALS = ("heap", "rss", "cuda_allocated")

    def __init__(self, warmup: int, window: int, confirm: int, max_points: int = 2048) -> None:
        self.warmup = warmup
        self.window = window
        self.confirm = confirm
        self.max_points = max_points
        self.peak: dict[str, int] = {}
        self.restart()

    def restart(self) -> None:
        #: Each kept sample's step, seconds since the series started (``time_s``) and values.
        self.series: dict[str, list[int | float | None]] = {"step": [], "time_s": []}
        self._t0 = time.perf_counter()
        self.stride = 1  # the series keeps every n-th sample
        self.seen = 0
        self.windows: dict[str, deque[tuple[int, int]]] = {}
        self.history: dict[str, deque[tuple[int, int]]] = {}
        self.next_check: dict[str, int] = {}

    def drop_windows(self) -> None:
        """Forget the trend windows (the series stays for the report)."""
        self.windows.clear()
        self.history.clear()

    def record(self, x: int, sample: dict[str, int]) -> None:
        for key, value in sample.items():
            if value > self.peak.get(key, 0):
                self.peak[key] = value
        self.seen += 1
        if (self.seen - 1) % self.stride == 0:
            series = self.series
            n = len(series["step"])
            series["step"].append(x)
            series["time_s"].append(round(time.perf_counter() - self._t0, 4))
            for key, value in sample.items():
                if key == "cuda_peak":
                    continue
                column = series.setdefault(key, [])
                column.extend([None] * (n + 1 - len(column)))  # not read at every sample
                column[n] = value
            if len(series["step"]) >= self.max_points:
                for key, column in self.padded().items():
                    series[key] = column[::2]
                self.stride *= 2
        if x <= self.warmup:
            return
        for signal in self.SIGNALS:
            if signal not in sample:
                continue
            value = sample[signal]
            window = self.windows.get(signal)
            if window is None:
                window = self.windows[signal] = deque(maxlen=self.window + 4 * self.confirm)
                self.history[signal] = deque(maxlen=256)
                self.next_check[signal] = 0
            window.append((x, value))
            history = self.history[signal]
            if len(history) == history.maxlen:  # keep the long view bounded: halve its density
                kept = list(history)[::2]
                history.clear()
                history.extend(kept)
            if not history or x - history[-1][0] >= max(1, (x - self.warmup) // 128):
                history.append((x, value))

    def padded(self) -> dict[str, list[int | float | None]]:
        n = len(self.series["step"])
        return {k: list(v) + [None] * (n - len(v)) for k, v in self.series.items()}


def rise(points: list[tuple[int, int]]) -> float:
    """How much the last samples of a window stand above its first ones (medians of four)."""
    head = sorted(v for _, v in points[:4])
    tail = sorted(v for _, v in points[-4:])
    return (tail[1] + tail[2] - head[1] - head[2]) / 2
