"""The processes of a ``gradguard run``: its ranks and its children, and one report of them all.

Under ``torchrun`` (or ``gradguard run`` started once per rank) each process watches its own
part of the run. Rank 0 writes the JSON file asked for; every other rank writes its own
beside it (``r.rank1.json`` for ``--json r.json``), rewritten as findings appear, and under
the ``warn`` policy collects silently, so that a finding is warned once.

When the run ends, each rank other than 0 hands its report to rank 0 through the key-value
store of the default process group: one ``set`` per rank, no collective, nothing on an
accelerator, nothing per step. The store is kept from the moment the program initialises
the group (``init_process_group`` and ``destroy_process_group`` are wrapped while the run
lasts), so it serves after the program destroys the group. Rank 0 waits up to
:data:`GATHER_TIMEOUT_S` for the ranks that run under gradguard (every rank, under
``torchrun``; else those that said so when they joined the group, or wrote their file),
then merges the file of each rank that sent nothing (the only way in a run with no process
group), and says so.

Children (processes started with the ``spawn`` or ``forkserver`` start method, forked
copies) are watched too: see :mod:`gradguard.children`. Each process merges its
children's reports into its own when it ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from gradguard import ranks
from gradguard.findings import Finding
from gradguard.policy import Action, Policy
from gradguard.report import _json_default, write_json_atomic
from gradguard.sampling import PER_GROUP

if TYPE_CHECKING:
    from gradguard.guard import Guard

#: Seconds rank 0 waits, when the run ends, for the reports of the other ranks (the environment
#: variable ``GRADGUARD_GATHER_TIMEOUT`` sets another).
GATHER_TIMEOUT_S = 60.0
_GRACE_S = 2.0  # how long a rank not known to run under gradguard is waited for, and when the wait is told

_session: Session | None = None  # this process's, from the start of the run to its report


@dataclasses.dataclass(frozen=True)
class Options:
    """What a guard of the run is installed with, in the parent and in every child."""

    policy: str = "warn"
    select: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    budget: int | None = PER_GROUP
    #: The JSON report asked for (absolute); the other processes' files are named after it.
    json: str | None = None

    def install(self) -> Guard:
        """Install the process's guard; under ``warn`` only rank 0 of a run of several ranks warns."""
        from gradguard.install import install

        return install(policy=RankZeroPolicy(self.policy, select=self.select, ignore=self.ignore), budget=self.budget)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Options:
        return cls(
            policy=str(data["policy"]),
            select=tuple(data["select"]),
            ignore=tuple(data["ignore"]),
            budget=data["budget"],
            json=data["json"],
        )


class RankZeroPolicy(Policy):
    """A policy under which, in a run of several ranks, only rank 0 warns; the others collect.

    The rank is read when a finding is new, never per step. Raising is kept on every rank.

    >>> RankZeroPolicy("warn", select=("GG1",)).enabled("GG101")
    True
    """

    def apply(self, new: list[Finding], *args: Any, **kwargs: Any) -> None:
        if Action(self.action) is Action.WARN and not _rank_zero():
            return
        super().apply(new, *args, **kwargs)


def _rank_zero() -> bool:
    session = _session
    rank = session.rank() if session is not None else ranks.current()
    return rank is None or rank.world_size < 2 or rank.rank == 0


def current() -> Session | None:
    """The session of this process while a run lasts."""
    return _session


