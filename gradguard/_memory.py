"""The framework-free core of GG301: memory samples, a robust trend test, a tensor census.

Nothing here knows of the Guard. The detector samples memory once per step through
:class:`MemorySampler`, asks :func:`growing` whether a window of samples grows steadily,
and only then takes a :func:`take_census` of the live tensors twice and names, through
:func:`find_owners`, the containers that keep the growing ones alive.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import inspect
import linecache
import math
import os
import re
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

import numpy as np
import psutil
import torch

from gradguard._frames import _display_path, _is_library_file
from gradguard.findings import Location

MiB = 1 << 20

#: The memory signals the sampler records, and how a report names them.
SIGNALS: dict[str, str] = {
    "heap": "host memory in use (malloc)",
    "rss": "host memory (RSS)",
    "cuda_allocated": "CUDA memory allocated",
    "cuda_reserved": "CUDA memory reserved",
}


def format_bytes(n: float) -> str:
    """A byte count for people: whole numbers stay whole.

    >>> format_bytes(2 * MiB), format_bytes(1.25 * MiB), format_bytes(512 * 1024), format_bytes(3 * 2**30)
    ('2 MiB', '1.2 MiB', '512 KiB', '3 GiB')
    """
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.0f} {unit}" if abs(value - round(value)) < 0.05 else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


# --------------------------------------------------------------------------- sampling
class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo2() -> Any:
    """glibc's ``mallinfo2`` (glibc >= 2.33), or ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


