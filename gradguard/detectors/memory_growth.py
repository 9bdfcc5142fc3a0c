"""GG301 memory-growth."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch

from gradguard import _memory as mem
from gradguard._frames import user_location
from gradguard.detector import Detector, Findings
from gradguard.errors import ConfigurationError
from gradguard.findings import Finding, Location, Severity

_GRAPH_HINT = (
    "Run evaluation under torch.no_grad() (or torch.inference_mode()), or keep outputs.detach(), "
    "so that kept outputs do not hold their autograd graphs"
)


_HOST = ("heap", "rss")


class _Suspicion:
    """A growth seen in a window, waiting for the confirmation window and the second census."""

    __slots__ = ("census", "cuda_history", "long", "samples", "signal", "step", "trend")

    def __init__(self, trend: mem.Trend, step: int, census: mem.Census | None, long: bool) -> None:
        self.trend = trend
        self.signal = trend.signal
        self.step = step
        self.census = census
        self.long = long
        self.samples = 0
        self.cuda_history = False


class MemoryGrowth(Detector):
    """GG301 memory-growth: memory grows steadily, step after step, until the run runs out.

    **What it detects.** A training or evaluation loop that keeps something alive every
    step: a dict or list that gains a tensor per step, outputs kept together with their
    autograd graphs, a list on a module attribute that is appended to and never cleared.
    gradguard samples memory once per step (the process's resident memory, and the CUDA
    allocator's counters when the program uses CUDA), skips the warm-up steps, and fits a
    robust Theil-Sen trend over a window of samples. Memory that rises and then stays flat
    (a cache or a bounded replay buffer that fills up, batches of varying size, the
    allocator keeping freed blocks) does not count: the window must grow in both halves
    and keep growing through a short confirmation window. Then it looks deeper, once: it
    counts the live tensors by shape, dtype, device and autograd state twice, and names the
    variable or module attribute that holds the group that grows.

    **Why it matters.** The run does not fail at once. It slows down as memory fills and
    dies with an out-of-memory error hours later, far from the line that leaks. The
    finding gives the rate in MiB per step, the growth so far and the step at which the
    device or host will run out at this rate.

    **How to fix it.** Keep only what you need, only as long as you need it: store
    ``loss.item()`` rather than ``loss``, ``out.detach()`` rather than ``out``, evaluate
    under ``torch.no_grad()``, bound the container (``collections.deque(maxlen=...)``) or
    clear it each epoch.

    **Example.**

    .. code-block:: python

        cache = {}
        for step, (x, y) in enumerate(loader):
            out = model(x)
            cache[step] = out.detach()       # GG301: `cache` (dict, train.py:31) gains
            loss = criterion(out, y)         # 1 tensor [1024, 512] float32 (2 MiB) per step
            ...

    **How it knows, at little cost.** One sample per step reads counters only (``psutil``
    and ``torch.cuda.memory_stats``); it never synchronises the GPU. The tensor census
    (``gc.get_objects()`` and ``gc.get_referrers``) runs only after the trend has fired,
    twice. On CUDA, allocation stacks are recorded with
    ``torch.cuda.memory._record_memory_history`` during the confirmation window only.
    Loops without an optimizer (evaluation) are sampled once per root forward instead.

    Args:
        warmup: steps skipped at the start, while the optimizer creates its state and the
            allocators warm up.
        window: samples in the trend window.
        confirm: samples in the confirmation window that follows a suspected growth.
        min_rate_mib: the smallest rate, in MiB per step, reported by the window test.
        min_growth_mib: the smallest growth, in MiB over the window, reported.
        census: whether to count the live tensors to name the culprit.
        cuda_history: whether to record CUDA allocation stacks while confirming a growth.
    """

    code = "GG301"
    name = "memory-growth"
    hint = "Stop keeping a tensor every step: store .item() or .detach() values, bound the container, or clear it"
    events = frozenset({"forward", "step", "close"})
    state_fields = ("flagged", "trends")

    def __init__(
        self,
        *,
        warmup: int = 10,
        window: int = 24,
        confirm: int = 6,
        min_rate_mib: float = 0.25,
        min_growth_mib: float = 8.0,
        census: bool = True,
        cuda_history: bool = True,
    ) -> None:
        super().__init__()
        for arg, value, low in (("warmup", warmup, 0), ("window", window, 8), ("confirm", confirm, 3)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigurationError(f"Expected {arg} to be an int >= {low} but got {value!r}")
        for arg, fvalue in (("min_rate_mib", min_rate_mib), ("min_growth_mib", min_growth_mib)):
            if not isinstance(fvalue, (int, float)) or isinstance(fvalue, bool) or not fvalue > 0:
                raise ConfigurationError(f"Expected {arg} to be a positive number but got {fvalue!r}")
        self.warmup = warmup
        self.window = window
        self.confirm = confirm
        self.min_rate = float(min_rate_mib) * mem.MiB
        self.min_growth = float(min_growth_mib) * mem.MiB
        self.use_census = bool(census)
        self.use_cuda_history = bool(cuda_history)

    # ---------------------------------------------------------------- lifecycle
    def setup(self) -> None:
        self.flagged: list[str] = []
        self.trends: list[dict[str, Any]] = []
        self._sampler = mem.MemorySampler()
        self._clock = "iteration"  # becomes "step" once an optimizer steps
        self._series: dict[str, list[int | None]] = {"step": []}
        self._record_stride = 1  # the series keeps every n-th sample (bounded length)
        self._max_points = 2048
        self._seen = 0
        self._windows: dict[str, deque[tuple[int, int]]] = {}
        self._history: dict[str, deque[tuple[int, int]]] = {}
        self._next_check: dict[str, int] = {}
        self._backoff: dict[str, int] = {}
        self._suspicion: _Suspicion | None = None
        self._emitted: list[tuple[Finding, str, int, float]] = []  # finding, signal, step, rate
        self._growths: list[dict[str, Any]] = []
        self._sites: list[dict[str, Any]] = []
        self._census_steps: list[int] = []
        self._peak: dict[str, int] = {}
        self._headroom: dict[str, list[int]] = {}
        # schedule: sample every `_stride`-th event when steps are far shorter than a sample,
        # and read the heap counter every `_heap_every`-th sample when it costs more than that
        self._stride = 1
        self._heap_every = 1
        self._since_sample = 0
        self._last_event = 0.0
        self._dt = 0.0
        self._cost = 0.0
        self._heap_cost = 0.0
        self._events = 0

    def teardown(self) -> None:
        self._sampler.close()
        if self._suspicion is not None and self._suspicion.cuda_history:
            mem.stop_cuda_history()
        self._suspicion = None
        self._windows.clear()
        self._history.clear()

    # ---------------------------------------------------------------- events
    def on_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Findings:
        if self._clock == "step" or self.guard.step > 0:
            return None
        return self._tick(self.guard.iteration)

    def on_step(self) -> Findings:
        if self._clock != "step":
            if self.flagged:
                return None  # the evaluation series already told its story; keep it whole
            self._restart("step")
        return self._tick(self.guard.step)

    def on_close(self) -> Findings:
        if self._suspicion is not None and self._suspicion.cuda_history:
            mem.stop_cuda_history()
            self._suspicion.cuda_history = False
        for finding, signal, x, rate in self._emitted:
            self._revise(finding, signal, x, rate)
        return None

    def _revise(self, finding: Finding, signal: str, x: int, rate: float) -> None:
        """At the end of the run, tell a cache that filled up from a leak.

        Growth that stopped after the finding (memory flat since) is what a bounded cache
        does while it fills: the finding stays in the report, as info, with the evidence.
        """
        tail = [p for p in self._windows.get(signal, ()) if p[0] > x]
        if len(tail) < max(12, self.window // 2):
            return
        recent = tail[-self.window :]
        slope, _ = mem.theil_sen([p[0] for p in recent], [p[1] for p in recent])
        if slope >= 0.1 * rate:
            return
        unit = "step" if self._clock == "step" else "iteration"
        finding.severity = Severity.INFO
        finding.message += (
            f"; then the growth stopped: memory stayed flat over {unit}s {recent[0][0]}-{recent[-1][0]}, "
            "as a cache that fills up to a bound does"
        )
        finding.hint = "Check that the container is bounded; if it is, this is its filling up, not a leak"
        finding.data["stopped"] = {
            "flat_from": recent[0][0],
            "flat_to": recent[-1][0],
            "rate_mib_per_step": slope / mem.MiB,
        }

    # ---------------------------------------------------------------- sampling
    def _restart(self, clock: str) -> None:
        self._clock = clock
        self._series = {"step": []}
        self._record_stride = 1
        self._seen = 0
        self._windows.clear()
        self._history.clear()
        self._next_check.clear()
        self._suspicion = None

    def _tick(self, x: int) -> Findings:
        now = time.perf_counter()
        if self._last_event:
            self._dt = _ema(self._dt, now - self._last_event)
        self._last_event = now
        self._events += 1
        if self._events % 32 == 0 and self._dt > 0:
            # keep sampling under ~5% of a step: only very short steps get a stride
            self._stride = max(1, min(16, int(self._cost * 20 / self._dt)))
            self._heap_every = max(1, min(64, int(self._heap_cost * 20 / (self._dt * self._stride))))
        self._since_sample += 1
        if self._since_sample < self._stride and self._suspicion is None:
            return None
        self._since_sample = 0
        sample = self._sampler.sample()
        took = time.perf_counter()
        self._cost = _ema(self._cost, took - now)
        if self._sampler.has_heap and self._seen % self._heap_every == 0:
            heap = self._sampler.heap()
            if heap is not None:
                sample["heap"] = heap
            self._heap_cost = _ema(self._heap_cost, time.perf_counter() - took)
        self._record(x, sample)
        if x <= self.warmup:
            return None
        return self._decide(x)

    def _record(self, x: int, sample: dict[str, int]) -> None:
        for key, value in sample.items():
            if value > self._peak.get(key, 0):
                self._peak[key] = value
        self._seen += 1
        if (self._seen - 1) % self._record_stride == 0:
            series = self._series
            n = len(series["step"])
            series["step"].append(x)
            for key, value in sample.items():
                if key == "cuda_peak":
                    continue
                column = series.setdefault(key, [])
                column.extend([None] * (n + 1 - len(column)))  # not read at every sample
                column[n] = value
            if len(series["step"]) >= self._max_points:
                for key, column in self._padded().items():
                    series[key] = column[::2]
                self._record_stride *= 2
        if x <= self.warmup:
            return
        for signal in ("heap", "rss", "cuda_allocated"):
            if signal not in sample:
                continue
            value = sample[signal]
            window = self._windows.get(signal)
            if window is None:
                window = self._windows[signal] = deque(maxlen=self.window + 4 * self.confirm)
                self._history[signal] = deque(maxlen=256)
                self._next_check[signal] = 0
            window.append((x, value))
            history = self._history[signal]
            if len(history) == history.maxlen:  # keep the long view bounded: halve its density
                kept = list(history)[::2]
                history.clear()
                history.extend(kept)
            if not history or x - history[-1][0] >= max(1, (x - self.warmup) // 128):
                history.append((x, value))

    # ---------------------------------------------------------------- deciding
    def _decide(self, x: int) -> Findings:
        suspicion = self._suspicion
        if suspicion is not None:
            suspicion.samples += 1
            if suspicion.samples < self._confirm_len(suspicion):
                return None
            self._suspicion = None
            return self._confirm(suspicion, x)
        for signal, window in self._windows.items():
            if signal in self.flagged or len(window) < self.window or self._seen < self._next_check[signal]:
                continue
            self._next_check[signal] = self._seen + 2  # every other sample will do
            recent = list(window)[-self.window :]
            if _rise(recent) < 0.5 * self.min_growth:
                continue  # not even the ends differ enough: skip the full test
            trend = mem.growing(
                [p[0] for p in recent],
                [p[1] for p in recent],
                min_rate=self.min_rate,
                min_growth=self.min_growth,
                signal=signal,
            )
            long = False
            history = self._history[signal]
            if trend is None and len(history) >= 4 * self.window and self._seen % self.window == 0:
                # a slow leak, below the window's rate: the whole run since warm-up
                trend = mem.growing(
                    [p[0] for p in history],
                    [p[1] for p in history],
                    min_rate=1.0,
                    min_growth=8 * self.min_growth,
                    signal=signal,
                )
                long = trend is not None
            if trend is not None:
                self._suspect(trend, x, long)
                return None
        return None

    def _confirm_len(self, suspicion: _Suspicion) -> int:
        if not suspicion.long:
            return self.confirm
        return max(self.confirm, len(self._history[suspicion.signal]) // 4)

    def _suspect(self, trend: mem.Trend, x: int, long: bool) -> None:
        census = mem.take_census(x) if self.use_census else None
        suspicion = _Suspicion(trend, x, census, long)
        if trend.signal.startswith("cuda") and self.use_cuda_history:
            suspicion.cuda_history = mem.start_cuda_history()
        self._suspicion = suspicion

    def _reject(self, signal: str, wait: int = 0) -> None:
        """Look again later, twice as late each time (the deeper look is not free)."""
        backoff = self._backoff.get(signal, self.window)
        for other in _HOST if signal in _HOST else (signal,):
            self._next_check[other] = self._seen + max(backoff, wait)
        self._backoff[signal] = min(backoff * 2, 64 * self.window)

    def _confirm(self, suspicion: _Suspicion, x: int) -> Findings:
        signal = suspicion.signal
        sites: list[dict[str, Any]] = []
        if suspicion.cuda_history:
            sites = mem.cuda_allocation_sites()
            mem.stop_cuda_history()
            suspicion.cuda_history = False
        points = self._history[signal] if suspicion.long else self._windows[signal]
        after = [p for p in points if p[0] >= suspicion.step]
        still, _ = mem.theil_sen([p[0] for p in after], [p[1] for p in after])
        if still < 0.5 * suspicion.trend.slope:
            self._reject(signal)  # it flattened out: a cache that filled, an allocator warming up
            return None
        if suspicion.long:
            span = list(points)
            trend = mem.growing(
                [p[0] for p in span], [p[1] for p in span], min_rate=1.0, min_growth=8 * self.min_growth, signal=signal
            )
        else:
            span = list(points)[-self.window :]
            trend = mem.growing(
                [p[0] for p in span],
                [p[1] for p in span],
                min_rate=self.min_rate,
                min_growth=self.min_growth,
                signal=signal,
            )
        if trend is None:
            self._reject(signal)
            return None
        growths: list[mem.Growth] = []
        if suspicion.census is not None:
            growths = self._explain(suspicion.census, x)
        if growths:
            fill = self._bounded(growths, signal)
            if fill is not None:
                self._reject(signal, wait=fill)
                return None
        self.flagged.extend(_HOST if signal in _HOST else (signal,))  # one host finding, from either counter
        self.trends.append(trend.to_dict())
        self._growths = [g.to_dict() for g in growths]
        self._sites = sites
        if suspicion.census is not None:
            self._census_steps = [suspicion.census.step, x]
        finding = self._finding(trend, growths, sites, x)
        self._emitted.append((finding, signal, x, trend.slope))
        return [finding]

    # ---------------------------------------------------------------- explaining
    def _explain(self, before: mem.Census, x: int) -> list[mem.Growth]:
        after = mem.take_census(x)
        growths = mem.diff(before, after)[:8]
        if not growths:
            return []
        namer = mem.Namer(mem.user_frames(), self.guard.models())
        graphs: dict[int, set[tuple[str, int]]] = {}  # index of a growth -> storages its graphs keep
        storages: dict[int, set[tuple[str, int]]] = {}  # index of a growth -> its new tensors' storages
        for i, growth in enumerate(growths):
            targets = mem.new_tensors(before, growth.key, limit=8)
            if not targets:
                continue
            storages[i] = {k for k in (mem.storage_key(t)[0] for t in targets) if k is not None}
            if growth.key[4]:  # has grad_fn: what its graph keeps alive
                saved = mem.graph_storages(targets[0])
                growth.graph_bytes = sum(saved.values())
                graphs[i] = set(saved)
            growth.owners = mem.find_owners(targets, namer)
            del targets
        for i, growth in enumerate(growths):
            # tensors kept alive by another group's graphs count once, with the group that holds the graphs
            growth.held_by_graph = any(
                j != i and growths[j].owners and storages.get(i, set()) & kept for j, kept in graphs.items()
            )
        kept = [g for g in growths if not g.held_by_graph and g.per_step_bytes >= 64 * 1024]
        kept.sort(key=lambda g: -g.per_step_bytes)
        return kept

    def _bounded(self, growths: list[mem.Growth], signal: str) -> int | None:
        """Steps until full, when all the growth sits in bounded containers that fit in memory."""
        if not all(g.owners for g in growths):
            return None
        extra = 0.0
        steps = 0
        for g in growths:
            owner = g.owners[0]
            if owner.get("maxlen") is None:
                return None
            room = max(owner["maxlen"] - owner["length"], 0)
            extra += room * max(g.tensor_bytes, 1.0)
            steps = max(steps, int(room / max(g.per_step_count, 1e-9)) + 1)
        headroom = self._sampler.headroom(signal)
        if headroom is None or extra >= 0.5 * headroom[0]:
            return None
        return steps

    def _finding(self, trend: mem.Trend, growths: list[mem.Growth], sites: list[dict[str, Any]], x: int) -> Finding:
        label = mem.SIGNALS.get(trend.signal, trend.signal)
        if trend.signal.startswith("cuda") and self._sampler.cuda_device is not None:
            label = f"{label} on cuda:{self._sampler.cuda_device}"
        unit = "step" if self._clock == "step" else "iteration"
        rate = trend.slope
        over = f"{unit}s {trend.start:.0f}-{trend.end:.0f}"
        message = (
            f"{label} grows by {mem.format_bytes(rate)} per {unit} (+{mem.format_bytes(trend.growth)} over {over})"
        )
        data: dict[str, Any] = {
            "signal": trend.signal,
            "clock": self._clock,
            "rate_mib_per_step": rate / mem.MiB,
            "growth_mib": trend.growth / mem.MiB,
            "window": [trend.start, trend.end],
        }
        headroom = self._sampler.headroom(trend.signal)
        if headroom is not None and rate > 0:
            runs_out = int(x + headroom[0] / rate)
            where_out = "the device" if trend.signal.startswith("cuda") else "the host"
            message += f"; at this rate {where_out} runs out of memory near {unit} {runs_out}"
            data["projected_oom_step"] = runs_out
            data["memory_free"], data["memory_total"] = headroom
        where = label
        location: Location | None = None
        hint = None
        if growths:
            data["culprits"] = [g.to_dict() for g in growths[:5]]
            top = growths[0]
            message += ". " + _culprit_text(top, unit)
            if top.owners:
                where = top.owners[0]["name"]
                loc = top.owners[0].get("location")
                location = Location.from_dict(loc) if loc else None
            if top.key[4]:
                hint = _GRAPH_HINT
        elif self.use_census:
            message += ". No growing group of live tensors explains it (numpy arrays, Python objects or C++ memory)"
        if sites:
            data["allocation_sites"] = sites
            site = sites[0]
            message += f"; most live CUDA blocks allocated at {site['file']}:{site['line']}"
            if location is None:
                location = Location(site["file"], site["line"], site["function"])
        if location is None:
            location = user_location()
        return self.finding(message, where=where, location=location, hint=hint, data=data)

    # ---------------------------------------------------------------- report
    def _padded(self) -> dict[str, list[int | None]]:
        n = len(self._series["step"])
        return {k: list(v) + [None] * (n - len(v)) for k, v in self._series.items()}

    def report(self) -> dict[str, Any]:
        peak = dict(self._peak)
        return {
            "clock": self._clock,
            "warmup": self.warmup,
            "signals": {k: v for k, v in mem.SIGNALS.items() if k in self._series},
            "series": self._padded(),
            "stride": self._record_stride,
            "trends": list(self.trends),
            "census": {"steps": list(self._census_steps), "groups": list(self._growths)},
            "allocation_sites": list(self._sites),
            "peak": peak,
            "cuda_device": self._sampler.cuda_device,
        }


def _rise(points: list[tuple[int, int]]) -> float:
    """How much the last samples of a window stand above its first ones (medians of four)."""
    head = sorted(v for _, v in points[:4])
    tail = sorted(v for _, v in points[-4:])
    return (tail[1] + tail[2] - head[1] - head[2]) / 2


def _ema(mean: float, value: float) -> float:
    """A moving average that one preempted measurement cannot blow up."""
    if not mean:
        return value
    return 0.9 * mean + 0.1 * min(value, 3 * mean)


def _culprit_text(growth: mem.Growth, unit: str) -> str:
    what = mem.describe_group(growth.key)
    count = growth.per_step_count
    if abs(count - round(count)) < 0.15 and round(count) >= 1:
        n = round(count)
        how_many = f"{n} tensor{'s' if n != 1 else ''} {what} ({mem.format_bytes(growth.tensor_bytes)}) per {unit}"
    elif count < 1:
        every = max(round(1 / count), 2)
        how_many = f"1 tensor {what} ({mem.format_bytes(growth.tensor_bytes)}) every {every} {unit}s"
    else:
        how_many = f"{count:.1f} tensors {what} ({mem.format_bytes(growth.tensor_bytes)} each) per {unit}"
    if growth.graph_bytes:
        how_many += f", each keeping {mem.format_bytes(growth.graph_bytes)} alive through its autograd graph"
    if not growth.owners:
        return f"Live tensors {what} grow: +{how_many}; no variable holding them was found"
    owner = growth.owners[0]
    loc = owner.get("location")
    place = f"{owner['kind']}, {loc['file']}:{loc['line']}" if loc else owner["kind"]
    return f"`{owner['name']}` ({place}) gains {how_many}"