class Session:
    """One process of a run: its rank, where its report goes, its children, the gathering at the end.

    ``role`` is ``"main"`` for a process that ``gradguard run`` started (one per rank under
    ``torchrun``), ``"spawned"`` for a child started by the spawn or fork server start
    method, ``"forked"`` for a forked copy of either.
    """

    def __init__(
        self,
        guard: Guard,
        options: Options,
        *,
        role: str = "main",
        index: int | None = None,
        parent: str | None = None,
        parent_file: str | None = None,
    ) -> None:
        self.guard = guard
        self.options = options
        self.role = role
        self.index = index
        self.parent = parent
        self.pid = os.getpid()
        self.id = new_id()
        self.launch = ranks.launch() if role == "main" else None
        self.notes: list[str] = []
        #: What the files of the children are named after: the JSON report asked for, or one in a
        #: folder of the run's (removed at the end) when none is written.
        self.base = options.json
        self._tmp: str | None = None
        self._parent_file = parent_file
        self._together = role == "main" and "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ
        self._inherited_group = False  # a forked copy of a process in a group: the group is not its own
        self._seen: ranks.Rank | None = None  # the last rank read from a process group
        self._store: Any = None  # the default process group's store, for the gathering
        self._present: set[int] = set()  # ranks known to run under gradguard
        self._seq = 0
        self._written: str | None = None
        self._baseline: _Baseline | None = None  # a forked copy's: what the guard held at the fork
        self.children = itertools.count()
        self._undo: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ identity
    def rank(self) -> ranks.Rank | None:
        """This process's rank, read now (``None``: a child in no process group of its own)."""
        if self._inherited_group:
            return None
        now = ranks.current()
        if now.grouped:
            self._seen = now
            return now
        if self._seen is not None:  # the group is gone: the rank it gave
            return self._seen
        return now if self.role == "main" else None

    @property
    def quiet(self) -> bool:
        """A rank other than 0 of a run of several: it prints nothing, rank 0 reports its findings."""
        rank = self.rank()
        return self.role == "main" and rank is not None and rank.world_size > 1 and rank.rank != 0

    def path(self) -> str | None:
        """The file this process writes: the one asked for, or its rank's or child's beside it."""
        rank = self.rank()
        if self.role == "main":
            asked = self.options.json
            if asked is None or rank is None or rank.world_size < 2 or rank.rank == 0:
                return asked
            return ranks.rank_path(asked, rank.rank)
        if self.base is None:
            return None
        if rank is not None and rank.world_size > 1:
            return ranks.rank_path(self.base, rank.rank)
        return ranks.child_path(self._parent_file or self.base, self.index if self.index is not None else self.pid)

    def report(self, *, final: bool) -> dict[str, Any]:
        """The guard's report now, marked with this process's rank and identity."""
        report = self.guard.to_dict()
        rank = self.rank()
        self._seq += 1
        number, world = (rank.rank, rank.world_size) if rank is not None else (None, 1)
        if world > 1:
            label = f"rank {number}"
        else:
            label = "main" if self.role == "main" else f"child {self.index if self.index is not None else self.pid}"
        process = {
            "id": self.id,
            "label": label,
            "rank": number,
            "world_size": world,
            "pid": os.getpid(),
            "parent": self.parent,
            "launch": self.launch,
            "final": final,
            "seq": self._seq,
        }
        ranks.annotate(report, rank=number, world_size=world, process=process)
        if self._baseline is not None:
            report = self._baseline.subtract(report)
        return report

    # ------------------------------------------------------------------ while the run goes on
    def save(self, _finding: Any = None) -> None:
        """Write this process's report now (a finding callback); never raises into training."""
        with contextlib.suppress(Exception):
            if os.getpid() != self.pid:
                self.forked()  # a fork that no hook told of
            path = self.path()
            if path is None:
                return
            report = self.report(final=False)  # no lock: a signal handler may save in the middle of a save
            if self.role == "main" or _saw(report):
                self._write(report, path)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """While the program runs: its process group's store kept, its children watched."""
        self.enter()
        try:
            if self.quiet:
                self.save()  # at once: a file an earlier run left under this name is not taken for this one's
            yield
        finally:
            self.leave()

    def enter(self) -> None:
        """Become this process's session and put the run's wrappers in place."""
        global _session
        from gradguard import children

        _session = self
        if self.role == "main" and self.base is None:  # the children need a place for their files
            with contextlib.suppress(OSError):
                self._tmp = tempfile.mkdtemp(prefix="gradguard-")
                self.base = os.path.join(self._tmp, "report.json")
        patches = [_wrap_group, children.watch_forks]
        if self.role == "main":
            patches.append(children.watch_children)
        for patch in patches:
            with contextlib.suppress(Exception):  # what cannot be watched is left alone
                self._undo.append(patch(self))

    def leave(self) -> None:
        """Undo the run's wrappers (idempotent)."""
        while self._undo:
            with contextlib.suppress(Exception):
                self._undo.pop()()

    def joined(self) -> None:
        """The program initialised a process group, or is about to destroy it: keep its store, say gradguard runs."""
        rank = self.rank()
        if self.role != "main" or rank is None or not rank.grouped or rank.world_size < 2:
            return
        dist = sys.modules.get("torch.distributed")
        with contextlib.suppress(Exception):
            self._store = dist.distributed_c10d._get_default_store()  # type: ignore[union-attr]
            if rank.rank != 0:
                self._store.set(self._key("present", rank.rank), "1")

    # ------------------------------------------------------------------ forks
    def forked(self) -> None:
        """In a forked copy of this process: a child, whose report holds what it sees from now on."""
        self._parent_file = self.path() or self.base
        self._inherited_group = ranks.current().grouped
        self.parent, self.id = self.id, new_id()
        self.role, self.pid, self.index = "forked", os.getpid(), os.getpid()
        self.launch, self._together = None, False
        self._store, self._seen, self._written, self._tmp = None, None, None, None
        self.children = itertools.count()
        self._undo = []  # the parent's wrappers are the parent's to undo
        self._baseline = _Baseline.of(self.guard)

    def finish_forked(self) -> None:
        """A forked ``multiprocessing`` child ends: its report, if it watched anything since the fork."""
        with contextlib.suppress(Exception):
            if self.role != "forked" or self.pid != os.getpid() or _session is not self:
                return
            if self._baseline is not None and not self._baseline.grew(self.guard):
                return  # a data loader's worker: nothing watched, nothing to say
            self.finish_child()

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict[str, Any]:
        """The report this process writes when the run ends (after ``uninstall()``).

        It holds the reports of this process's children; rank 0's those of every rank.
        """
        global _session
        self.leave()
        self.joined()
        rank = self.rank()
        report = self._with_children(self.report(final=True))
        if rank is not None and rank.world_size > 1:
            if rank.rank != 0:
                self._publish(report, rank.rank)
            else:
                report = ranks.merge(report, self._gather(rank.world_size, report))
        if self.notes:
            report["notes"] = [*report.get("notes", []), *self.notes]
        if _session is self:
            _session = None
        return report

    def finish_child(self) -> None:
        """A child ends: uninstall its guard, write its report if it watched anything."""
        global _session
        from gradguard.install import installed, uninstall

        self.leave()
        self.rank()  # the group's rank, while it lives
        while installed() is self.guard:
            uninstall()
        report = self._with_children(self.report(final=True))
        path = self.path()
        if path is not None and (_saw(report) or self._written is not None):
            self._write(report, path)
        if _session is self:
            _session = None

    def _write(self, report: dict[str, Any], path: str) -> None:
        write_json_atomic(report, path)
        old, self._written = self._written, path
        if old is not None and old != path and self.role != "main":  # a child whose rank became known
            with contextlib.suppress(OSError):
                os.unlink(old)

    def _with_children(self, report: dict[str, Any]) -> dict[str, Any]:
        if self.base is not None:
            for path in ranks.siblings(self.base):
                other = ranks.read(path)
                if other is not None and (other.get("process") or {}).get("parent") == self.id:
                    report = ranks.merge(report, [other])
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = self.base = None
        return report

    # ------------------------------------------------------------------ rank 0 gathers
    def _key(self, kind: str, rank: int) -> str:
        return f"gradguard/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{kind}/{rank}"

    def _publish(self, report: dict[str, Any], rank: int) -> None:
        """Hand this rank's report to rank 0 through the group's store."""
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.set(
                    self._key("report", rank), json.dumps({"parts": ranks.parts(report)}, default=_json_default)
                )

    def _gather(self, world: int, mine: dict[str, Any]) -> list[dict[str, Any]]:
        """Rank 0: the reports of the other ranks, from the store, else from their files."""
        others, got = set(range(1, world)), dict[int, dict[str, Any]]()
        timeout, start, told = _timeout(), time.monotonic(), False
        for turn in itertools.count():
            for rank in sorted(others - got.keys()):
                data = self._from_store(rank)
                if data is None and turn % 10 == 0:  # a rank that could not reach the store: its file
                    data = self._from_file(rank, mine, final=True)
                if data is not None:
                    got[rank] = data
            waited = time.monotonic() - start
            waiting = others - got.keys()
            if not self._together and waited >= _GRACE_S:
                waiting = {r for r in waiting if self._runs_gradguard(r, mine)}
            if not waiting or waited >= timeout:
                break
            if not told and waited >= _GRACE_S:
                told = True
                _tell(f"waiting up to {timeout:.0f} s for the reports of {ranks.describe(waiting)}")
            time.sleep(0.05)
        late, silent, absent = list[int](), list[int](), list[int]()
        for rank in sorted(others - got.keys()):
            data = self._from_file(rank, mine, final=False)
            if data is not None:
                got[rank] = data
                late.append(rank)
            else:
                (silent if self._together or rank in self._present else absent).append(rank)
        if late:
            self._note(f"{ranks.describe(late)} did not end in time: merged as written while the run went on")
        if silent:
            self._note(f"no report from {ranks.describe(silent)}")
        if absent:
            self._note(f"{ranks.describe(absent)} did not run under gradguard run: not in this report")
        return list(got.values())

    def _runs_gradguard(self, rank: int, mine: dict[str, Any]) -> bool:
        if rank not in self._present:
            store = self._store
            with contextlib.suppress(Exception):
                if store is not None and store.check([self._key("present", rank)]):
                    self._present.add(rank)
            if rank not in self._present and self._from_file(rank, mine, final=False) is not None:
                self._present.add(rank)
        return rank in self._present

    def _from_store(self, rank: int) -> dict[str, Any] | None:
        store = self._store
        if store is None:
            return None
        key = self._key("report", rank)
        try:
            if not store.check([key]):
                return None
            data = json.loads(store.get(key))
        except Exception:
            self._store = None  # gone: the files are what is left
            return None
        with contextlib.suppress(Exception):
            store.delete_key(key)
        return data if isinstance(data, dict) else None

    def _from_file(self, rank: int, mine: dict[str, Any], *, final: bool) -> dict[str, Any] | None:
        asked = self.options.json
        data = ranks.read(ranks.rank_path(asked, rank)) if asked is not None else None
        if data is None or (final and not (data.get("process") or {}).get("final")):
            return None
        return data if ranks.belongs(mine, data) else None

    def _note(self, text: str) -> None:
        self.notes.append(text)
        _tell(text)