class MemorySampler:
    """Reads memory counters without synchronising anything.

    Host: the process's resident set size through psutil and, with glibc, the bytes
    malloc has handed out and not taken back (``mallinfo2``: heap in use plus mmapped
    blocks), which is where CPU tensors live. Unlike RSS, it grows with a leak even
    while malloc recycles pages that earlier work freed. CUDA, once the program itself
    has initialised CUDA: the caching allocator's counters (allocated, reserved, peak),
    which are host-side bookkeeping and never wait for the device.
    """

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._mallinfo = _mallinfo2()
        self.cuda_device: int | None = None
        self._statm: int | None = None  # on Linux, /proc/self/statm kept open: a read, not an open
        self._page = 4096
        if sys.platform.startswith("linux"):
            try:
                self._statm = os.open("/proc/self/statm", os.O_RDONLY)
                self._page = os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, AttributeError):
                self._statm = None

    def close(self) -> None:
        if self._statm is not None:
            os.close(self._statm)
            self._statm = None

    def rss(self) -> int:
        if self._statm is not None:
            try:
                return int(os.pread(self._statm, 128, 0).split()[1]) * self._page
            except (OSError, ValueError, IndexError):
                self.close()
        return int(self._process.memory_info().rss)

    @property
    def has_heap(self) -> bool:
        return self._mallinfo is not None

    def sample(self) -> dict[str, int]:
        """RSS and, when the program uses CUDA, the allocator's counters. A few microseconds."""
        out = {"rss": self.rss()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            if self.cuda_device is None:
                self.cuda_device = torch.cuda.current_device()
            stats = torch.cuda.memory_stats(self.cuda_device)
            out["cuda_allocated"] = int(stats.get("allocated_bytes.all.current", 0))
            out["cuda_reserved"] = int(stats.get("reserved_bytes.all.current", 0))
            out["cuda_peak"] = int(stats.get("allocated_bytes.all.peak", 0))
        return out

    def heap(self) -> int | None:
        """Bytes malloc has handed out. Cheap on a tidy heap; it walks the free lists, so
        a heap with many free chunks makes it slower: the caller schedules it."""
        if self._mallinfo is None:
            return None
        info = self._mallinfo()
        return int(info.uordblks + info.hblkhd)

    def headroom(self, signal: str) -> tuple[int, int] | None:
        """(bytes still free, total bytes) for the memory a signal lives in."""
        try:
            if signal in ("rss", "heap"):
                vm = psutil.virtual_memory()
                return int(vm.available), int(vm.total)
            if self.cuda_device is not None:
                total = int(torch.cuda.get_device_properties(self.cuda_device).total_memory)
                reserved = int(torch.cuda.memory_reserved(self.cuda_device))
                return max(total - reserved, 0), total
        except Exception:
            return None
        return None


# --------------------------------------------------------------------------- trend
_PAIRS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def theil_sen(x: Iterable[float], y: Iterable[float]) -> tuple[float, float]:
    """The Theil-Sen line through points: the median of all pairwise slopes.

    Robust to outliers (about 29% of them) and to a few steps at the start.

    >>> theil_sen([0, 1, 2, 3, 4], [1, 3, 5, 100, 9])
    (2.0, 1.0)
    """
    xs = np.asarray(list(x) if not isinstance(x, np.ndarray) else x, dtype=np.float64)
    ys = np.asarray(list(y) if not isinstance(y, np.ndarray) else y, dtype=np.float64)
    n = len(xs)
    if n < 2:
        return 0.0, float(ys[0]) if n else 0.0
    pairs = _PAIRS.get(n)
    if pairs is None:
        pairs = np.triu_indices(n, 1)
        if len(_PAIRS) < 64:
            _PAIRS[n] = pairs
    i, j = pairs
    dx = xs[j] - xs[i]
    keep = dx != 0
    if not keep.any():
        return 0.0, float(np.median(ys))
    slope = float(np.median((ys[j] - ys[i])[keep] / dx[keep]))
    return slope, float(np.median(ys - slope * xs))


@dataclasses.dataclass(frozen=True)
class Trend:
    """A steady growth: ``value ≈ slope * step + intercept`` over ``[start, end]``."""

    signal: str
    slope: float  # bytes per step
    intercept: float
    start: float
    end: float
    noise: float  # robust standard deviation of the residuals, bytes

    @property
    def growth(self) -> float:
        return self.slope * (self.end - self.start)

    def to_dict(self) -> dict[str, Any]:
        return {
            "signal": self.signal,
            "slope": self.slope,
            "intercept": self.intercept,
            "start": self.start,
            "end": self.end,
            "growth": self.growth,
            "noise": self.noise,
        }


def growing(
    x: Iterable[float], y: Iterable[float], *, min_rate: float, min_growth: float, signal: str = "rss"
) -> Trend | None:
    """The steady growth of ``y`` over ``x``, or ``None`` if it does not grow steadily.

    A window grows when its Theil-Sen slope is at least ``min_rate`` per step, adds up
    to ``min_growth`` over the window, stands clear of the noise (four standard errors),
    and *both halves* of the window grow at half that rate or more. The last rule is the
    one that keeps a cache that filled up and then stayed flat from counting.

    >>> steps = list(range(30))
    >>> leak = [100 + 2 * s for s in steps]
    >>> growing(steps, leak, min_rate=1, min_growth=10).slope
    2.0
    >>> filled = [100 + 2 * min(s, 15) for s in steps]      # grows, then flat
    >>> growing(steps, filled, min_rate=1, min_growth=10) is None
    True
    """
    xs = np.asarray(list(x), dtype=np.float64)
    ys = np.asarray(list(y), dtype=np.float64)
    n = len(xs)
    if n < 8 or n != len(ys):
        return None
    slope, intercept = theil_sen(xs, ys)
    span = float(xs[-1] - xs[0])
    if slope < min_rate or slope * span < min_growth:
        return None
    resid = ys - (slope * xs + intercept)
    noise = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
    sxx = float(np.sum((xs - xs.mean()) ** 2))
    if sxx <= 0 or slope < 4.0 * noise / math.sqrt(sxx):
        return None
    half = n // 2
    for part in (slice(0, half), slice(half, n)):
        part_slope, _ = theil_sen(xs[part], ys[part])
        if part_slope < 0.5 * slope:
            return None
    return Trend(signal, slope, intercept, float(xs[0]), float(xs[-1]), noise)


# --------------------------------------------------------------------------- census
GroupKey = tuple[tuple[int, ...], str, str, bool, bool]  # shape, dtype, device, requires_grad, has grad_fn

_TENSOR_TYPES: dict[type, bool] = {}


def _is_tensor_type(tp: type) -> bool:
    known = _TENSOR_TYPES.get(tp)
    if known is None:
        # type(), never isinstance(): isinstance reads __class__, which some lazy objects
        # in gc (deprecated module attributes) answer with a warning.
        known = issubclass(tp, torch.Tensor)
        _TENSOR_TYPES[tp] = known
    return known


def live_tensors() -> Iterator[torch.Tensor]:
    """Every tensor object the garbage collector knows of (those Python can see)."""
    for obj in gc.get_objects():
        if _is_tensor_type(type(obj)):
            yield obj


def storage_key(t: torch.Tensor) -> tuple[tuple[str, int] | None, int]:
    """(unique storage key, its bytes) for a tensor; a key of None when it has no storage."""
    try:
        if t.is_sparse or t.device.type == "meta":
            return None, 0 if t.device.type == "meta" else t.numel() * t.element_size()
        storage = t.untyped_storage()
        return (str(t.device), storage.data_ptr()), storage.nbytes()
    except Exception:  # tensor subclasses without real storage
        try:
            return None, t.numel() * t.element_size()
        except Exception:
            return None, 0


def group_key(t: torch.Tensor) -> GroupKey:
    return (
        tuple(t.shape),
        str(t.dtype).replace("torch.", ""),
        str(t.device),
        bool(t.requires_grad),
        t.grad_fn is not None,
    )


def describe_group(key: GroupKey | list[Any]) -> str:
    """``[1024, 512] float32``, with the device unless it is the CPU.

    >>> describe_group(((1024, 512), "float32", "cpu", False, False))
    '[1024, 512] float32'
    """
    shape, dtype, device = key[0], key[1], key[2]
    text = f"[{', '.join(str(s) for s in shape)}] {dtype}"
    return text if device == "cpu" else f"{text} on {device}"


@dataclasses.dataclass
class Census:
    """How many tensors of each (shape, dtype, device, grad) group are alive, and their bytes."""

    step: int
    counts: dict[GroupKey, int]
    nbytes: dict[GroupKey, int]
    ids: dict[GroupKey, set[int]]

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes.values())


