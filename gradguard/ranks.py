"""Which ranks saw a finding, where each process's report goes, and one report made of several.

A process is known by its rank: ``torch.distributed``'s while a process group is
initialised, else the ``RANK`` and ``WORLD_SIZE`` environment variables that ``torchrun``
sets (``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` when those are missing), else rank 0 of 1. It
is read when a report is built, never per step. Every finding of a report lists the ranks
that saw it (``"ranks": [0, 1]``); ``summary.world_size`` is the size of the run and
``summary.ranks`` the ranks whose findings the report holds.

Under ``gradguard run`` each process other than the first writes its own file beside the one
asked for (``r.rank1.json`` for rank 1 of ``--json r.json``, ``r.child0.json`` for a child
process), and :func:`merge` makes one report of several: findings with the same code, object
and location are one, their counts summed and their ranks listed. A merged report keeps what
each process brought under ``parts`` (its identity under ``process``), so that merging a file
it already holds changes nothing. Nothing here imports torch.

>>> def report(rank, *codes):
...     found = [{"code": c, "name": "n", "severity": "warning", "message": "m", "ranks": [rank]} for c in codes]
...     process = {"id": f"p{rank}", "rank": rank, "world_size": 2}
...     return {"summary": {"steps": 4}, "process": process, "findings": found, "suppressed": []}
>>> merged = merge(report(0, "GG101"), [report(1, "GG101", "GG201")])
>>> [(f["code"], f["count"], f["ranks"]) for f in merged["findings"]]
[('GG101', 2, [0, 1]), ('GG201', 1, [1])]
>>> merged["summary"]["ranks"], merge(merged, [report(1, "GG101", "GG201")]) == merged
([0, 1], True)
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

_SEVERITY = {"info": 0, "warning": 1, "error": 2}


class Rank(NamedTuple):
    """A process's rank and the size of its run; ``grouped`` when read from a process group."""

    rank: int
    world_size: int
    grouped: bool = False


def current() -> Rank:
    """This process's rank, read now: from the process group if one is initialised, else the environment.

    Costs no collective. ``torch.distributed`` is only asked if the program imported it.

    >>> current().world_size >= 1
    True
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None:
        try:
            if dist.is_available() and dist.is_initialized():
                return Rank(int(dist.get_rank()), int(dist.get_world_size()), True)
        except Exception:  # a group half torn down reads as none
            pass
    rank = _env_int("RANK", _env_int("LOCAL_RANK", 0))
    world = _env_int("WORLD_SIZE", _env_int("LOCAL_WORLD_SIZE", 1))
    return Rank(max(rank, 0), max(world, 1))


def launch() -> str | None:
    """What tells one launch of a distributed run from another: the launcher's run id, address and port.

    ``None`` where no launcher set them.
    """
    keys = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")
    values = [os.environ.get(key, "") for key in keys]
    return "/".join(values) if any(values[:3]) else None


def rank_path(path: str, rank: int) -> str:
    """The report file of ``rank`` beside ``path``.

    >>> rank_path("out/r.json", 1), rank_path("report", 2)
    ('out/r.rank1.json', 'report.rank2')
    """
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}{ext}"


def child_path(path: str, child: int) -> str:
    """The report file of a child process (a number: its index, or its pid) of the process that writes ``path``.

    >>> child_path("r.json", 0), child_path("r.rank1.json", 4242)
    ('r.child0.json', 'r.rank1.child4242.json')
    """
    root, ext = os.path.splitext(path)
    return f"{root}.child{child}{ext}"


def describe(ranks: Iterable[int], *, noun: bool = True) -> str:
    """``ranks`` for a reader, runs of consecutive ranks as ranges (after the word ``rank`` if ``noun``).

    >>> describe([1]), describe([0, 1]), describe([0, 1, 2, 3, 6]), describe([2, 3, 4], noun=False)
    ('rank 1', 'ranks 0, 1', 'ranks 0-3, 6', '2-4')
    """
    values = sorted(set(ranks))
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)
    if not noun:
        return text
    return f"rank {text}" if len(values) == 1 else f"ranks {text}"


def finding_ranks(finding: Mapping[str, Any]) -> list[int]:
    """The ranks a finding of a report lists (none in a report written before ranks were recorded)."""
    ranks = finding.get("ranks")
    if not isinstance(ranks, list):
        return []
    return [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]


def annotate(
    report: dict[str, Any], *, rank: int | None, world_size: int, process: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Mark every finding of ``report`` (a process's own) as seen by ``rank`` (``None``: by no rank); returns it.

    ``process`` (the writer's identity: ``id``, ``rank``, ``label``, ``parent``, ...) is kept
    under ``report["process"]`` for :func:`merge`.
    """
    seen = [rank] if rank is not None else []
    for key in ("findings", "suppressed"):
        for finding in report.get(key) or ():
            if isinstance(finding, dict):
                finding["ranks"] = list(seen)
    summary = report.setdefault("summary", {})
    summary["world_size"] = world_size
    summary["ranks"] = list(seen)
    if process is not None:
        report["process"] = dict(process)
    return report


