"""GG301 memory-growth."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from gradguard import memory as mem
from gradguard.detector import Detector, Findings, on
from gradguard.errors import ConfigurationError
from gradguard.events import Close, EpochStart, IterationEnd
from gradguard.findings import Finding, Revision, Severity
from gradguard.introspect.frames import user_frames, user_location
from gradguard.introspect.naming import Namer
from gradguard.memory import describe
from gradguard.memory.metrics import MetricStates
from gradguard.memory.series import Cadence, Recorder
from gradguard.memory.watch import Confirmed, Emitted, GrowthWatch


class MemoryGrowth(Detector):
    """GG301 memory-growth: memory grows steadily, step after step, until the run runs out.

    **What it detects.** A training or evaluation loop that keeps something alive every
    step: a dict or list that gains a tensor per step, outputs kept together with their
    autograd graphs, a list on a module attribute that is appended to and never cleared,
    a torchmetrics metric with a list state that is never reset between epochs. gradguard
    samples memory once per step (the process's resident memory, and the CUDA allocator's
    counters when the program uses CUDA), skips the warm-up steps, and fits a robust
    Theil-Sen trend over a window of samples. Memory that rises and then stays flat (a
    cache or a bounded replay buffer that fills up, batches of varying size, the allocator
    keeping freed blocks) does not count: the window must grow in both halves and keep
    growing through a short confirmation window. Then it looks deeper, once: it counts the
    live tensors by shape, dtype, device and autograd state twice, notes which Python
    containers (list, dict, deque, set, `functools.lru_cache`) gained entries and what
    those weigh (numpy arrays and plain Python objects included), and names the variable
    or module attribute that holds what grows. A temporary of the step (a batch of a shape
    not seen before, held by a local variable) explains nothing.

    **Growth that nothing explains.** Memory that grows while the census finds nothing
    growing, most often the process's RSS, is far more often the allocator's doing than a
    leak: malloc keeps what the program freed for reuse, and a heap fragmented by batches
    of varying size settles after a while. Such a growth is reported as info (collected,
    never warned about) and its counter stays watched. It becomes a warning, the same
    finding revised, only if it keeps growing over a much longer window (four trend
    windows since it started, two since it was found, both halves growing at half its
    rate or more) and a new census still finds nothing that explains it; if the census
    does, that growth is a finding of its own. A growth that levels off stays info, with
    the evidence added at the end of the run.

    **Why it matters.** The run does not fail at once. It slows down as memory fills and
    dies with an out-of-memory error hours later, far from the line that leaks. The
    finding gives the rate in MiB per step, the growth so far and the step at which the
    device or host will run out at this rate.

    **How to fix it.** Keep only what you need, only as long as you need it: store
    `loss.item()` rather than `loss`, `out.detach()` rather than `out`, evaluate
    under `torch.no_grad()`, bound the container (`collections.deque(maxlen=...)`) or
    clear it each epoch; reset a metric each epoch (`metric.reset()`).

    **Example.**

    ```python
    cache = {}
    for step, (x, y) in enumerate(loader):
        out = model(x)
        cache[step] = out.detach()       # GG301: `cache` (dict, train.py:31) gains
        loss = criterion(out, y)         # 1 tensor [1024, 512] float32 (2 MiB) per step
        ...
    ```

    **How it knows, at little cost.** One sample per step reads counters only (`psutil`
    and `torch.cuda.memory_stats`); it never synchronises the GPU. The tensor census
    (`gc.get_objects()` and `gc.get_referrers`) runs only after the trend has fired,
    twice. On CUDA, allocation stacks are recorded with
    `torch.cuda.memory._record_memory_history` during the confirmation window only.
    Loops without an optimizer (evaluation) are sampled once per root forward instead.
    Metric list states are looked at when an integration reports the start of an epoch.

    **Arguments.** Keyword-only, for an instance given to `Guard(detectors=[...])`:

    - `warmup`: steps skipped at the start, while the optimizer creates its state and the
      allocators warm up.
    - `window`: samples in the trend window.
    - `confirm`: samples in the confirmation window that follows a suspected growth.
    - `min_rate_mib`: the smallest rate, in MiB per step, reported by the window test.
    - `min_growth_mib`: the smallest growth, in MiB over the window, reported.
    - `census`: whether to take the census of live tensors and containers that names the
      culprit; without it, a growth warns only once it kept growing over the longer window.
    - `cuda_history`: whether to record CUDA allocation stacks while confirming a growth.
    """

    code = "GG301"
    name = "memory-growth"
    hint = "Stop keeping a tensor every step: store .item() or .detach() values, bound the container, or clear it"
    consumes = (IterationEnd, EpochStart, Close)
    state_fields = ("flagged", "trends")
    fresh_fields = ("flagged",)

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
        _check_args(
            warmup=warmup, window=window, confirm=confirm, min_rate_mib=min_rate_mib, min_growth_mib=min_growth_mib
        )
        self.warmup, self.window, self.confirm = warmup, window, confirm
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
        self._rec = Recorder(self.warmup, self.window, self.confirm)
        self._cadence = Cadence()
        self._watch = GrowthWatch(
            self.window, self.confirm, self.min_rate, self.min_growth, self.use_census, self.use_cuda_history
        )
        self._emitted: list[Emitted] = []
        self._growths: list[dict[str, Any]] = []
        self._sites: list[dict[str, Any]] = []
        self._census_steps: list[int] = []
        self._metrics = MetricStates()

    def teardown(self) -> None:
        self._sampler.close()
        self._watch.close()
        self._rec.drop_windows()

    # ---------------------------------------------------------------- events
    @on(IterationEnd)
    def _iteration(self, event: IterationEnd) -> Findings:
        if event.by != "step":  # no optimizer steps (yet): the program's iterations are the clock
            if self._clock == "step" or event.step > 0:
                return None
            return self._tick(event.index)
        if self._clock != "step":
            if self.flagged:
                return None  # the series without steps already told its story; keep it whole
            self._clock = "step"
            self._rec.restart()
            self._watch.close()
        return self._tick(event.step)

    @on(EpochStart)
    def _epoch(self, event: EpochStart) -> Findings:
        self._metrics.refresh(self.run.models(), self.run.structure)
        return [self._metric_finding(path, state, values, event.epoch) for path, state, values in self._metrics.grown()]

    @on(Close)
    def _close(self, event: Close) -> Findings:
        self._watch.close()
        revisions = (self._revision(emitted) for emitted in self._emitted)
        return [r for r in revisions if r is not None]

    def _revision(self, emitted: Emitted) -> Revision | None:
        """At the end of the run, tell a cache that filled up (or an allocator that settled) from a leak.

        Growth that stopped after the finding (memory flat since) is what a bounded cache
        does while it fills: the finding stays in the report, revised to info, with the evidence.
        """
        tail = [p for p in self._rec.windows.get(emitted.signal, ()) if p[0] > emitted.step]
        if len(tail) < max(12, self.window // 2):
            return None
        recent = tail[-self.window :]
        slope, _ = mem.theil_sen([p[0] for p in recent], [p[1] for p in recent])
        if slope >= 0.1 * emitted.rate:
            return None
        unit = "step" if self._clock == "step" else "iteration"
        return Revision(emitted.first, describe.stopped(emitted.current, recent, slope, unit))

    # ---------------------------------------------------------------- sampling
    def _tick(self, x: int) -> Findings:
        cadence = self._cadence
        if not cadence.due(force=self._watch.suspicion is not None):
            return None
        sampler, costs = self._sampler, {}
        begin = time.perf_counter()
        sample = sampler.cuda()
        for counter, read in (("rss", sampler.rss), ("heap", sampler.heap)):
            if cadence.reads(counter):
                start = time.perf_counter()
                value = read()
                costs[counter] = time.perf_counter() - start
                if value is not None:
                    sample[counter] = value
        if not sample:
            cadence.measured(time.perf_counter() - begin, costs)
            return None  # no counter due at this sample: nothing new to record or decide
        self._rec.record(x, sample)
        cadence.measured(time.perf_counter() - begin, costs)
        if costs:
            # sparse readings that already rise, a growth being confirmed, or one found (which may
            # yet stop: a cache filling up): read that counter at every sample
            watching = self._watch.suspicion is not None
            cadence.dense = {
                counter
                for counter in costs
                if watching or counter in self.flagged or _rising(self._rec.windows.get(counter), self.min_growth / 4)
            }
        return None if x <= self.warmup else self._decide(x)

    # ---------------------------------------------------------------- deciding
    def _decide(self, x: int) -> Findings:
        found = self._watch.step(x, self._rec, self.flagged, self._namer, self._sampler.headroom)
        if found is None:
            return None
        if found.persisted:  # the info finding's growth kept on, and still nothing explains it
            raised = self._raised(found)
            return [raised] if raised is not None else None
        if found.explained:  # one host finding, either counter (one nothing explains stays suspected)
            self.flagged.extend(s for s in found.signals if s not in self.flagged)
        self.trends.append(found.trend.to_dict())
        self._growths = [g.to_dict() for g in found.growths]
        self._sites = found.sites
        self._census_steps = found.census_steps
        finding = self._finding(found, x)
        trend = found.trend
        self._emitted.append(Emitted(finding, finding, trend.signal, x, trend.slope, trend.start, found.explained))
        return [finding]

    def _raised(self, found: Confirmed) -> Revision | None:
        """The revision to a warning of the info finding whose growth kept on."""
        emitted = next((e for e in self._emitted if e.signal == found.trend.signal and not e.explained), None)
        if emitted is None:
            return None
        unit = "step" if self._clock == "step" else "iteration"
        changes = describe.persisted(emitted.current, found.trend, unit)
        emitted.current = dataclasses.replace(emitted.current, **changes)
        self.flagged.extend(s for s in found.signals if s not in self.flagged)
        self.trends.append(found.trend.to_dict())
        return Revision(emitted.first, changes)

    def _namer(self) -> Namer:
        return Namer(user_frames(), self.run.models())

    # ---------------------------------------------------------------- findings
    def _finding(self, found: Confirmed, x: int) -> Finding:
        unit = "step" if self._clock == "step" else "iteration"
        growth = (found.trend, found.growths, found.sites, x, unit, self._sampler)
        text = describe.growth(*growth, census=self.use_census, explained=found.explained)
        text.data["clock"] = self._clock
        location = text.location or user_location()
        severity = None if found.explained else Severity.INFO  # the allocator's, most often: info until it persists
        return self.finding(
            text.message, where=text.where, location=location, hint=text.hint, data=text.data, severity=severity
        )

    def _metric_finding(self, path: str, state: str, values: list[Any], epoch: int) -> Finding:
        text = describe.metric(path, state, values, epoch)
        return self.finding(text.message, where=text.where, location=None, hint=text.hint, data=text.data)

    def report(self) -> dict[str, Any]:
        rec = self._rec
        return {
            "clock": self._clock,
            "warmup": self.warmup,
            "signals": {k: v for k, v in mem.SIGNALS.items() if k in rec.series},
            "series": rec.padded(),
            "stride": rec.stride,
            "trends": list(self.trends),
            "census": {"steps": list(self._census_steps), "groups": list(self._growths)},
            "allocation_sites": list(self._sites),
            "peak": dict(rec.peak),
            "cuda_device": self._sampler.cuda_device,
        }


def _check_args(**args: Any) -> None:
    for arg, low in (("warmup", 0), ("window", 8), ("confirm", 3)):
        value = args[arg]
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigurationError(f"Expected {arg} to be an int >= {low} but got {value!r}")
    for arg in ("min_rate_mib", "min_growth_mib"):
        value = args[arg]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ConfigurationError(f"Expected {arg} to be a positive number but got {value!r}")


def _rising(points: Any, threshold: float) -> bool:
    """Whether the last few readings of a counter stand above the ones before (two against two)."""
    if points is None or len(points) < 4:
        return False
    last = list(points)[-4:]
    return (last[2][1] + last[3][1] - last[0][1] - last[1][1]) / 2 >= threshold
