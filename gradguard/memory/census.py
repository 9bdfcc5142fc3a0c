"""A census of live tensors by shape, dtype, device and autograd state, and what grew between two.

It also notes the length of every Python container (and ``lru_cache``) of some size, so
that the second census can tell which ones grew: numpy arrays and plain Python objects
are kept by containers, not counted one by one (see :mod:`gradguard.memory.containers`).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from gradguard.introspect.graph import saved_tensors, walk
from gradguard.memory.containers import MIN_LENGTH, is_container_type, length

GroupKey = tuple[tuple[int, ...], str, str, bool, bool]  # shape, dtype, device, requires_grad, has grad_fn

_TENSOR, _CONTAINER, _OTHER = 1, 2, 0
_KINDS: dict[type, int] = {}


def _kind(tp: type) -> int:
    known = _KINDS.get(tp)
    if known is None:
        # type(), never isinstance(): isinstance reads __class__, which some lazy objects
        # in gc (deprecated module attributes) answer with a warning.
        if issubclass(tp, torch.Tensor):
            known = _TENSOR
        elif is_container_type(tp):
            known = _CONTAINER
        else:
            known = _OTHER
        _KINDS[tp] = known
    return known


def live_tensors() -> Iterator[torch.Tensor]:
    """Every tensor object the garbage collector knows of (those Python can see)."""
    kinds = _KINDS
    for obj in gc.get_objects():
        tp = type(obj)
        if (kinds[tp] if tp in kinds else _kind(tp)) == _TENSOR:
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
    """How many tensors of each (shape, dtype, device, grad) group are alive, and their bytes.

    ``lengths`` holds the length of each container of :data:`~gradguard.memory.containers.MIN_LENGTH`
    entries or more, by ``id``; ``grown`` (only when the census was taken against an
    earlier one) the containers that gained entries since, with how many: strong
    references, for the moment the growth is explained and never longer.
    """

    step: int
    counts: dict[GroupKey, int]
    nbytes: dict[GroupKey, int]
    ids: dict[GroupKey, set[int]]
    lengths: dict[int, int] = dataclasses.field(default_factory=dict)
    grown: list[tuple[Any, int]] = dataclasses.field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes.values())


def take_census(step: int, before: Census | None = None, roots: Iterable[Any] = ()) -> Census:
    """Count the live tensors by group (storages shared by views count once) and measure containers.

    The containers are those the garbage collector lists, and ``roots``: those it does not
    (see :func:`~gradguard.memory.containers.untracked`). Against an earlier census
    ``before``, the containers that gained entries since are listed in :attr:`Census.grown`.
    """
    gc.collect(1)  # young cyclic garbage waiting for the collector is not a leak; a full pass costs too much
    counts: dict[GroupKey, int] = {}
    nbytes: dict[GroupKey, int] = {}
    ids: dict[GroupKey, set[int]] = {}
    lengths: dict[int, int] = {}
    grown: list[tuple[Any, int]] = []
    earlier = before.lengths if before is not None else {}
    seen: set[tuple[str, int]] = set()
    for obj in itertools.chain(gc.get_objects(), roots):
        kind = _kind(type(obj))
        if kind == _CONTAINER:
            n = length(obj)
            if n is not None and n >= MIN_LENGTH:
                lengths[id(obj)] = n
                added = n - earlier.get(id(obj), n)
                if added > 0:
                    grown.append((obj, added))
            continue
        if kind != _TENSOR:
            continue
        try:
            key = group_key(obj)
        except Exception:
            continue
        skey, size = storage_key(obj)
        if skey is not None:
            if skey in seen:
                size = 0
            else:
                seen.add(skey)
        counts[key] = counts.get(key, 0) + 1
        nbytes[key] = nbytes.get(key, 0) + size
        ids.setdefault(key, set()).add(id(obj))
    for internal in (counts, nbytes, ids, lengths, earlier, seen):
        lengths.pop(id(internal), None)
    return Census(step, counts, nbytes, ids, lengths, grown)


@dataclasses.dataclass
class Growth:
    """A tensor group that grew between two censuses, or (``kind="entries"``) a container that
    gained entries: then ``count_delta`` counts the entries, ``bytes_delta`` their estimated
    size (tensors left out) and ``entry`` says what one of them is."""

    key: GroupKey
    count_delta: int
    bytes_delta: int
    steps: int
    graph_bytes: int = 0  # bytes each new tensor keeps alive through its autograd graph
    owners: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    held_by_graph: bool = False  # kept alive by the autograd graph of another growing group
    kind: str = "tensors"
    entry: str = ""

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
            "kind": self.kind,
            "entry": self.entry,
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
    return new_tensors_of(before, [key], limit).get(key, [])


def new_tensors_of(before: Census, keys: list[GroupKey], limit: int) -> dict[GroupKey, list[torch.Tensor]]:
    """Up to ``limit`` live tensors of each group that were not alive at ``before``, in one pass."""
    out: dict[GroupKey, list[torch.Tensor]] = {key: [] for key in keys}
    wanted = len(keys)
    for t in live_tensors():
        try:
            key = group_key(t)
        except Exception:
            continue
        found = out.get(key)
        if found is None or len(found) >= limit or id(t) in before.ids.get(key, ()):
            continue
        found.append(t)
        if len(found) == limit:
            wanted -= 1
            if wanted == 0:
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

    if growth.kind == "entries":
        return _entries_text(growth, unit)
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


def _entries_text(growth: Growth, unit: str) -> str:
    """``records`` (list, train.py:31) gains 1 entry per step, a list of 2000 int (72 KiB)."""
    from gradguard.memory.sampler import format_bytes

    count = growth.per_step_count
    size = format_bytes(growth.tensor_bytes)
    if abs(count - round(count)) < 0.15 and round(count) >= 1:
        n = round(count)
        rate = f"{n} entr{'ies' if n != 1 else 'y'} per {unit}"
    elif count < 1:
        rate = f"1 entry every {max(round(1 / count), 2)} {unit}s"
    else:
        rate = f"{count:.1f} entries per {unit}"
    article = "an" if growth.entry[:1].lower() in tuple("aeiou") else "a"
    each = "each " if count > 1.15 else ""
    what = f", {each}{article} {growth.entry} ({size})" if growth.entry else f" ({size} each)"
    owner = growth.owners[0]
    loc = owner.get("location")
    place = f"{owner['kind']}, {loc['file']}:{loc['line']}" if loc else owner["kind"]
    return f"`{owner['name']}` ({place}) gains {rate}{what}"