def take_census(step: int) -> Census:
    """Count the live tensors by group; storages shared by views count once."""
    gc.collect(1)  # young cyclic garbage waiting for the collector is not a leak; a full pass costs too much
    counts: dict[GroupKey, int] = {}
    nbytes: dict[GroupKey, int] = {}
    ids: dict[GroupKey, set[int]] = {}
    seen: set[tuple[str, int]] = set()
    for t in live_tensors():
        try:
            key = group_key(t)
        except Exception:
            continue
        skey, size = storage_key(t)
        if skey is not None:
            if skey in seen:
                size = 0
            else:
                seen.add(skey)
        counts[key] = counts.get(key, 0) + 1
        nbytes[key] = nbytes.get(key, 0) + size
        ids.setdefault(key, set()).add(id(t))
    return Census(step, counts, nbytes, ids)


@dataclasses.dataclass
class Growth:
    """A tensor group that grew between two censuses."""

    key: GroupKey
    count_delta: int
    bytes_delta: int
    steps: int
    graph_bytes: int = 0  # bytes each new tensor keeps alive through its autograd graph
    owners: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    held_by_graph: bool = False  # kept alive by the autograd graph of another growing group

    @property
    def per_step_count(self) -> float:
        return self.count_delta / max(self.steps, 1)

    @property
    def per_step_bytes(self) -> float:
        return (self.bytes_delta + self.count_delta * self.graph_bytes) / max(self.steps, 1)

    @property
    def tensor_bytes(self) -> float:
        return self.bytes_delta / self.count_delta if self.count_delta > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        shape, dtype, device, requires_grad, grad_fn = self.key
        return {
            "shape": list(shape),
            "dtype": dtype,
            "device": device,
            "requires_grad": requires_grad,
            "grad_fn": grad_fn,
            "count_delta": self.count_delta,
            "bytes_delta": self.bytes_delta,
            "steps": self.steps,
            "per_step_count": self.per_step_count,
            "per_step_bytes": self.per_step_bytes,
            "tensor_bytes": self.tensor_bytes,
            "graph_bytes": self.graph_bytes,
            "held_by_graph": self.held_by_graph,
            "owners": self.owners,
        }


