"""GG501 numpy-alias-mutated.

``torch.from_numpy``, ``torch.as_tensor`` and ``Tensor.numpy`` are C functions with no hook,
so while a guard with this detector is attached they are replaced by thin Python wrappers
that call the original and tell the detector about the alias just made. The wrappers are
reference-counted: two guards may attach at once, and the originals are put back exactly
when the last one detaches.
"""

from __future__ import annotations

import functools
import os
import sys
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator
from types import CodeType, FrameType
from typing import Any

import numpy as np
import torch

from gradguard._frames import _display_path, _is_library_file, frame_variables, user_frame, user_location
from gradguard.detector import Detector, Findings
from gradguard.findings import Finding, Location

# ---------------------------------------------------------------------- the patch
#: Called as ``listener(array, tensor, how, frame)`` for each alias made by user code.
Listener = Callable[[np.ndarray, torch.Tensor, str, FrameType], None]

_listeners: list[Listener] = []
_originals: dict[str, Any] = {}
_owned: dict[str, bool] = {}  # whether the attribute was in the class's or module's own dict
_fork_hook_registered = False


def _notify(array: np.ndarray, tensor: torch.Tensor, how: str) -> None:
    frame = sys._getframe(2)  # whoever called the wrapper
    if _is_library_file(frame.f_code.co_filename):
        return  # torch itself (DataLoader collation, Tensor.__array__), gradguard, a framework
    for listener in list(_listeners):
        listener(array, tensor, how, frame)


