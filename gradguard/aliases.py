"""Tensors and numpy arrays that share memory, tracked without holding either (GG501's machinery).

Each alias keeps weak references to both sides, the line that made it, the tensor's version
counter and a checksum of a sample of the bytes; the table is bounded, oldest memory first.

Example:
    >>> import numpy as np, torch
    >>> a = np.arange(4, dtype=np.float32)
    >>> t = torch.from_numpy(a)
    >>> rec = Alias(a, t, "torch.from_numpy", None, key_of(a, t), checksum(a))
    >>> rec.changed(checksum(a)), (a.__setitem__(0, 9.0), rec.changed(checksum(a)))[1]
    (False, True)
"""

from __future__ import annotations

import weakref
import zlib
from collections.abc import Iterable, Iterator
from types import CodeType
from typing import Any

import numpy as np
import torch

from gradguard.findings import Location
from gradguard.introspect.frames import code_location

MAX_ALIASES = 10_000  # aliases tracked at once; dead ones are dropped first, then the oldest
PER_MEMORY = 16  # aliases of one memory tracked at once (the most recent)
_FULL_BYTES = 4_096  # arrays up to this size are checksummed whole
_SAMPLES = 256  # larger ones: this many evenly spaced elements
_SCAN_ITEMS = 32  # forward arguments looked at, and items per list/tuple/dict among them

Key = tuple[int, tuple[int, ...], tuple[int, ...], np.dtype]
Site = tuple[CodeType, int]


