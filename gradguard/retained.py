"""GG201's findings by place: new, seen again, or waiting for the shape of the loop.

Findings made between model calls with no ``backward()`` (an evaluation loop, or a
rollout) wait for the next ``backward()``; training findings made before any optimizer
step wait until enough ``backward()`` calls show that none comes. A place reported once is
counted again at each later epoch, never reported twice.

Example:
    >>> from gradguard.findings import Finding, Severity
    >>> f = Finding("GG201", "graph-retained", Severity.WARNING, "held", where="x",
    ...             data={"last_step": 3, "steps_spanned": 3})
    >>> places = RetainedPlaces()
    >>> places.deliver([(("x",), f)], "group", hold=True), places.release("group") == [f]
    ([], True)
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch

from gradguard.findings import Finding
from gradguard.retention import Place, Span

Key = tuple[Any, ...]


class RetainedPlaces:
    """The places reported, those waiting (per clock), and the longest history each held."""

    def __init__(self) -> None:
        self.reported: dict[Key, Finding] = {}
        self.pending: dict[str, dict[Key, Finding]] = {"group": {}, "round": {}}
        self.max_spans: dict[Key, int] = {}
        self._seen: dict[tuple[str, Key], int] = {}  # the last epoch each place was counted at
        self.new_places = 0  # places reported so far
        # (clock, place) -> span, the look it was seen at, backward() calls by then
        self._previous: dict[tuple[str, Key], tuple[Span, int, int]] = {}

    def known(self, key: Key, clock: str) -> bool:
        return key in self.reported or key in self.pending[clock]

    def growing(self, places: list[Place], clock: str, look: int, backwards: int, gap: int) -> list[Place]:
        """The places of a look to report: those known, seen again, and those whose history grew.

        A state fed back into the model is reported at that call, under its own name; what is
        computed from it (the output of the call) is not reported again. Only a value that
        holds the stamps of several epochs, more at each look (within ``gap`` looks for an
        attribute of a rotating sample of modules), is a new place. Between model calls
        (``clock == "group"``) only growth with no ``backward()`` in between counts: what
        training adds between two evaluation loops is the training clock's.
        """
        out = []
        for place in places:
            span, key = place.span, (clock, place.key)
            before = self._previous.get(key)
            self._previous[key] = (span, look, backwards)
            if self.known(place.key, clock):
                if span.epochs >= 2:  # seen again: count it
                    self.spanned(place.key, span.epochs)
                    out.append(place)
                continue
            within = look - before[1] <= (gap if place.kind == "attribute" else 1) if before is not None else False
            same_phase = clock == "round" or (before is not None and before[2] == backwards)
            if before is not None and within and same_phase and span.outgrows(before[0]):
                out.append(place)
        if len(self._previous) > 4096:
            self._previous = {k: v for k, v in self._previous.items() if look - v[1] <= 64}
        return out

    def spanned(self, key: Key, epochs: int) -> None:
        self.max_spans[key] = max(self.max_spans.get(key, 0), epochs)

    def deliver(self, findings: list[tuple[Key, Finding]], clock: str, *, hold: bool) -> list[Finding]:
        """Record findings; a new place's waits if ``hold``; a place seen again at a later epoch counts once more."""
        out = []
        pending = self.pending[clock]
        for key, f in findings:
            latest = f.data["last_step"]
            if self._seen.get((clock, key), -1) >= latest:
                continue  # already counted for this epoch (at the model call, then at the step)
            self._seen[(clock, key)] = latest
            self.spanned(key, f.data["steps_spanned"])
            if key in self.reported:
                out.append(dataclasses.replace(self.reported[key], count=1))
            elif hold:
                known = pending.get(key)
                pending[key] = f if known is None else dataclasses.replace(known, count=known.count + 1)
            else:
                self.reported[key] = f
                self.new_places += 1
                out.append(f)
        return out

    def release(self, clock: str) -> list[Finding]:
        """Publish the findings of ``clock`` that waited for the shape of the loop."""
        out = [f for key, f in self.pending[clock].items() if key not in self.reported]
        for key, f in self.pending[clock].items():
            self.reported.setdefault(key, f)
        self.pending[clock].clear()
        self.new_places += len(out)
        return out

    def report(self) -> list[dict[str, Any]]:
        return [
            {
                "where": f.where,
                "location": f.location.to_dict() if f.location is not None else None,
                "max_steps_spanned": self.max_spans.get(key, f.data.get("steps_spanned", 0)),
                "unit": f.data.get("unit", "step"),
            }
            for key, f in self.reported.items()
        ]

    def clear(self) -> None:
        self._seen.clear()
        self._previous.clear()
        for pending in self.pending.values():
            pending.clear()


class Rounds:
    """Optimizer steps in rounds: a round ends when every optimizer that steps has stepped once.

    A GAN's discriminator and generator steps make one round, so its generator output
    reused within the iteration is not history. An optimizer that did not step in
    ``stale`` step() calls no longer holds a round open.
    """

    def __init__(self, stale: int = 16) -> None:
        self.calls = 0  # step() calls seen
        self._stale = stale
        self._stepped: set[int] = set()
        self._optimizers: dict[int, tuple[weakref.ref[torch.optim.Optimizer], list[int]]] = {}

    def register(self, optimizer: torch.optim.Optimizer) -> list[int]:
        """Know of an optimizer (it holds rounds open from now); its last step() call, in a list."""
        rec = self._optimizers.get(id(optimizer))
        if rec is None or rec[0]() is not optimizer:
            rec = self._optimizers[id(optimizer)] = (weakref.ref(optimizer), [self.calls])
        return rec[1]

    def stepped(self, optimizer: torch.optim.Optimizer) -> bool:
        """A step() returned; whether it ended a round."""
        self.calls += 1
        self.register(optimizer)[0] = self.calls
        self._stepped.add(id(optimizer))
        for key in [k for k, (ref, _) in self._optimizers.items() if ref() is None]:
            del self._optimizers[key]
        active = [k for k, (_, last) in self._optimizers.items() if self.calls - last[0] <= self._stale]
        if not all(k in self._stepped for k in active):
            return False  # another optimizer has yet to step in this round
        self._stepped = set()
        return True

    def clear(self) -> None:
        self._optimizers.clear()
        self._stepped.clear()