def parts(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What each process brought to ``report``: its ``parts`` if merged, else the report itself as one part."""
    kept = report.get("parts")
    if isinstance(kept, list) and kept:
        return [dict(p) for p in kept if isinstance(p, Mapping)]
    if "summary" not in report and "process" in report:  # a part already
        return [dict(report)]
    summary = report.get("summary")
    summary = summary if isinstance(summary, Mapping) else {}
    return [
        {
            "process": {"world_size": _int(summary, "world_size", 1), **_process(report)},
            "steps": _int(summary, "steps"),
            "iterations": _int(summary, "iterations"),
            "overhead_s": _number(summary, "overhead_s"),
            "wall_s": _number(summary, "wall_s"),
            "findings": list(report.get("findings") or []),
            "suppressed": list(report.get("suppressed") or []),
        }
    ]


def merge(base: Mapping[str, Any], others: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One report of ``base`` and ``others`` (reports or parts), ``base``'s run data kept.

    Findings with the same code, object and location are one: their counts summed, the first
    step kept, the worst severity's text, and every rank that saw one. A process already in
    ``base`` (the same ``process.id``) is replaced only by a later version of itself (a final
    report for one written while it ran). Steps, iterations, gradguard's time and the wall
    time are those of the furthest process.
    """
    kept = parts(base)
    for other in others:
        for part in parts(other):
            _add(kept, part)
    findings = _combine(p.get("findings") for p in kept)
    suppressed = _combine(p.get("suppressed") for p in kept)
    summary = dict(base.get("summary") or {})
    severities = [str(f.get("severity")) for f in findings]
    summary.update(
        steps=max(_int(p, "steps") for p in kept),
        iterations=max(_int(p, "iterations") for p in kept),
        overhead_s=max(_number(p, "overhead_s") for p in kept),
        wall_s=max(_number(p, "wall_s") for p in kept),
        findings=len(findings),
        by_severity={s: severities.count(s) for s in _SEVERITY},
        suppressed=len(suppressed),
        world_size=max([_int(_process(p), "world_size", 1) for p in kept] + [_int(summary, "world_size", 1)]),
        ranks=sorted({r for p in kept for r in _part_ranks(p)}),
    )
    report = dict(base)
    report.update(summary=summary, findings=findings, suppressed=suppressed)
    report.pop("parts", None)
    if len(kept) > 1:
        report["parts"] = kept
    return report


def siblings(path: str) -> list[str]:
    """The files beside ``path`` that processes of the same run write (``r.rank1.json``, ``r.child0.json``)."""
    folder = os.path.dirname(path) or "."
    root, ext = os.path.splitext(os.path.basename(path))
    pattern = re.compile(re.escape(root) + r"\.(?:rank\d+|child\d+)(?:\.child\d+)*" + re.escape(ext) + r"\Z")
    try:
        names = [n for n in os.listdir(folder) if pattern.match(n)]
    except OSError:
        return []
    names.sort(key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
    return [os.path.join(os.path.dirname(path), n) for n in names]


def read(path: str) -> dict[str, Any] | None:
    """A report or part file, or ``None`` if it cannot be read as one (half written, or another's)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("findings"), list) else None


def belongs(report: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """Whether ``other`` comes from a process of ``report``'s run that ``report`` lacks, or holds an older version of.

    A child belongs to the run of its parent; a rank to the run with the same launch and
    world size, unless that rank is in the report already (then ``other`` is another run's).
    """
    mine = parts(report)
    theirs = _process(other)
    ident = theirs.get("id")
    for known in mine:
        if ident is not None and _process(known).get("id") == ident:
            return _fresher(parts(other)[0], known)
    if theirs.get("parent") is not None:
        return theirs.get("parent") in {_process(p).get("id") for p in mine}
    head, rank = _process(report), theirs.get("rank")
    if not isinstance(rank, int) or theirs.get("launch") != head.get("launch"):
        return False
    if theirs.get("world_size", 1) != head.get("world_size", 1):
        return False
    return not any(_process(p).get("rank") == rank and _process(p).get("parent") is None for p in mine)


def merge_siblings(report: Mapping[str, Any], path: str) -> tuple[dict[str, Any], list[str]]:
    """``report`` (read from ``path``) merged with the files of its run beside it; and those merged."""
    merged: list[str] = []
    current = dict(report)
    for sibling in siblings(path):
        other = read(sibling)
        if other is not None and belongs(current, other):
            current = merge(current, [other])
            merged.append(sibling)
    return current, merged


def _add(kept: list[dict[str, Any]], part: dict[str, Any]) -> None:
    ident = (part.get("process") or {}).get("id")
    if ident is not None:
        for i, known in enumerate(kept):
            if _process(known).get("id") == ident:
                if _fresher(part, known):
                    kept[i] = part
                return
    kept.append(part)


def _fresher(part: Mapping[str, Any], known: Mapping[str, Any]) -> bool:
    def version(p: Mapping[str, Any]) -> tuple[bool, int]:
        process = _process(p)
        return bool(process.get("final")), _int(process, "seq")

    return version(part) > version(known)


def _combine(lists: Iterable[Any]) -> list[dict[str, Any]]:
    merged: dict[Any, dict[str, Any]] = {}
    for findings in lists:
        for finding in findings or ():
            if not isinstance(finding, Mapping):
                continue
            key = _key(finding)
            known = merged.get(key)
            if known is None:
                merged[key] = {
                    **finding,
                    "count": _int(finding, "count", 1),
                    "ranks": sorted(set(finding_ranks(finding))),
                }
                continue
            count = _int(known, "count", 1) + _int(finding, "count", 1)
            step = min(_int(known, "step"), _int(finding, "step"))
            ranks = sorted(set(known["ranks"]) | set(finding_ranks(finding)))
            if _SEVERITY.get(str(finding.get("severity")), 0) > _SEVERITY.get(str(known.get("severity")), 0):
                known = merged[key] = dict(finding)  # the worst one's text
            known.update(count=count, step=step, ranks=ranks)
    return list(merged.values())


def _key(finding: Mapping[str, Any]) -> tuple[Any, ...]:
    loc = finding.get("location")
    where = (loc.get("file"), loc.get("line"), loc.get("function", "")) if isinstance(loc, Mapping) else None
    return (finding.get("code"), finding.get("where", ""), where)


def _process(data: Mapping[str, Any]) -> Mapping[str, Any]:
    process = data.get("process")
    return process if isinstance(process, Mapping) else {}


def _part_ranks(part: Mapping[str, Any]) -> set[int]:
    found = {r for key in ("findings", "suppressed") for f in _list(part, key) for r in finding_ranks(f)}
    rank = _process(part).get("rank")
    return found | ({rank} if isinstance(rank, int) and not isinstance(rank, bool) else set())


def _list(data: Mapping[str, Any], key: str) -> Sequence[Any]:
    value = data.get(key)
    return value if isinstance(value, list) else []


def _int(data: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = data.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _number(data: Mapping[str, Any], key: str) -> float:
    value = data.get(key, 0.0)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return default
