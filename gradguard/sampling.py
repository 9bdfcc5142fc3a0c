"""The per-step budget of per-parameter checks: a rotating sample with scheduled full sweeps.

gradguard's work per step must not grow with the model. Checks that look at parameters
one by one (a version counter, whether a gradient arrived, an attribute) therefore look at
*every* parameter only during the first ``warmup`` ticks (steps) and at every
``sweep_every``-th tick; on other ticks they look at a rotating sample of ``per_group``
tensors from each of at most ``max_groups`` groups (an optimizer's param groups, a model's
parameters). Every tensor is looked at within :meth:`Budget.coverage` ticks, so a mistake
that persists is still found, a few steps later than with a full sweep every step.

Example:
    >>> budget = Budget(per_group=2, warmup=1, sweep_every=0)
    >>> rot = Rotation(budget)
    >>> groups = [["a", "b", "c", "d", "e"], ["x"]]
    >>> [rot.select(groups, tick) for tick in range(1, 5)]
    [['a', 'b', 'c', 'd', 'e', 'x'], ['a', 'b', 'x'], ['c', 'd', 'x'], ['e', 'a', 'x']]
    >>> budget.coverage([5, 1])
    3
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TypeVar

from gradguard.errors import ConfigurationError

T = TypeVar("T")

#: Ticks (steps) at the start of a run during which every tensor is checked at every tick.
WARMUP = 32
#: Tensors per group checked at a tick after the warm-up.
PER_GROUP = 4
#: Groups visited at a tick; more groups are visited in turn.
MAX_GROUPS = 8
#: Every this many ticks, every tensor is checked (0: never after the warm-up).
SWEEP_EVERY = 256


@dataclasses.dataclass(frozen=True)
class Budget:
    """How many parameter tensors a per-parameter check may look at per step.

    Args:
        per_group: tensors per group per tick after the warm-up; ``None`` checks every
            tensor at every tick (a cost that grows with the model: for small models and
            debugging only).
        max_groups: groups visited per tick; more groups are visited in turn.
        warmup: ticks at the start during which every tensor is checked.
        sweep_every: every this many ticks every tensor is checked; 0 for never.
    """

    per_group: int | None = PER_GROUP
    max_groups: int = MAX_GROUPS
    warmup: int = WARMUP
    sweep_every: int = SWEEP_EVERY

    def __post_init__(self) -> None:
        if self.per_group is not None and not _int_at_least(self.per_group, 1):
            raise ConfigurationError(f"Expected per_group to be a positive int or None but got {self.per_group!r}")
        if not _int_at_least(self.max_groups, 1):
            raise ConfigurationError(f"Expected max_groups to be a positive int but got {self.max_groups!r}")
        if not _int_at_least(self.warmup, 0) or self.warmup > WARMUP:
            raise ConfigurationError(f"Expected warmup to be an int from 0 to {WARMUP} but got {self.warmup!r}")
        if not _int_at_least(self.sweep_every, 0):
            raise ConfigurationError(f"Expected sweep_every to be an int >= 0 but got {self.sweep_every!r}")

    @classmethod
    def of(cls, value: Budget | int | None) -> Budget:
        """A budget from what ``Guard(budget=...)`` accepts: a Budget, tensors per group, or None."""
        if isinstance(value, Budget):
            return value
        if value is None:
            return cls(per_group=None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return cls(per_group=value)
        raise ConfigurationError(
            f"Expected budget to be a positive int (tensors per param group per step), None or a "
            f"gradguard.Budget but got {value!r}"
        )

    def wide(self) -> Budget:
        """The same number of tensors per tick, taken from one group (a model's parameter list)."""
        if self.per_group is None:
            return self
        return dataclasses.replace(self, per_group=self.per_group * self.max_groups, max_groups=1)

    def full(self, tick: int) -> bool:
        """Whether every tensor is checked at this tick."""
        if self.per_group is None or tick <= self.warmup:
            return True
        return bool(self.sweep_every) and tick % self.sweep_every == 0

    def coverage(self, sizes: Sequence[int], dwell: int = 1) -> int:
        """Ticks after the warm-up within which every tensor of groups of these sizes is checked."""
        if self.per_group is None or not sizes:
            return dwell
        rounds = math.ceil(len(sizes) / self.max_groups)
        return dwell * rounds * max(math.ceil(n / self.per_group) for n in sizes)


class Rotation:
    """Chooses, tick after tick, which items of a few groups to check.

    ``dwell`` keeps each sample for that many ticks (a check that must watch the same
    tensors over a window of steps). Sweeps apply only with ``dwell == 1``.
    """

    def __init__(self, budget: Budget, dwell: int = 1) -> None:
        if not _int_at_least(dwell, 1):
            raise ConfigurationError(f"Expected dwell to be a positive int but got {dwell!r}")
        self.budget = budget
        self.dwell = dwell
        self._phase = -1
        self._group_turn = 0
        self._cursors: dict[int, int] = {}
        self._last: tuple[int, int, list[tuple[int, int]]] | None = None

    def select(self, groups: Sequence[Sequence[T]], tick: int) -> list[T]:
        """The items to check at ``tick`` (the same list for the same tick and groups)."""
        return [item for _, item in self.pairs(groups, tick)]

    def pairs(self, groups: Sequence[Sequence[T]], tick: int) -> list[tuple[int, T]]:
        """Like :meth:`select`, with the index of each item's group."""
        budget = self.budget
        if budget.per_group is None or tick <= budget.warmup or (self.dwell == 1 and budget.full(tick)):
            return [(gi, item) for gi, group in enumerate(groups) for item in group]
        phase = (tick - budget.warmup - 1) // self.dwell
        key = sum(len(g) for g in groups) * 1_000_003 + len(groups)
        if self._last is not None and self._last[0] == phase and self._last[1] == key:
            return [(gi, groups[gi][j]) for gi, j in self._last[2]]
        advance = phase != self._phase
        self._phase = phase
        indices: list[int] | range = range(len(groups))
        if len(groups) > budget.max_groups:
            start = self._group_turn % len(groups)
            indices = [(start + i) % len(groups) for i in range(budget.max_groups)]
            if advance:
                self._group_turn = start + budget.max_groups
        chosen: list[tuple[int, int]] = []  # (group, index): the sample, kept without holding its items
        k = budget.per_group
        for gi in indices:
            n = len(groups[gi])
            if n <= k:
                chosen.extend((gi, j) for j in range(n))
                continue
            gid = id(groups[gi])
            cursor = self._cursors.get(gid, 0) % n
            chosen.extend((gi, (cursor + i) % n) for i in range(k))
            if advance:
                self._cursors[gid] = (cursor + k) % n
        if len(self._cursors) > 4096:
            self._cursors.clear()
        self._last = (phase, key, chosen)
        return [(gi, groups[gi][j]) for gi, j in chosen]


def _int_at_least(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low