@dataclasses.dataclass(frozen=True)
class _Baseline:
    """What a guard held when its process was forked: the child's report is what came after."""

    steps: int
    iterations: int
    counts: dict[Any, int]

    @classmethod
    def of(cls, guard: Guard) -> _Baseline:
        counts = {("findings", f.key): f.count for f in guard.findings}
        counts.update({("suppressed", f.key): f.count for f in guard.ledger.suppressed})
        return cls(guard.step, guard.iteration, counts)

    def grew(self, guard: Guard) -> bool:
        """Whether the guard watched anything since the fork."""
        if guard.step > self.steps or guard.iteration > self.iterations:
            return True
        return any(f.count > self.counts.get(("findings", f.key), 0) for f in guard.findings)

    def subtract(self, report: dict[str, Any]) -> dict[str, Any]:
        for kind in ("findings", "suppressed"):
            kept = []
            for item in report.get(kind) or []:
                finding = Finding.from_dict(item)
                count = finding.count - self.counts.get((kind, finding.key), 0)
                if count > 0:
                    kept.append({**item, "count": count})
            report[kind] = kept
        summary = report["summary"]
        summary["steps"] = max(summary.get("steps", 0) - self.steps, 0)
        summary["iterations"] = max(summary.get("iterations", 0) - self.iterations, 0)
        return ranks.merge(report, [])  # the totals of what is left