def diff(before: Census, after: Census, *, min_bytes: int = 64 * 1024) -> list[Growth]:
    """The groups that gained tensors and bytes, largest first."""
    steps = max(after.step - before.step, 1)
    out = []
    for key, count in after.counts.items():
        dcount = count - before.counts.get(key, 0)
        dbytes = after.nbytes.get(key, 0) - before.nbytes.get(key, 0)
        if dcount > 0 and (dbytes >= min_bytes or key[4]):  # small outputs may hold large graphs
            out.append(Growth(key, dcount, dbytes, steps))
    out.sort(key=lambda g: -g.bytes_delta)
    return out


def new_tensors(before: Census, key: GroupKey, limit: int) -> list[torch.Tensor]:
    """Up to ``limit`` live tensors of a group that were not alive at ``before``."""
    old = before.ids.get(key, set())
    out: list[torch.Tensor] = []
    for t in live_tensors():
        if id(t) in old:
            continue
        try:
            if group_key(t) != key:
                continue
        except Exception:
            continue
        out.append(t)
        if len(out) >= limit:
            break
    return out


_SAVED_NAMES: dict[type, tuple[str, ...]] = {}


def graph_storages(t: torch.Tensor, *, max_nodes: int = 2000) -> dict[tuple[str, int], int]:
    """The storages a tensor's autograd graph keeps alive (saved tensors, not parameters)."""
    out: dict[tuple[str, int], int] = {}
    root = t.grad_fn
    if root is None:
        return out
    stack = [root]
    seen = {id(root)}
    while stack and len(seen) <= max_nodes:
        node = stack.pop()
        names = _SAVED_NAMES.get(type(node))
        if names is None:
            names = tuple(a for a in dir(node) if a.startswith("_saved_"))
            _SAVED_NAMES[type(node)] = names
        for name in names:
            try:
                value = getattr(node, name)
            except Exception:  # freed by an earlier backward, or not a tensor
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            for v in values:
                if _is_tensor_type(type(v)) and not (v.requires_grad and v.is_leaf):
                    skey, size = storage_key(v)
                    if skey is not None:
                        out[skey] = size
        for nxt, _ in getattr(node, "next_functions", ()):
            if nxt is not None and id(nxt) not in seen:
                seen.add(id(nxt))
                stack.append(nxt)
    return out


# --------------------------------------------------------------------------- owners
_MUTATE = (
    r"\s*(?:\[[^\]\n]*\]\s*=(?!=)|\.(?:append|appendleft|extend|extendleft|insert|add|update|setdefault)\s*\(|\+=)"
)
#: How each kind of container is added to, to prefer the line that fits the container.
_MUTATE_BY_KIND = {
    dict: r"\s*(?:\[[^\]\n]*\]\s*=(?!=)|\.(?:update|setdefault)\s*\()",
    list: r"\s*(?:\.(?:append|extend|insert)\s*\(|\+=)",
    deque: r"\s*(?:\.(?:append|appendleft|extend|extendleft|insert)\s*\(|\+=)",
    set: r"\s*(?:\.(?:add|update)\s*\(|\|=)",
}


def _mutations(obj: Any) -> list[str]:
    """The mutation patterns to try for a container, most specific first."""
    specific = next((p for kind, p in _MUTATE_BY_KIND.items() if isinstance(obj, kind)), None)
    return [specific, _MUTATE] if specific is not None else [_MUTATE]


def user_frames(limit: int = 40) -> list[FrameType]:
    """The user's frames on the current stack, innermost first."""
    frames: list[FrameType] = []
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and len(frames) < limit:
        if not _is_library_file(frame.f_code.co_filename):
            frames.append(frame)
        frame = frame.f_back
    return frames


