"""A census of live tensors by shape, dtype, device and autograd state, and what grew between two."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Iterator
from typing import Any

import torch

from gradguard.introspect.graph import saved_tensors, walk

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


def graph_storages(t: torch.Tensor, *, max_nodes: int = 2000) -> dict[tuple[str, int], int]:
    """The storages a tensor's autograd graph keeps alive (saved tensors, not parameters)."""
    out: dict[tuple[str, int], int] = {}
    if t.grad_fn is None:
        return out
    for node in walk([t.grad_fn], max_nodes):
        for v in saved_tensors(node):
            if not (v.requires_grad and v.is_leaf):
                skey, size = storage_key(v)
                if skey is not None:
                    out[skey] = size
    return out


def culprit_text(growth: Growth, unit: str) -> str:
    """What grows, by how much per step, and what holds it: a sentence for a finding."""
    from gradguard.memory.sampler import format_bytes

    what = describe_group(growth.key)
    count = growth.per_step_count
    if abs(count - round(count)) < 0.15 and round(count) >= 1:
        n = round(count)
        how_many = f"{n} tensor{'s' if n != 1 else ''} {what} ({format_bytes(growth.tensor_bytes)}) per {unit}"
    elif count < 1:
        every = max(round(1 / count), 2)
        how_many = f"1 tensor {what} ({format_bytes(growth.tensor_bytes)}) every {every} {unit}s"
    else:
        how_many = f"{count:.1f} tensors {what} ({format_bytes(growth.tensor_bytes)} each) per {unit}"
    if growth.graph_bytes:
        how_many += f", each keeping {format_bytes(growth.graph_bytes)} alive through its autograd graph"
    if not growth.owners:
        return f"Live tensors {what} grow: +{how_many}; no variable holding them was found"
    owner = growth.owners[0]
    loc = owner.get("location")
    place = f"{owner['kind']}, {loc['file']}:{loc['line']}" if loc else owner["kind"]
    return f"`{owner['name']}` ({place}) gains {how_many}"