# Each wrapper holds its original in a closure, so that a reference kept past detach (say,
# ``from torch import from_numpy`` while attached) still works, as the plain function.
def _wrap_from_numpy(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def from_numpy(ndarray: Any) -> torch.Tensor:
        tensor = original(ndarray)
        if _listeners:
            _notify(ndarray, tensor, "torch.from_numpy")
        return tensor

    return from_numpy


def _wrap_as_tensor(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def as_tensor(*args: Any, **kwargs: Any) -> torch.Tensor:
        tensor = original(*args, **kwargs)
        if _listeners:
            data = args[0] if args else kwargs.get("data")
            if isinstance(data, np.ndarray):
                _notify(data, tensor, "torch.as_tensor")
        return tensor

    return as_tensor


def _wrap_numpy(original: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def numpy(self: torch.Tensor, *args: Any, **kwargs: Any) -> np.ndarray:
        array = original(self, *args, **kwargs)
        if _listeners:
            _notify(array, self, "Tensor.numpy")
        return array

    return numpy


def _clear_in_child() -> None:
    _listeners.clear()  # a forked DataLoader worker reports nothing: nobody would see it


def _targets() -> tuple[tuple[Any, str, Callable[[Any], Callable[..., Any]]], ...]:
    return (
        (torch, "from_numpy", _wrap_from_numpy),
        (torch, "as_tensor", _wrap_as_tensor),
        (torch.Tensor, "numpy", _wrap_numpy),
    )


def _subscribe(listener: Listener) -> None:
    """Install the wrappers (on the first subscriber) and add a listener."""
    global _fork_hook_registered
    if not _originals:
        for owner, name, wrap in _targets():
            _originals[name] = getattr(owner, name)
            _owned[name] = name in vars(owner)  # torch.Tensor inherits numpy from TensorBase
            setattr(owner, name, functools.wraps(_originals[name])(wrap(_originals[name])))
        if not _fork_hook_registered and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_clear_in_child)
            _fork_hook_registered = True
    _listeners.append(listener)


def _unsubscribe(listener: Listener) -> None:
    """Remove a listener; put the originals back exactly when none is left."""
    if listener in _listeners:
        _listeners.remove(listener)
    if _listeners or not _originals:
        return
    for owner, name, _wrap in _targets():
        current = vars(owner).get(name)
        if getattr(current, "__wrapped__", None) is not _originals[name]:
            continue  # someone wrapped ours since: leave their wrapper (it calls ours, now inert)
        if _owned[name]:
            setattr(owner, name, _originals[name])
        else:
            delattr(owner, name)
    _originals.clear()
    _owned.clear()


def patched() -> bool:
    """Whether the alias-tracking wrappers are installed right now.

    >>> patched()
    False
    """
    return bool(_originals)


# ---------------------------------------------------------------------- tracking
_MAX_ALIASES = 10_000  # aliases tracked at once; dead ones are dropped first, then the oldest
_PER_MEMORY = 16  # aliases of one memory tracked at once (the most recent)
_MAX_WRITTEN = 1_024
_FULL_BYTES = 4_096  # arrays up to this size are checksummed whole
_SAMPLES = 256  # larger ones: this many evenly spaced elements
_SCAN_ITEMS = 32  # forward arguments looked at, and items per list/tuple/dict among them
_SCAN_CONTAINER = 10_000  # longest list searched for a variable name (only when reporting)


Key = tuple[int, tuple[int, ...], tuple[int, ...], np.dtype]
Site = tuple[CodeType, int]


def _checksum(array: np.ndarray) -> int:
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


_DTYPES: dict[np.dtype, torch.dtype] = {}


def _torch_dtype(dtype: np.dtype) -> torch.dtype | None:
    """The dtype ``torch.from_numpy`` gives an array of this numpy dtype."""
    known = _DTYPES.get(dtype)
    if known is None:
        try:
            known = _DTYPES[dtype] = _originals.get("from_numpy", torch.from_numpy)(np.empty(0, dtype)).dtype
        except (TypeError, RuntimeError):
            return None
    return known


def _owner(array: np.ndarray) -> np.ndarray:
    """The ndarray that owns the memory a view looks at."""
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root


class _Alias:
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

    def __init__(self, array: np.ndarray, tensor: torch.Tensor, how: str, site: Site, key: Key, checksum: int) -> None:
        self.array_ref = weakref.ref(array)
        if how == "Tensor.numpy" and isinstance(array.base, torch.Tensor):
            tensor = array.base  # the array keeps this one alive; it shares the version counter
        self.tensor_ref = weakref.ref(tensor)
        self.tensor_id = id(tensor)
        self.how = how
        self.site = site
        self.key = key
        self.checksum = checksum
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

    def changed(self, checksum: int) -> bool:
        """Whether the shared memory changed since the alias was made (on either side)."""
        tensor = self.tensor_ref()
        return checksum != self.checksum or (tensor is not None and tensor._version != self.version)


class _Written:
    """Memory that an in-place op on a ``from_numpy`` tensor rewrote, as last seen."""

    __slots__ = ("checksum", "how", "owner_ref", "seen_at", "site")

    def __init__(self, owner: np.ndarray, checksum: int, site: Site, how: str, seen_at: Location | None) -> None:
        self.owner_ref = weakref.ref(owner)
        self.checksum = checksum
        self.site = site
        self.how = how
        self.seen_at = seen_at


class NumpyAliasMutated(Detector):
    """GG501 numpy-alias-mutated: a tensor and a numpy array share memory, and one side changed under the other.

    **What it detects.** ``torch.from_numpy(a)``, ``torch.as_tensor(a)`` (a CPU ndarray
    with no dtype change) and ``t.numpy()`` make no copy: the tensor and the array are two
    views of one memory. gradguard records each alias your code makes (weak references to
    both sides, the line that made it, the tensor's version counter and a checksum of the
    bytes) and reports an alias *used* after the other side changed:

    - **a buffer refilled and aliased again**: a line makes another alias of the same
      memory while an alias that *the same line* made earlier is still alive and the bytes
      have changed since, and that earlier alias is still alive at the next optimizer step
      or the next alias of that memory (so a variable simply rebound, ``x =
      torch.from_numpy(buf)`` in a loop, is fine). It covers the loader that refills one
      array for every sample and keeps the tensors in a list, and a list of
      ``p.detach().numpy()`` "snapshots" of a parameter that the optimizer keeps updating;
    - **a stale tensor used**: such an earlier tensor enters a watched model's forward;
    - **an array rewritten in place through its tensor**: an in-place op on a
      ``from_numpy`` tensor (``x.sub_(mean)``) changed the caller's array (seen when the
      tensor, or a view of it, enters a forward), and the same line then reads that array
      again, still holding the rewritten values (the next epoch normalises it again).

    Calls made by torch itself (``DataLoader`` collation, ``Tensor.__array__``) are not
    tracked: their tensors are stacked into fresh memory.

    **Why it matters.** Nothing fails: every tensor of the dataset list becomes the last
    sample, every entry of the weight history is the current weight, the data is
    normalised twice. Training runs on wrong numbers, and the plots look plausible.

    **How to fix it.** Copy where you need a snapshot: ``torch.from_numpy(buf.copy())`` or
    ``torch.tensor(buf)``; ``p.detach().numpy().copy()`` or ``p.detach().clone()``; and
    normalise out of place, ``x = (x - mean) / std``.

    **Example.**

    .. code-block:: python

        buf = np.empty(784, dtype=np.float32)
        data = []
        for path in files:
            buf[:] = load(path)
            data.append(torch.from_numpy(buf))   # GG501: every entry is the last sample
            # fix: data.append(torch.from_numpy(buf.copy()))

    **Cost and limits.** The three functions are wrapped only while attached (about a
    microsecond per call from your code, a few more when the alias is recorded); checksums
    read at most 4 KiB or 256 sampled elements; at most 10,000 aliases are tracked, the
    oldest dropped first. A write that touches none of the sampled elements of a large
    array goes unseen, and so does a function imported with ``from torch import
    from_numpy`` before the guard attached.
    """

    code = "GG501"
    name = "numpy-alias-mutated"
    hint = "Copy when you need a snapshot: torch.from_numpy(a.copy()) or torch.tensor(a); t.numpy().copy()"
    events = frozenset({"forward", "step", "close"})
    state_fields = ("aliases_seen", "flagged")

    def setup(self) -> None:
        self.aliases_seen = 0
        self.flagged = 0
        self._by_key: dict[Key, list[_Alias]] = {}
        self._by_tensor: dict[int, _Alias] = {}
        self._count = 0
        self._suspects: list[_Alias] = []
        self._written: dict[Key, _Written] = {}
        self._site_names: dict[Site, tuple[str | None, str | None]] = {}
        self._param_names: dict[int, str | None] = {}
        self._listener: Listener | None = self.guarded(self._on_alias)
        _subscribe(self._listener)

    def teardown(self) -> None:
        if self._listener is not None:
            _unsubscribe(self._listener)
            self._listener = None
        self._by_key.clear()
        self._by_tensor.clear()
        self._suspects.clear()
        self._written.clear()
        self._site_names.clear()
        self._param_names.clear()
        self._count = 0

    def report(self) -> dict[str, Any]:
        return {"aliases_seen": self.aliases_seen, "tracked": self._count, "flagged": self.flagged}

    # ---------------------------------------------------------------- aliases
    def _on_alias(self, array: np.ndarray, tensor: torch.Tensor, how: str, frame: FrameType) -> Findings:
        if array.size == 0:
            return None
        ptr = tensor.data_ptr()
        if how == "Tensor.numpy":
            base = array.base
            if not isinstance(base, torch.Tensor) or base.data_ptr() != ptr:
                return None  # numpy(force=True) copied
        elif how == "torch.as_tensor" and (not tensor.is_cpu or tensor.dtype != _torch_dtype(array.dtype)):
            return None  # converted to another dtype or device: a copy
        self.aliases_seen += 1
        key: Key = (ptr, array.shape, array.strides, array.dtype)
        checksum = _checksum(array)
        site: Site = (frame.f_code, frame.f_lineno)
        out: list[Finding] = []
        older = self._live(key)
        for rec in older:
            if rec.suspect is not None and not rec.reported:
                out.append(self._kept_alias(rec))  # survived until this alias: kept, not rebound
        for rec in older:
            if rec.site != site or rec.reported:
                continue
            rec.again = site
            if rec.suspect is None and rec.changed(checksum):
                rec.suspect = (site, *self._names(frame, rec, array))
                self._suspects.append(rec)
        if len(self._suspects) > _MAX_ALIASES:
            del self._suspects[: len(self._suspects) - _MAX_ALIASES]
        if how != "Tensor.numpy":
            written = self._written.get(key)
            if written is not None and written.site == site and written.checksum == checksum:
                if written.owner_ref() is _owner(array):
                    out.append(self._rewritten(written, array, frame))
                else:
                    del self._written[key]
        self._add(_Alias(array, tensor, how, site, key, checksum))
        return out

    def _live(self, key: Key) -> list[_Alias]:
        """The aliases of this memory still alive and not reported yet, oldest first."""
        recs = self._by_key.get(key)
        if not recs:
            return []
        keep = [r for r in recs if not r.reported and r.product() is not None]
        if len(keep) != len(recs):
            self._forget(r for r in recs if r.reported or r.product() is None)
            if keep:
                self._by_key[key] = keep
            else:
                del self._by_key[key]
        return keep

    def _forget(self, recs: Iterable[_Alias]) -> None:
        for r in recs:
            self._count -= 1
            if self._by_tensor.get(r.tensor_id) is r:
                del self._by_tensor[r.tensor_id]

    def _add(self, rec: _Alias) -> None:
        recs = self._by_key.pop(rec.key, None) or []
        recs.append(rec)
        if len(recs) > _PER_MEMORY:
            self._forget(recs[:-_PER_MEMORY])
            del recs[:-_PER_MEMORY]
        self._by_key[rec.key] = recs  # most recently used memory last
        self._count += 1
        if not rec.to_numpy:
            self._by_tensor[rec.tensor_id] = rec
        if self._count > _MAX_ALIASES:
            self._shrink()

    def _shrink(self) -> None:
        for key in list(self._by_key):
            self._live(key)
        while self._count > _MAX_ALIASES * 3 // 4 and self._by_key:
            key = next(iter(self._by_key))
            self._count -= len(self._by_key.pop(key))
        self._by_tensor = {r.tensor_id: r for recs in self._by_key.values() for r in recs if not r.to_numpy}

    # ---------------------------------------------------------------- events
    def on_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Findings:
        if not self._by_tensor:
            return None
        out: list[Finding] = []
        for tensor in _tensors(args, kwargs):
            rec = self._by_tensor.get(id(tensor))
            if rec is None or rec.tensor_ref() is not tensor:
                base = tensor._base
                if base is None:
                    continue
                rec = self._by_tensor.get(id(base))
                if rec is None or rec.tensor_ref() is not base:
                    continue
                tensor = base
            array = rec.array_ref()
            if array is None or rec.reported:
                continue
            if tensor._version != rec.version:
                # the torch side wrote to the array: remember what it left there
                checksum = _checksum(array)
                rec.version, rec.checksum = tensor._version, checksum
                self._remember_written(rec, array, checksum)
            elif rec.again is not None and _checksum(array) != rec.checksum:
                out.append(self._stale_used(rec, module))
        return out

    def on_step(self) -> Findings:
        if not self._suspects:
            return None
        out = [self._kept_alias(r) for r in self._suspects if not r.reported and r.product() is not None]
        self._suspects.clear()  # the others died before the step: a variable rebound, not a bug
        return out

    def on_close(self) -> Findings:
        self._suspects.clear()  # nothing used them after the change: no evidence of a bug
        return None

    def _remember_written(self, rec: _Alias, array: np.ndarray, checksum: int) -> None:
        self._written.pop(rec.key, None)
        self._written[rec.key] = _Written(_owner(array), checksum, rec.site, rec.how, user_location())
        if len(self._written) > _MAX_WRITTEN:
            del self._written[next(iter(self._written))]

    # ---------------------------------------------------------------- findings
    def _kept_alias(self, rec: _Alias) -> Finding:
        rec.reported = True
        self.flagged += 1
        again, variable, container = rec.suspect or (rec.site, None, None)
        created, made_again = _location(rec.site), _location(again)
        array = rec.array_ref()
        what = _describe(array)
        held = f" (in {container})" if container else ""
        if rec.to_numpy:
            param = self._param_name(rec)
            subject = param or f"a tensor {what}"
            where = param or container or what
            message = (
                f".numpy() of {subject} made another view of its memory while an array this line made "
                f"earlier is still alive{held}, and {subject} was changed in place since (an optimizer step "
                "or an in-place op): that array shows the current values, not a snapshot"
            )
            hint = "Take a real snapshot: p.detach().numpy().copy() (or p.detach().clone())"
        else:
            name = variable or what
            where = name
            message = (
                f"{rec.how}({name}) made another tensor from the same memory while a tensor this line made "
                f"earlier is still alive{held}, and {name} was overwritten since: that tensor now holds the "
                "new values, not the ones it was made from"
            )
            hint = f"Copy the buffer when making the tensor: {rec.how}({variable or 'a'}.copy()) or torch.tensor(...)"
        return self.finding(
            message,
            where=where,
            location=made_again,
            hint=hint,
            data={
                "kind": "kept-alias",
                "how": rec.how,
                "created_at": str(created),
                "made_again_at": str(made_again),
                "variable": variable,
                "container": container,
                "array": what,
            },
        )

    def _stale_used(self, rec: _Alias, module: torch.nn.Module) -> Finding:
        rec.reported = True
        self.flagged += 1
        frame = user_frame()
        location = None if frame is None else _frame_location(frame)
        array = rec.array_ref()
        tensor = rec.tensor_ref()
        what = _describe(array)
        variable = _name_of(frame, (array, tensor)) if frame is not None else None
        created = _location(rec.site)
        made_again = _location(rec.again) if rec.again is not None else None
        return self.finding(
            f"a tensor made by {rec.how}({variable or what}) at {created} enters {type(module).__name__}.forward, "
            f"but that memory was overwritten and aliased again at {made_again} since: the model reads the new "
            "values, not the ones the tensor was made from",
            where=variable or what,
            location=location,
            hint=f"Copy the buffer when making the tensor: {rec.how}({variable or 'a'}.copy()) or torch.tensor(...)",
            data={
                "kind": "stale-tensor-used",
                "how": rec.how,
                "created_at": str(created),
                "made_again_at": str(made_again),
                "variable": variable,
                "array": what,
            },
        )

    def _rewritten(self, written: _Written, array: np.ndarray, frame: FrameType) -> Finding:
        self.flagged += 1
        location = _frame_location(frame)
        variable = _name_of(frame, (array,))
        what = _describe(array)
        created = _location(written.site)
        seen = f" (the change was seen at {written.seen_at})" if written.seen_at is not None else ""
        name = variable or what
        return self.finding(
            f"{written.how}({name}) reads {name} again, but an in-place op on the tensor this line made from "
            f"it before rewrote it{seen}: the tensor shares its memory, so {name} no longer holds its original "
            "values and is transformed again",
            where=name,
            location=location,
            hint="Transform out of place (x = (x - mean) / std) or copy first: torch.tensor(a) or a.copy()",
            data={
                "kind": "rewritten-in-place",
                "created_at": str(created),
                "changed_at": str(written.seen_at) if written.seen_at is not None else None,
                "variable": variable,
                "array": what,
            },
        )

    def _names(self, frame: FrameType, rec: _Alias, array: np.ndarray) -> tuple[str | None, str | None]:
        """The variable holding the array just aliased, and the one holding the earlier alias.

        Looked up once per line: a loop that keeps every alias would otherwise search its
        growing list again at each iteration.
        """
        names = self._site_names.get(rec.site)
        if names is None:
            variable = None if rec.to_numpy else _name_of(frame, (array,))
            names = (variable, _name_of(frame, (rec.product(),)))
            if len(self._site_names) >= _MAX_WRITTEN:
                self._site_names.clear()
            self._site_names[rec.site] = names
        return names

    def _param_name(self, rec: _Alias) -> str | None:
        ptr, shape = rec.key[0], rec.key[1]
        if ptr in self._param_names:
            return self._param_names[ptr]
        found = None
        for model in self.guard.models():
            for name, p in model.named_parameters():
                if p.device.type == "cpu" and p.data_ptr() == ptr and p.shape == shape:
                    found = name
                    break
        if len(self._param_names) >= _MAX_WRITTEN:
            self._param_names.clear()
        self._param_names[ptr] = found
        return found


# ---------------------------------------------------------------------- helpers
def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    """The tensors among a forward's arguments, directly or one container deep, bounded."""
    values: list[Any] = list(args[:_SCAN_ITEMS])
    if kwargs:
        values.extend(list(kwargs.values())[:_SCAN_ITEMS])
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value[:_SCAN_ITEMS]:
                if isinstance(item, torch.Tensor):
                    yield item
        elif isinstance(value, dict):
            for n, item in enumerate(value.values()):
                if n >= _SCAN_ITEMS:
                    break
                if isinstance(item, torch.Tensor):
                    yield item


def _name_of(frame: FrameType | None, targets: tuple[Any, ...]) -> str | None:
    """The name of a variable of ``frame`` bound to one of ``targets``, or to a container holding one."""
    if frame is None:
        return None
    wanted = [t for t in targets if t is not None]
    if not wanted:
        return None
    names = dict(frame_variables(frame))
    for name, value in names.items():
        if any(value is t for t in wanted):
            return name
    owner = names.get("self")
    attrs = getattr(owner, "__dict__", None)
    if isinstance(attrs, dict):
        for name, value in attrs.items():
            if any(value is t for t in wanted):
                return f"self.{name}"
    for name, value in names.items():
        if isinstance(value, (list, tuple)) and len(value) <= _SCAN_CONTAINER:
            items: Any = value
        elif isinstance(value, dict) and len(value) <= _SCAN_CONTAINER:
            items = value.values()
        else:
            continue
        if any(item is t for item in items for t in wanted):
            return name
    return None


def _describe(array: np.ndarray | None) -> str:
    if array is None:
        return "<ndarray>"
    return f"<ndarray {array.dtype} {tuple(array.shape)}>"


def _location(site: Site) -> Location:
    code, line = site
    return Location(_display_path(code.co_filename), line, code.co_name)


def _frame_location(frame: FrameType) -> Location:
    return Location(_display_path(frame.f_code.co_filename), frame.f_lineno, frame.f_code.co_name)
