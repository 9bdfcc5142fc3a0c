"""GG501 numpy-alias-mutated."""

from __future__ import annotations

from types import FrameType
from typing import Any

import numpy as np
import torch

from gradguard import aliases
from gradguard.aliases import Alias, AliasTable, Key, Site, Written
from gradguard.detector import Detector, Findings, on
from gradguard.events import Close, ForwardPre, NumpyAlias, StepEnd
from gradguard.findings import Finding
from gradguard.introspect.frames import frame_location, user_frame, user_location
from gradguard.introspect.naming import name_in_frame

_MAX_WRITTEN = 1_024


class NumpyAliasMutated(Detector):
    """GG501 numpy-alias-mutated: a tensor and a numpy array share memory, and one side changed under the other.

    **What it detects.** `torch.from_numpy(a)`, `torch.as_tensor(a)`, the legacy
    `torch.Tensor(a)`, `torch.FloatTensor(a)`, `LongTensor(a)`... (with no dtype change:
    `float32` for `torch.Tensor`) and `t.numpy()` make no copy: the tensor and the array
    are two views of one memory. gradguard records each alias your code makes (weak references
    to both sides, the line that made it, the tensor's version counter and a checksum of the
    bytes) and reports an alias *used* after the other side changed:

    - **a buffer refilled and aliased again**: a line makes another alias of the same
      memory while an alias that *the same line* made earlier is still alive and the bytes
      have changed since, and that earlier alias is still alive at the next optimizer step
      or the next alias of that memory (so a variable simply rebound,
      `x = torch.from_numpy(buf)` in a loop, is fine). It covers the loader that refills
      one array for every sample and keeps the tensors in a list, and a list of
      `p.detach().numpy()` "snapshots" of a parameter that the optimizer keeps updating;
    - **a stale tensor used**: such an earlier tensor enters a watched model's forward;
    - **an array rewritten in place through its tensor**: an in-place op on a
      `from_numpy` tensor (`x.sub_(mean)`) changed the caller's array (seen when the
      tensor, or a view of it, enters a forward), and the same line then reads that array
      again, still holding the rewritten values (the next epoch normalises it again).

    Calls made by torch itself (`DataLoader` collation, `Tensor.__array__`) are not
    tracked: their tensors are stacked into fresh memory.

    **Why it matters.** Nothing fails: every tensor of the dataset list becomes the last
    sample, every entry of the weight history is the current weight, the data is
    normalised twice. Training runs on wrong numbers, and the plots look plausible.

    **How to fix it.** Copy where you need a snapshot: `torch.from_numpy(buf.copy())` or
    `torch.tensor(buf)` (not `torch.Tensor`); `p.detach().numpy().copy()` or
    `p.detach().clone()`; and normalise out of place, `x = (x - mean) / std`.

    **Example.**

    ```python
    buf = np.empty(784, dtype=np.float32)
    data = []
    for path in files:
        buf[:] = load(path)
        data.append(torch.from_numpy(buf))   # GG501: every entry is the last sample
        # fix: data.append(torch.from_numpy(buf.copy())); so with torch.Tensor(buf)
    ```

    **Cost and limits.** These calls are wrapped only while attached (a microsecond per call
    from your code, a few more to record an alias; `torch.Tensor` gets an `__init__` that
    tensors made by torch never call, `torch.FloatTensor` and kin stand-ins that answer as
    the originals); checksums read at most 4 KiB or 256 sampled elements; at most 10,000
    aliases are tracked. A write that touches none of the sampled elements of a large array
    goes unseen, and so does a name taken by `from torch import from_numpy` (or
    `FloatTensor`) before the guard attached.
    """

    code = "GG501"
    name = "numpy-alias-mutated"
    hint = "Copy when you need a snapshot: torch.from_numpy(a.copy()) or torch.tensor(a); t.numpy().copy()"
    consumes = (NumpyAlias, ForwardPre, StepEnd, Close)
    state_fields = ("aliases_seen", "flagged")

    def setup(self) -> None:
        self.aliases_seen = 0
        self.flagged = 0
        self._table = AliasTable()
        self._suspects: list[Alias] = []
        self._written: dict[Key, Written] = {}
        self._site_names: dict[Site, tuple[str | None, str | None]] = {}
        self._param_names: dict[int, str | None] = {}
        self.listen(ForwardPre, False)  # until an alias is made
        self.listen(StepEnd, False)  # until an alias is suspected

    def teardown(self) -> None:
        self._table.clear()
        self._suspects.clear()
        self._written.clear()
        self._site_names.clear()
        self._param_names.clear()

    def report(self) -> dict[str, Any]:
        return {"aliases_seen": self.aliases_seen, "tracked": self._table.count, "flagged": self.flagged}

    # ---------------------------------------------------------------- events
    @on(NumpyAlias)
    def _alias(self, event: NumpyAlias) -> Findings:
        array, tensor, how, frame = event.array, event.tensor, event.how, event.frame
        if array.size == 0:
            return None
        if how == "Tensor.numpy":
            base = array.base
            if not isinstance(base, torch.Tensor) or base.data_ptr() != tensor.data_ptr():
                return None  # numpy(force=True) copied
        elif how != "torch.from_numpy" and (not tensor.is_cpu or tensor.dtype != aliases.torch_dtype(array.dtype)):
            return None  # as_tensor, a legacy constructor: converted to another dtype or device, a copy
        self.aliases_seen += 1
        key = aliases.key_of(array, tensor)
        crc = aliases.checksum(array)
        site: Site = (frame.f_code, frame.f_lineno)
        out: list[Finding] = []
        older = self._table.live(key)
        for rec in older:
            if rec.suspect is not None and not rec.reported:
                out.append(self._kept_alias(rec))  # survived until this alias: kept, not rebound
        for rec in older:
            if rec.site != site or rec.reported:
                continue
            rec.again = site
            if rec.suspect is None and rec.changed(crc):
                rec.suspect = (site, *self._names(frame, rec, array))
                self._suspects.append(rec)
        if len(self._suspects) > aliases.MAX_ALIASES:
            del self._suspects[: len(self._suspects) - aliases.MAX_ALIASES]
        if how != "Tensor.numpy":
            written = self._written.get(key)
            if written is not None and written.site == site and written.checksum == crc:
                if written.owner_ref() is aliases.owner(array):
                    out.append(self._rewritten(written, array, frame))
                else:
                    del self._written[key]
        self._table.add(Alias(array, tensor, how, site, key, crc))
        self.listen(ForwardPre, True)
        if self._suspects:
            self.listen(StepEnd, True)
        return out

    @on(ForwardPre)
    def _forward(self, event: ForwardPre) -> Findings:
        if not self._table.by_tensor:
            self.listen(ForwardPre, False)
            return None
        out: list[Finding] = []
        for tensor in aliases.forward_tensors(event.args, event.kwargs):
            found = self._table.of_tensor(tensor)
            if found is None:
                continue
            rec, tensor = found
            array = rec.array_ref()
            if array is None or rec.reported:
                continue
            if tensor._version != rec.version:
                # the torch side wrote to the array: remember what it left there
                crc = aliases.checksum(array)
                rec.version, rec.checksum = tensor._version, crc
                self._written.pop(rec.key, None)
                self._written[rec.key] = Written(aliases.owner(array), crc, rec.site, rec.how, user_location())
                if len(self._written) > _MAX_WRITTEN:
                    del self._written[next(iter(self._written))]
            elif rec.again is not None and aliases.checksum(array) != rec.checksum:
                out.append(self._stale_used(rec, event.module))
        return out

    @on(StepEnd)
    def _step(self, event: StepEnd) -> Findings:
        if not self._suspects:
            return None
        out = [self._kept_alias(r) for r in self._suspects if not r.reported and r.product() is not None]
        self._suspects.clear()  # the others died before the step: a variable rebound, not a bug
        self.listen(StepEnd, False)
        return out

    @on(Close)
    def _close(self, event: Close) -> Findings:
        self._suspects.clear()  # nothing used them after the change: no evidence of a bug
        return None

    # ---------------------------------------------------------------- findings
    def _kept_alias(self, rec: Alias) -> Finding:
        rec.reported = True
        self.flagged += 1
        again, variable, container = rec.suspect or (rec.site, None, None)
        created, made_again = aliases.location(rec.site), aliases.location(again)
        array = rec.array_ref()
        what = aliases.describe(array)
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

    def _stale_used(self, rec: Alias, module: torch.nn.Module) -> Finding:
        rec.reported = True
        self.flagged += 1
        frame = user_frame()
        location = None if frame is None else frame_location(frame)
        array = rec.array_ref()
        tensor = rec.tensor_ref()
        what = aliases.describe(array)
        variable = name_in_frame(frame, array, tensor, containers=True)
        created = aliases.location(rec.site)
        made_again = aliases.location(rec.again) if rec.again is not None else None
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

    def _rewritten(self, written: Written, array: np.ndarray, frame: FrameType) -> Finding:
        self.flagged += 1
        location = frame_location(frame)
        variable = name_in_frame(frame, array, containers=True)
        what = aliases.describe(array)
        created = aliases.location(written.site)
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

    def _names(self, frame: FrameType, rec: Alias, array: np.ndarray) -> tuple[str | None, str | None]:
        """The variables holding the array just aliased and the earlier alias, looked up once per line."""
        names = self._site_names.get(rec.site)
        if names is None:
            variable = None if rec.to_numpy else name_in_frame(frame, array, containers=True)
            names = (variable, name_in_frame(frame, rec.product(), containers=True))
            if len(self._site_names) >= _MAX_WRITTEN:
                self._site_names.clear()
            self._site_names[rec.site] = names
        return names

    def _param_name(self, rec: Alias) -> str | None:
        ptr, shape = rec.key[0], rec.key[1]
        if ptr not in self._param_names:
            if len(self._param_names) >= _MAX_WRITTEN:
                self._param_names.clear()
            self._param_names[ptr] = aliases.parameter_at(self.run.named_parameters(), ptr, shape)
        return self._param_names[ptr]