class Namer:
    """Names objects by the variables and module attributes that hold them."""

    def __init__(self, frames: list[FrameType], models: list[torch.nn.Module]) -> None:
        self.frames = frames
        self.models = models
        self.scopes: list[tuple[dict[str, Any], FrameType]] = []
        seen: set[int] = set()
        for f in frames:
            for scope in (f.f_locals, f.f_globals):
                if id(scope) not in seen:
                    seen.add(id(scope))
                    self.scopes.append((scope, f))
        self.scope_ids = seen

    def name(self, obj: Any) -> tuple[str, Location | None] | None:
        """``(name, location of the line that adds to it)``, or ``None``."""
        for scope, frame in self.scopes:
            for key, value in list(scope.items()):
                if value is obj and isinstance(key, str):
                    return key, _mutation_line(frame, key, _mutations(obj))
        for model in self.models:
            found = self._in_model(model, obj)
            if found is not None:
                return found
        return None

    def _in_model(self, model: torch.nn.Module, obj: Any) -> tuple[str, Location | None] | None:
        for path, module in model.named_modules():
            for attr, value in vars(module).items():
                if value is obj:
                    prefix = self._model_name(model)
                    name = ".".join(p for p in (prefix, path, attr) if p)
                    return name, _attribute_line(type(module), attr, _mutations(obj))
        return None

    def _model_name(self, model: torch.nn.Module) -> str:
        for scope, _ in self.scopes:
            for key, value in list(scope.items()):
                if value is model and isinstance(key, str) and key != "self":
                    return key
        return "model"


def _code_lines(frame: FrameType) -> tuple[str, int, int]:
    code = frame.f_code
    last = max((line for _, _, line in code.co_lines() if line is not None), default=code.co_firstlineno)
    first = 1 if code.co_name == "<module>" else code.co_firstlineno
    return code.co_filename, first, last


def _search(filename: str, first: int, last: int, pattern: re.Pattern[str]) -> int | None:
    lines = linecache.getlines(filename)
    for lineno in range(max(first, 1), min(last, len(lines)) + 1):
        text = lines[lineno - 1]
        if pattern.search(text.split("#", 1)[0]):
            return lineno
    return None


def _first(filename: str, first: int, last: int, prefix: str, name: str, patterns: list[str]) -> int | None:
    for pattern in patterns:
        line = _search(filename, first, last, re.compile(prefix + re.escape(name) + pattern))
        if line is not None:
            return line
    return None


def _mutation_line(frame: FrameType, name: str, patterns: list[str]) -> Location | None:
    """The line in the frame's code that adds to ``name`` (``name[k] = ``, ``name.append(``)."""
    filename, first, last = _code_lines(frame)
    line = _first(filename, first, last, r"(?<![\w.])", name, [*patterns, r"\s*=(?!=)"])
    return Location(_display_path(filename), line or frame.f_lineno, frame.f_code.co_name)


def _attribute_line(cls: type, attr: str, patterns: list[str] | None = None) -> Location | None:
    """The line in a class (or else its file) that adds to ``self.<attr>``."""
    try:
        filename = inspect.getsourcefile(cls)
        lines, first = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return None
    if filename is None:
        return None
    patterns = patterns or [_MUTATE]
    line = _first(filename, first, first + len(lines) - 1, r"\.", attr, patterns)
    if line is None:
        line = _first(filename, 1, len(linecache.getlines(filename)), r"\.", attr, patterns)
    return Location(_display_path(filename), line or first, cls.__name__)


_CONTAINERS = (list, dict, deque, set, tuple)


def find_owners(targets: list[torch.Tensor], namer: Namer, *, max_calls: int = 12) -> list[dict[str, Any]]:
    """The named containers that hold ``targets``: a dict, list or deque of the user's.

    Climbs at most two levels (a tuple in a list, a list in an object's attribute) and
    calls ``gc.get_referrers`` at most ``max_calls`` times.
    """
    args = tuple(targets)
    ignore = {id(targets), id(args), *namer.scope_ids}
    target_ids = {id(t) for t in targets}
    owners: dict[int, dict[str, Any]] = {}
    calls = 1
    level = [r for r in gc.get_referrers(*args) if isinstance(r, _CONTAINERS) and id(r) not in ignore]
    ignore.add(id(level))
    for container in level[:8]:
        held = _count_held(container, target_ids)
        if held == 0:
            continue
        named = namer.name(container)
        path = ""
        if named is None and calls < max_calls:
            calls += 1
            named, path = _climb(container, namer, ignore)
        if named is None:
            continue
        name, location = named
        entry = owners.setdefault(
            id(container),
            {
                "name": name + path,
                "kind": type(container).__name__,
                "location": location.to_dict() if location is not None else None,
                "held": 0,
                "length": len(container),
                "maxlen": getattr(container, "maxlen", None),
            },
        )
        entry["held"] += held
    return sorted(owners.values(), key=lambda o: -o["held"])