def checksum(array: np.ndarray) -> int:
    """A CRC of the bytes of a small array, or of an evenly spaced sample of a large one."""
    if array.nbytes <= _FULL_BYTES:
        return zlib.crc32(array.tobytes())
    if array.flags.c_contiguous:
        flat = array.reshape(-1)
        sample = flat[:: max(1, flat.size // _SAMPLES)]
    else:
        index = np.linspace(0, array.size - 1, _SAMPLES).astype(np.intp)
        sample = array[np.unravel_index(index, array.shape)]
    return zlib.crc32(sample.tobytes())


def key_of(array: np.ndarray, tensor: torch.Tensor) -> Key:
    """What identifies a memory: its address, and how the array looks at it."""
    return (tensor.data_ptr(), array.shape, array.strides, array.dtype)


def owner(array: np.ndarray) -> np.ndarray:
    """The ndarray that owns the memory a view looks at."""
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root


def location(site: Site) -> Location:
    code, line = site
    return code_location(code, line)


def describe(array: np.ndarray | None) -> str:
    if array is None:
        return "<ndarray>"
    return f"<ndarray {array.dtype} {tuple(array.shape)}>"


class Alias:
    """One tensor/array pair that shares memory, without holding either."""

    __slots__ = (
        "again",
        "array_ref",
        "checksum",
        "how",
        "key",
        "reported",
        "site",
        "suspect",
        "tensor_id",
        "tensor_ref",
        "version",
    )

    def __init__(self, array: np.ndarray, tensor: torch.Tensor, how: str, site: Any, key: Key, crc: int) -> None:
        self.array_ref = weakref.ref(array)
        if how == "Tensor.numpy" and isinstance(array.base, torch.Tensor):
            tensor = array.base  # the array keeps this one alive; it shares the version counter
        self.tensor_ref = weakref.ref(tensor)
        self.tensor_id = id(tensor)
        self.how = how
        self.site = site
        self.key = key
        self.checksum = crc
        self.version = tensor._version
        self.again: Site | None = None  # where the same line made another alias of this memory
        self.suspect: tuple[Site, str | None, str | None] | None = None  # kept alive while the memory changed?
        self.reported = False

    @property
    def to_numpy(self) -> bool:
        return self.how == "Tensor.numpy"

    def product(self) -> Any:
        """What the call returned (the tensor of from_numpy, the array of .numpy()), or None."""
        return self.array_ref() if self.to_numpy else self.tensor_ref()

    def changed(self, crc: int) -> bool:
        """Whether the shared memory changed since the alias was made (on either side)."""
        tensor = self.tensor_ref()
        return crc != self.checksum or (tensor is not None and tensor._version != self.version)


class Written:
    """Memory that an in-place op on a ``from_numpy`` tensor rewrote, as last seen."""

    __slots__ = ("checksum", "how", "owner_ref", "seen_at", "site")

    def __init__(self, root: np.ndarray, crc: int, site: Site, how: str, seen_at: Location | None) -> None:
        self.owner_ref = weakref.ref(root)
        self.checksum = crc
        self.site = site
        self.how = how
        self.seen_at = seen_at


class AliasTable:
    """The live aliases, by memory and by tensor, bounded."""

    def __init__(self) -> None:
        self.by_key: dict[Key, list[Alias]] = {}
        self.by_tensor: dict[int, Alias] = {}
        self.count = 0

    def live(self, key: Key) -> list[Alias]:
        """The aliases of this memory still alive and not reported yet, oldest first."""
        recs = self.by_key.get(key)
        if not recs:
            return []
        keep = [r for r in recs if not r.reported and r.product() is not None]
        if len(keep) != len(recs):
            self._forget(r for r in recs if r.reported or r.product() is None)
            if keep:
                self.by_key[key] = keep
            else:
                del self.by_key[key]
        return keep

    def add(self, rec: Alias) -> None:
        recs = self.by_key.pop(rec.key, None) or []
        recs.append(rec)
        if len(recs) > PER_MEMORY:
            self._forget(recs[:-PER_MEMORY])
            del recs[:-PER_MEMORY]
        self.by_key[rec.key] = recs  # most recently used memory last
        self.count += 1
        if not rec.to_numpy:
            self.by_tensor[rec.tensor_id] = rec
        if self.count > MAX_ALIASES:
            self._shrink()

    def of_tensor(self, tensor: torch.Tensor) -> tuple[Alias, torch.Tensor] | None:
        """The alias a tensor (or the tensor it is a view of) came from."""
        rec = self.by_tensor.get(id(tensor))
        if rec is not None and rec.tensor_ref() is tensor:
            return rec, tensor
        base = tensor._base
        if base is None:
            return None
        rec = self.by_tensor.get(id(base))
        if rec is None or rec.tensor_ref() is not base:
            return None
        return rec, base

    def clear(self) -> None:
        self.by_key.clear()
        self.by_tensor.clear()
        self.count = 0

    def _forget(self, recs: Iterable[Alias]) -> None:
        for r in recs:
            self.count -= 1
            if self.by_tensor.get(r.tensor_id) is r:
                del self.by_tensor[r.tensor_id]

    def _shrink(self) -> None:
        for key in list(self.by_key):
            self.live(key)
        while self.count > MAX_ALIASES * 3 // 4 and self.by_key:
            key = next(iter(self.by_key))
            self.count -= len(self.by_key.pop(key))
        self.by_tensor = {r.tensor_id: r for recs in self.by_key.values() for r in recs if not r.to_numpy}


def forward_tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    """The tensors among a forward's arguments, directly or one container deep, bounded."""
    values: list[Any] = list(args[:_SCAN_ITEMS])
    if kwargs:
        values.extend(list(kwargs.values())[:_SCAN_ITEMS])
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (item for item in value[:_SCAN_ITEMS] if isinstance(item, torch.Tensor))
        elif isinstance(value, dict):
            for n, item in enumerate(value.values()):
                if n >= _SCAN_ITEMS:
                    break
                if isinstance(item, torch.Tensor):
                    yield item


_DTYPES: dict[np.dtype, torch.dtype] = {}


def torch_dtype(dtype: np.dtype) -> torch.dtype | None:
    """The dtype ``torch.from_numpy`` gives an array of this numpy dtype."""
    known = _DTYPES.get(dtype)
    if known is None:
        from gradguard.sources.numpy import original

        try:
            known = _DTYPES[dtype] = original("from_numpy")(np.empty(0, dtype)).dtype
        except (TypeError, RuntimeError):
            return None
    return known


def parameter_at(named: list[tuple[str, torch.nn.Parameter]], ptr: int, shape: tuple[int, ...]) -> str | None:
    """The name of the CPU parameter whose memory starts at ``ptr`` with this shape, if any."""
    for name, p in named:
        if p.device.type == "cpu" and p.data_ptr() == ptr and tuple(p.shape) == tuple(shape):
            return name
    return None
