"""The words of a GG301 finding: what grows, how fast, until when, and what holds it."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from gradguard.findings import Finding, Location, Severity
from gradguard.memory.census import Growth, culprit_text
from gradguard.memory.sampler import SIGNALS, MemorySampler, MiB, format_bytes
from gradguard.memory.trend import Trend

UNEXPLAINED_HINT = (
    "Nothing to fix if it levels off. If it keeps growing, look for memory held outside Python's "
    "objects: a C/C++ extension, a native library's cache (tracemalloc or memray show where it is allocated)"
)
PERSISTED_HINT = (
    "Look for memory held outside Python's objects: a C/C++ extension, a native library's cache, "
    "objects rebuilt larger each step (tracemalloc or memray show where it is allocated)"
)
GRAPH_HINT = (
    "Run evaluation under torch.no_grad() (or torch.inference_mode()), or keep outputs.detach(), "
    "so that kept outputs do not hold their autograd graphs"
)


@dataclasses.dataclass
class Text:
    message: str
    where: str
    hint: str | None
    location: Location | None
    data: dict[str, Any]


def growth(
    trend: Trend,
    growths: list[Growth],
    sites: list[dict[str, Any]],
    x: int,
    unit: str,
    sampler: MemorySampler,
    *,
    census: bool,
    explained: bool = True,
) -> Text:
    """A confirmed growth: the rate, the growth so far, when memory runs out, and the culprit.

    A growth that nothing explains says so, and what it most often is: the allocator's.
    """
    label = SIGNALS.get(trend.signal, trend.signal)
    if trend.signal.startswith("cuda") and sampler.cuda_device is not None:
        label = f"{label} on cuda:{sampler.cuda_device}"
    rate = trend.slope
    over = f"{unit}s {trend.start:.0f}-{trend.end:.0f}"
    message = f"{label} grows by {format_bytes(rate)} per {unit} (+{format_bytes(trend.growth)} over {over})"
    data: dict[str, Any] = {
        "signal": trend.signal,
        "rate_mib_per_step": rate / MiB,
        "growth_mib": trend.growth / MiB,
        "window": [trend.start, trend.end],
    }
    headroom = sampler.headroom(trend.signal)
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
            hint = GRAPH_HINT
    elif census:
        message += (
            ". No growing group of live tensors, numpy arrays or Python containers explains it: most often "
            "the allocator keeping memory the program freed, which levels off; a warning if it keeps growing"
        )
    else:
        message += ". The census is off (census=False): a warning only if it keeps growing"
    if not explained:
        data["explained"] = False
        hint = UNEXPLAINED_HINT
    if sites:
        data["allocation_sites"] = sites
        message += f"; most live CUDA blocks allocated at {sites[0]['file']}:{sites[0]['line']}"
        if location is None:
            location = Location(sites[0]["file"], sites[0]["line"], sites[0]["function"])
    return Text(message, where, hint, location, data)


def metric(path: str, state: str, values: list[Any], epoch: int) -> Text:
    """A torchmetrics list state that grew from one epoch to the next without a reset."""
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
    return Text(message, f"{path}.{state}", hint, None, data)


def stopped(finding: Finding, flat: list[tuple[int, int]], slope: float, unit: str) -> dict[str, Any]:
    """The revision of a finding whose growth stopped since: a cache that filled up to a bound,
    or (nothing explained it) an allocator that settled."""
    explained = finding.data.get("explained", True)
    settled = "as a cache that fills up to a bound does" if explained else "as an allocator that settles does"
    message = finding.message + (
        f"; then the growth stopped: memory stayed flat over {unit}s {flat[0][0]}-{flat[-1][0]}, {settled}"
    )
    evidence = {"flat_from": flat[0][0], "flat_to": flat[-1][0], "rate_mib_per_step": slope / MiB}
    hint = "Check that the container is bounded; if it is, this is its filling up, not a leak"
    return {
        "severity": Severity.INFO,
        "message": message,
        "hint": hint if explained else "Nothing to fix: memory levelled off",
        "data": {**finding.data, "stopped": evidence},
    }


def persisted(finding: Finding, trend: Trend, unit: str) -> dict[str, Any]:
    """The revision of a growth nothing explained that kept growing: now a warning."""
    over = f"{unit}s {trend.start:.0f}-{trend.end:.0f}"
    message = finding.message + (
        f"; it kept growing, {format_bytes(trend.slope)} per {unit} (+{format_bytes(trend.growth)} over {over}), "
        "longer than an allocator settles: memory held outside what the census sees"
    )
    evidence = {
        "from": trend.start,
        "to": trend.end,
        "rate_mib_per_step": trend.slope / MiB,
        "growth_mib": trend.growth / MiB,
    }
    return {
        "severity": Severity.WARNING,
        "message": message,
        "hint": PERSISTED_HINT,
        "data": {**finding.data, "persisted": evidence},
    }