def _count_held(container: Any, target_ids: set[int]) -> int:
    values = container.values() if isinstance(container, dict) else container
    try:
        return sum(1 for v in values if id(v) in target_ids)
    except RuntimeError:  # changed size while counting
        return 0


def _climb(container: Any, namer: Namer, ignore: set[int]) -> tuple[tuple[str, Location | None] | None, str]:
    """Name a container through what holds it: ``obj.attr``, ``d['key']`` or ``outer[3]``."""
    parents = [r for r in gc.get_referrers(container) if id(r) not in ignore and not isinstance(r, FrameType)]
    for parent in parents:
        if isinstance(parent, dict):
            key = next((k for k, v in parent.items() if v is container), None)
            if key is None:
                continue
            named = namer.name(parent)
            if named is not None:
                return named, f"[{key!r}]"
            owner = _instance_of(parent, ignore)
            if owner is not None:
                named = namer.name(owner)
                if named is not None and isinstance(key, str):
                    return (
                        f"{named[0]}.{key}",
                        _attribute_line(type(owner), key, _mutations(container)) or named[1],
                    ), ""
        elif isinstance(parent, (list, tuple, deque)):
            named = namer.name(parent)
            if named is not None:
                return named, "[...]"
    return None, ""


def _instance_of(d: dict[str, Any], ignore: set[int]) -> Any:
    for r in gc.get_referrers(d):
        if id(r) not in ignore and getattr(r, "__dict__", None) is d:
            return r
    return None


# --------------------------------------------------------------------------- CUDA history
def start_cuda_history(max_entries: int = 20000) -> bool:
    """Start recording CUDA allocation stacks, where this torch can. True if started."""
    recorder = getattr(getattr(torch.cuda, "memory", None), "_record_memory_history", None)
    if recorder is None:
        return False
    try:
        recorder(enabled="all", context="alloc", stacks="python", max_entries=max_entries)
    except TypeError:  # torch < 2.1 spells it differently
        try:
            recorder(True, record_context=True, trace_alloc_max_entries=max_entries)
        except Exception:
            return False
    except Exception:
        return False
    return True


def stop_cuda_history() -> None:
    recorder = getattr(getattr(torch.cuda, "memory", None), "_record_memory_history", None)
    if recorder is None:
        return
    try:
        recorder(enabled=None)
    except TypeError:
        try:
            recorder(False)
        except Exception:
            return
    except Exception:
        return


def cuda_allocation_sites(limit: int = 5) -> list[dict[str, Any]]:
    """The user lines that allocated the CUDA blocks still alive, grouped, largest first.

    Reads ``torch.cuda.memory._snapshot()``: host-side allocator bookkeeping, no device
    synchronisation. Only blocks allocated while recording was on carry frames.
    """
    snapshot_fn = getattr(getattr(torch.cuda, "memory", None), "_snapshot", None)
    if snapshot_fn is None:
        return []
    try:
        snapshot = snapshot_fn()
    except Exception:
        return []
    sites: dict[tuple[str, int, str, int], list[int]] = {}
    for segment in snapshot.get("segments", []) if isinstance(snapshot, dict) else []:
        for block in segment.get("blocks", []):
            if block.get("state") != "active_allocated":
                continue
            frames = block.get("frames") or []
            frame = next((f for f in frames if not _is_library_file(str(f.get("filename", "<")))), None)
            if frame is None:
                continue
            size = int(block.get("requested_size") or block.get("size") or 0)
            key = (
                _display_path(str(frame.get("filename"))),
                int(frame.get("line", 0)),
                str(frame.get("name", "")),
                size,
            )
            entry = sites.setdefault(key, [0, 0])
            entry[0] += 1
            entry[1] += size
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][1])[:limit]
    return [
        {"file": f, "line": line, "function": fn, "block_bytes": size, "count": c, "bytes": b}
        for (f, line, fn, size), (c, b) in ranked
    ]