def _wrap_group(session: Session) -> Callable[[], None]:
    """``init_process_group`` and ``destroy_process_group`` tell the session, around what they do."""
    import torch.distributed as dist

    if not dist.is_available():
        return lambda: None
    from torch.distributed import distributed_c10d

    def init_process_group(*args: Any, **kwargs: Any) -> Any:
        result = init(*args, **kwargs)
        with contextlib.suppress(Exception):
            session.joined()
        return result

    def destroy_process_group(*args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(Exception):
            session.joined()
        return destroy(*args, **kwargs)

    init, destroy = distributed_c10d.init_process_group, distributed_c10d.destroy_process_group
    undo = []
    for name, original, wrapper in (
        ("init_process_group", init, init_process_group),
        ("destroy_process_group", destroy, destroy_process_group),
    ):
        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        wrapper.__doc__ = original.__doc__
        for owner in (distributed_c10d, dist):
            if getattr(owner, name, None) is original:
                undo.append(swap(owner, name, wrapper))

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore


def swap(owner: Any, name: str, new: Any) -> Callable[[], None]:
    """Set ``owner.name`` to ``new``; returns what puts the old value back, unless another replaced it since."""
    old = getattr(owner, name)
    setattr(owner, name, new)

    def undo() -> None:
        if getattr(owner, name) is new:
            setattr(owner, name, old)

    return undo


def _timeout() -> float:
    try:
        value = float(os.environ.get("GRADGUARD_GATHER_TIMEOUT", GATHER_TIMEOUT_S))
    except ValueError:
        return GATHER_TIMEOUT_S
    return max(value, 0.0) if math.isfinite(value) else GATHER_TIMEOUT_S


def _saw(report: dict[str, Any]) -> bool:
    """Whether a child's report says anything: a step, a model called, a finding."""
    summary = report.get("summary") or {}
    return bool(summary.get("steps") or summary.get("iterations") or report.get("findings") or report.get("suppressed"))


def new_id() -> str:
    """An identity for one process of a run, unique across hosts and time."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _tell(text: str) -> None:
    with contextlib.suppress(Exception):
        print(f"gradguard: {text}", file=sys.stderr, flush=True)
