"""GG301 memory-growth."""

from __future__ import annotations

import time
from typing import Any

import torch

from gradguard import memory as mem
from gradguard.detector import Detector, Findings, on
from gradguard.errors import ConfigurationError
from gradguard.events import Close, EpochStart, ForwardPre, StepEnd
from gradguard.findings import Finding, Location, Revision, Severity
from gradguard.introspect.frames import user_frames, user_location
from gradguard.introspect.naming import Namer
from gradguard.memory.census import culprit_text
from gradguard.memory.metrics import MetricStates
from gradguard.memory.owners import explain, fill_steps
from gradguard.memory.series import Cadence, Recorder, rise

_GRAPH_HINT = (
    "Run evaluation under torch.no_grad() (or torch.inference_mode()), or keep outputs.detach(), "
    "so that kept outputs do not hold their autograd graphs"
)
_HOST = ("heap", "rss")


class _Suspicion:
    """A growth seen in a window, waiting for the confirmation window and the second census."""

    __slots__ = ("census", "cuda_history", "long", "samples", "signal", "step", "trend")

    def __init__(self, trend: mem.Trend, step: int, census: mem.Census | None, long: bool) -> None:
        self.trend, self.signal, self.step, self.census, self.long = trend, trend.signal, step, census, long
        self.samples = 0
        self.cuda_history = False


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
    live tensors by shape, dtype, device and autograd state twice, and names the variable
    or module attribute that holds the group that grows.

    **Why it matters.** The run does not fail at once. It slows down as memory fills and
    dies with an out-of-memory error hours later, far from the line that leaks. The
    finding gives the rate in MiB per step, the growth so far and the step at which the
    device or host will run out at this rate.

    **How to fix it.** Keep only what you need, only as long as you need it: store
    ``loss.item()`` rather than ``loss``, ``out.detach()`` rather than ``out``, evaluate
    under ``torch.no_grad()``, bound the container (``collections.deque(maxlen=...)``) or
    clear it each epoch; reset a metric each epoch (``metric.reset()``).

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
    Metric list states are looked at when an integration reports the start of an epoch.

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
    consumes = (ForwardPre, StepEnd, EpochStart, Close)
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
        self._backoff: dict[str, int] = {}
        self._suspicion: _Suspicion | None = None
        self._emitted: list[tuple[Finding, str, int, float]] = []  # finding, signal, step, rate
        self._growths: list[dict[str, Any]] = []
        self._sites: list[dict[str, Any]] = []
        self._census_steps: list[int] = []
        self._metrics = MetricStates()

    def teardown(self) -> None:
        self._sampler.close()
        if self._suspicion is not None and self._suspicion.cuda_history:
            mem.stop_cuda_history()
        self._suspicion = None
        self._rec.drop_windows()

    # ---------------------------------------------------------------- events
    @on(ForwardPre)
    def _forward(self, event: ForwardPre) -> Findings:
        if self._clock == "step" or self.run.step > 0:
            return None
        return self._tick(self.run.iteration)

    @on(StepEnd)
    def _step(self, event: StepEnd) -> Findings:
        if self._clock != "step":
            if self.flagged:
                return None  # the evaluation series already told its story; keep it whole
            self._clock = "step"
            self.listen(ForwardPre, False)
            self._rec.restart()
            self._suspicion = None
        return self._tick(event.step)

    @on(EpochStart)
    def _epoch(self, event: EpochStart) -> Findings:
        self._metrics.refresh(self.run.models(), self.run.structure)
        return [self._metric_finding(path, state, values, event.epoch) for path, state, values in self._metrics.grown()]

    @on(Close)
    def _close(self, event: Close) -> Findings:
        if self._suspicion is not None and self._suspicion.cuda_history:
            mem.stop_cuda_history()
            self._suspicion.cuda_history = False
        revisions = (self._revision(*emitted) for emitted in self._emitted)
        return [r for r in revisions if r is not None]

    def _revision(self, finding: Finding, signal: str, x: int, rate: float) -> Revision | None:
        """At the end of the run, tell a cache that filled up from a leak.

        Growth that stopped after the finding (memory flat since) is what a bounded cache
        does while it fills: the finding stays in the report, revised to info, with the evidence.
        """
        tail = [p for p in self._rec.windows.get(signal, ()) if p[0] > x]
        if len(tail) < max(12, self.window // 2):
            return None
        recent = tail[-self.window :]
        slope, _ = mem.theil_sen([p[0] for p in recent], [p[1] for p in recent])
        if slope >= 0.1 * rate:
            return None
        unit = "step" if self._clock == "step" else "iteration"
        message = finding.message + (
            f"; then the growth stopped: memory stayed flat over {unit}s {recent[0][0]}-{recent[-1][0]}, "
            "as a cache that fills up to a bound does"
        )
        stopped = {"flat_from": recent[0][0], "flat_to": recent[-1][0], "rate_mib_per_step": slope / mem.MiB}
        hint = "Check that the container is bounded; if it is, this is its filling up, not a leak"
        changes = {
            "severity": Severity.INFO,
            "message": message,
            "hint": hint,
            "data": {**finding.data, "stopped": stopped},
        }
        return Revision(finding, changes)

    # ---------------------------------------------------------------- sampling
    def _tick(self, x: int) -> Findings:
        cadence = self._cadence
        if not cadence.due(force=self._suspicion is not None):
            return None
        start = time.perf_counter()
        sample = self._sampler.sample()
        took = time.perf_counter()
        heap_cost = None
        if self._sampler.has_heap and cadence.heap_due():
            heap = self._sampler.heap()
            if heap is not None:
                sample["heap"] = heap
            heap_cost = time.perf_counter() - took
        cadence.measured(took - start, heap_cost)
        self._rec.record(x, sample)
        heap_points = self._rec.windows.get("heap")
        # sparse heap readings that already rise, a growth being confirmed, or one found (which
        # may yet stop: a cache filling up): read it at every sample
        cadence.dense = (
            self._suspicion is not None
            or "heap" in self.flagged
            or (
                heap_points is not None
                and len(heap_points) >= 8
                and rise(list(heap_points)[-8:]) >= 0.25 * self.min_growth
            )
        )
        return None if x <= self.warmup else self._decide(x)

    # ---------------------------------------------------------------- deciding
    def _decide(self, x: int) -> Findings:
        suspicion, rec = self._suspicion, self._rec
        if suspicion is not None:
            suspicion.samples += 1
            long_len = len(rec.history[suspicion.signal]) // 4 if suspicion.long else 0
            if suspicion.samples < max(self.confirm, long_len):
                return None
            self._suspicion = None
            return self._confirm(suspicion, x)
        for signal, window in rec.windows.items():
            if signal in self.flagged or len(window) < self.window or rec.seen < rec.next_check[signal]:
                continue
            rec.next_check[signal] = rec.seen + 2  # every other sample will do
            recent = list(window)[-self.window :]
            if rise(recent) < 0.5 * self.min_growth:
                continue  # not even the ends differ enough: skip the full test
            trend = self._growing(recent, signal, long=False)
            history = rec.history[signal]
            long = trend is None and len(history) >= 4 * self.window and rec.seen % self.window == 0
            if long:  # a slow leak, below the window's rate: the whole run since warm-up
                trend = self._growing(list(history), signal, long=True)
            if trend is not None:
                census = mem.take_census(x) if self.use_census else None
                self._suspicion = _Suspicion(trend, x, census, long)
                if signal.startswith("cuda") and self.use_cuda_history:
                    self._suspicion.cuda_history = mem.start_cuda_history()
                return None
        return None

    def _growing(self, points: list[tuple[int, int]], signal: str, *, long: bool) -> mem.Trend | None:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if long:
            return mem.growing(xs, ys, min_rate=1.0, min_growth=8 * self.min_growth, signal=signal)
        return mem.growing(xs, ys, min_rate=self.min_rate, min_growth=self.min_growth, signal=signal)

    def _reject(self, signal: str, wait: int = 0) -> None:
        """Look again later, twice as late each time (the deeper look is not free)."""
        backoff = self._backoff.get(signal, self.window)
        for other in _HOST if signal in _HOST else (signal,):
            self._rec.next_check[other] = self._rec.seen + max(backoff, wait)
        self._backoff[signal] = min(backoff * 2, 64 * self.window)

    def _confirm(self, suspicion: _Suspicion, x: int) -> Findings:
        signal, rec = suspicion.signal, self._rec
        sites: list[dict[str, Any]] = []
        if suspicion.cuda_history:
            sites = mem.cuda_allocation_sites()
            mem.stop_cuda_history()
            suspicion.cuda_history = False
        points = rec.history[signal] if suspicion.long else rec.windows[signal]
        after = [p for p in points if p[0] >= suspicion.step]
        still, _ = mem.theil_sen([p[0] for p in after], [p[1] for p in after])
        if still < 0.5 * suspicion.trend.slope:
            self._reject(signal)  # it flattened out: a cache that filled, an allocator warming up
            return None
        trend = self._growing(
            list(points) if suspicion.long else list(points)[-self.window :], signal, long=suspicion.long
        )
        if trend is None:
            self._reject(signal)
            return None
        growths: list[mem.Growth] = []
        if suspicion.census is not None:
            growths = explain(suspicion.census, x, Namer(user_frames(), self.run.models()))
        if growths:
            fill = fill_steps(growths, self._sampler.headroom(signal))
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

    # ---------------------------------------------------------------- findings
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
        where, location, hint = label, None, None
        if growths:
            data["culprits"] = [g.to_dict() for g in growths[:5]]
            top = growths[0]
            message += ". " + culprit_text(top, unit)
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
            message += f"; most live CUDA blocks allocated at {sites[0]['file']}:{sites[0]['line']}"
            if location is None:
                location = Location(sites[0]["file"], sites[0]["line"], sites[0]["function"])
        return self.finding(message, where=where, location=location or user_location(), hint=hint, data=data)

    def _metric_finding(self, path: str, state: str, values: list[Any], epoch: int) -> Finding:
        nbytes = sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
        message = (
            f"torchmetrics metric `{path}` was not reset between epochs: its list state `{state}` keeps "
            f"growing, now {len(values)} entries ({nbytes / 2**20:.1f} MiB) at epoch {epoch}"
        )
        hint = (
            f"Reset it once per epoch: log the metric object (self.log(..., self.{path})) so Lightning "
            f"resets it, or call self.{path}.reset() after compute()"
        )
        data = {"metric": path, "state": state, "entries": len(values), "bytes": nbytes, "epoch": epoch}
        return self.finding(message, where=f"{path}.{state}", location=None, hint=hint, data=data)

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
