"""Reports of runs of several processes: per-rank reports merged into one, spawned and forked children watched.

Each launch starts 2 CPU ranks over gloo and runs several loops at once
(tests/scripts/ddp_ranks.py): one missing ``zero_grad()`` on every rank (GG101), a correct
one, and one keeping every step's loss on rank 1 only (GG201). The merge itself is tested
without processes first.
"""

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradguard
from gradguard import processes, ranks
from gradguard.cli import main
from gradguard.errors import ConfigurationError, FindingWarning
from gradguard.findings import Finding, Location, Severity
from gradguard.formats import render, to_sarif
from gradguard.report import check_report
from gradguard.report_html import render_html

from .conftest import REPO
from .helpers import line_of

SCRIPT = os.path.join(REPO, "tests", "scripts", "ddp_ranks.py")
EVERY = line_of("# <- every rank: no zero_grad()", SCRIPT)
ONLY_RANK_1 = line_of("# <- rank 1 only: every step's graph kept", SCRIPT)
CHILD = line_of("# <- a child: no zero_grad()", SCRIPT)
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


# --------------------------------------------------------------------- the merge, without processes
def _finding(code="GG101", line=9, count=1, step=2, severity="warning", message="applied twice"):
    return Finding(
        code, "missing-zero-grad", Severity(severity), message, location=Location("t.py", line), step=step, count=count
    ).to_dict()


def _report(rank, findings, *, world=2, steps=4, launch="L", parent=None, final=True, seq=1, ident=None):
    report = {
        "version": 1,
        "summary": {"steps": steps, "iterations": steps, "overhead_s": 0.1 * (rank + 1), "wall_s": 2.0},
        "findings": findings,
        "suppressed": [],
    }
    process = {
        "id": ident or f"host:{rank}",
        "rank": rank,
        "world_size": world,
        "parent": parent,
        "launch": launch,
        "final": final,
        "seq": seq,
    }
    return ranks.annotate(report, rank=rank, world_size=world, process=process)


def test_findings_of_the_ranks_are_merged_by_code_and_place():
    rank0 = _report(0, [_finding(count=3, step=2)], steps=4)
    rank1 = _report(
        1,
        [_finding(count=2, step=1, severity="error", message="worse"), _finding("GG201", line=20)],
        steps=6,
    )
    merged = ranks.merge(rank0, [rank1])
    gg101, gg201 = merged["findings"]
    assert (gg101["count"], gg101["step"], gg101["ranks"]) == (5, 1, [0, 1])  # counts summed, first step
    assert (gg101["severity"], gg101["message"]) == ("error", "worse")  # the worst one's text
    assert (gg201["code"], gg201["ranks"]) == ("GG201", [1])
    summary = merged["summary"]
    assert (summary["steps"], summary["world_size"], summary["ranks"], summary["findings"]) == (6, 2, [0, 1], 2)
    assert summary["by_severity"] == {"info": 0, "warning": 1, "error": 1}
    assert summary["overhead_s"] == pytest.approx(0.2)  # the furthest process's
    assert [p["process"]["id"] for p in merged["parts"]] == ["host:0", "host:1"]
    check_report(merged)


def test_merging_a_process_already_merged_changes_nothing_unless_it_is_a_later_version():
    rank0 = _report(0, [_finding(count=3)])
    running = _report(1, [_finding(count=1)], final=False, seq=2)
    merged = ranks.merge(rank0, [running])
    assert ranks.merge(merged, [running]) == merged
    assert ranks.merge(merged, [_report(1, [_finding(count=1)], final=False, seq=1)]) == merged  # an older one
    final = ranks.merge(merged, [_report(1, [_finding(count=4)], final=True, seq=3)])
    assert final["findings"][0]["count"] == 7  # rank 1's final count replaces the one seen while it ran
    assert len(final["parts"]) == 2


def test_only_files_of_the_same_run_belong_to_a_report():
    mine = _report(0, [], launch="L")
    assert ranks.belongs(mine, _report(1, [], launch="L"))
    assert not ranks.belongs(mine, _report(1, [], launch="another run"))
    assert not ranks.belongs(mine, _report(3, [], world=4, launch="L"))  # a larger run's
    merged = ranks.merge(mine, [_report(1, [], launch="L")])
    assert not ranks.belongs(merged, _report(1, [], launch="L", ident="host:other"))  # rank 1 is there already
    assert ranks.belongs(mine, _report(0, [], world=1, launch=None, parent="host:0", ident="child"))  # a child
    assert not ranks.belongs(mine, _report(0, [], world=1, launch=None, parent="host:9", ident="child"))


def test_rank_and_child_files_sit_beside_the_report(tmp_path):
    path = str(tmp_path / "r.json")
    assert ranks.rank_path(path, 1) == str(tmp_path / "r.rank1.json")
    assert ranks.child_path(ranks.rank_path(path, 1), 7) == str(tmp_path / "r.rank1.child7.json")
    for name in ("r.rank10.json", "r.rank2.json", "r.child0.json", "r.rank1.child3.json", "x.rank1.json", "r.json.bak"):
        (tmp_path / name).write_text("{}")
    assert [os.path.basename(p) for p in ranks.siblings(path)] == [
        "r.child0.json",
        "r.rank1.child3.json",
        "r.rank2.json",
        "r.rank10.json",
    ]


def test_the_rank_is_read_from_the_environment_when_no_group_is_initialised(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert ranks.current() == ranks.Rank(3, 4, False)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, policy="collect") as guard:
        for _ in range(3):
            model(torch.ones(2, 3)).sum().backward()
            opt.step()
    report = guard.to_dict()
    assert (report["summary"]["world_size"], report["findings"][0]["ranks"]) == (4, [3])
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ranks.current().rank == 1


def test_only_rank_zero_warns_under_the_warn_policy(monkeypatch):
    finding = Finding("GG101", "missing-zero-grad", Severity.WARNING, "applied twice")
    policy = processes.RankZeroPolicy("warn")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy.apply([finding])  # collected: nothing warned
    monkeypatch.setenv("RANK", "0")
    with pytest.warns(FindingWarning, match="GG101"):
        policy.apply([finding])
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(gradguard.FindingError):
        processes.RankZeroPolicy("raise").apply([finding])  # every rank raises


def test_readers_show_the_ranks_of_each_finding():
    merged = ranks.merge(_report(0, [_finding()]), [_report(1, [_finding(), _finding("GG201", line=20)])])
    text = render(merged, "text")
    assert "on 2 ranks" in text.splitlines()[0]
    assert "applied twice (seen 2 times), on ranks 0, 1" in text
    assert text.count(", on rank 1\n") == 1
    results = to_sarif(merged)["runs"][0]["results"]
    assert [r["properties"]["ranks"] for r in results] == [[0, 1], [1]]
    page = render_html(merged)
    assert '<th scope="col">Ranks</th>' in page
    assert '<td data-label="Ranks">0, 1</td>' in page
    alone = _report(0, [_finding()], world=1)
    assert "Ranks" not in render_html(alone)
    assert ", on rank" not in render(alone, "text")


def test_a_report_with_bad_ranks_is_refused():
    with pytest.raises(ConfigurationError, match=r"findings\[0\].ranks must be a list of ranks"):
        check_report({"version": 1, "summary": {}, "findings": [{**_finding(), "ranks": ["0"]}]}, "r.json")
    with pytest.raises(ConfigurationError, match=r"summary\.world_size must be a positive integer but got 0"):
        check_report({"version": 1, "summary": {"world_size": 0}, "findings": []}, "r.json")


def test_gradguard_report_merges_the_files_of_the_other_ranks(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps(_report(0, [_finding(count=3)])))
    (tmp_path / "r.rank1.json").write_text(json.dumps(_report(1, [_finding(count=2), _finding("GG201", line=20)])))
    (tmp_path / "r.rank2.json").write_text(json.dumps(_report(2, [_finding("GG201")], world=4)))  # another run's
    assert main(["report", str(tmp_path / "r.json"), "--format", "json"]) == 0
    out = capsys.readouterr()
    assert f"gradguard: merged {tmp_path / 'r.rank1.json'} with " in out.err
    report = json.loads(out.out)
    assert [(f["code"], f["count"], f["ranks"]) for f in report["findings"]] == [
        ("GG101", 5, [0, 1]),
        ("GG201", 1, [1]),
    ]


class _Store:
    """The part of a process group's key-value store that the gathering uses."""

    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def check(self, keys):
        return all(key in self.data for key in keys)

    def get(self, key):
        return self.data[key]

    def delete_key(self, key):
        return self.data.pop(key, None) is not None


def test_rank_zero_waits_only_for_the_ranks_that_run_under_gradguard(monkeypatch, capsys):
    monkeypatch.setattr(processes, "_GRACE_S", 0.05)
    monkeypatch.setenv("GRADGUARD_GATHER_TIMEOUT", "0.3")
    store = _Store()
    rank1 = processes.Session(None, processes.Options())
    rank1._store = store
    rank1._publish(_report(1, [_finding(count=2)]), 1)  # what rank 1 does when it ends
    store.set(rank1._key("present", 2), "1")  # rank 2 joined the group under gradguard, and sends nothing
    rank0 = processes.Session(None, processes.Options())  # rank 3 never said it runs under gradguard
    rank0._store = store
    got = rank0._gather(4, _report(0, [_finding()]))
    assert [ranks.parts(g)[0]["process"]["rank"] for g in got] == [1]
    assert rank0.notes == ["no report from rank 2", "rank 3 did not run under gradguard run: not in this report"]
    assert not store.check([rank1._key("report", 1)])  # taken: a later run in this store starts clean
    assert "gradguard: no report from rank 2" in capsys.readouterr().err


def test_what_the_run_wraps_is_put_back_when_it_ends(tmp_path, capsys):
    import multiprocessing.util

    originals = (multiprocessing.util.spawnv_passfds, dist.init_process_group, dist.destroy_process_group)
    script = tmp_path / "train.py"
    script.write_text(
        "import multiprocessing.util, torch.distributed as dist\n"
        "print(multiprocessing.util.spawnv_passfds.__module__, dist.destroy_process_group.__module__)\n"
    )
    assert main(["run", "--policy", "collect", "--json", str(tmp_path / "r.json"), str(script)]) == 0
    assert capsys.readouterr().out.split() == ["gradguard.children", "gradguard.processes"]  # while it ran
    assert (multiprocessing.util.spawnv_passfds, dist.init_process_group, dist.destroy_process_group) == originals
    assert processes.current() is None
    assert gradguard.installed() is None
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["summary"]["world_size"], report["process"]["label"], "parts" in report) == (1, "main", False)


def test_the_gathering_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("GRADGUARD_GATHER_TIMEOUT", "2.5")
    assert processes._timeout() == 2.5
    for bad in ("soon", "nan", "inf"):
        monkeypatch.setenv("GRADGUARD_GATHER_TIMEOUT", bad)
        assert processes._timeout() == processes.GATHER_TIMEOUT_S


# --------------------------------------------------------------------- real launches
def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV and not k.startswith("TORCHELASTIC_")}
    env.pop("GRADGUARD_GATHER_TIMEOUT", None)
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", **extra)
    return env


def _gradguard(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "gradguard", *args],
        cwd=cwd,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _by_place(report):
    return {(f["code"], f["location"]["line"]): f for f in report["findings"]}


def _warned(stderr, line, code):
    return len(re.findall(rf"ddp_ranks\.py:{line}: FindingWarning: {code}", stderr))


@needs_gloo
@pytest.mark.distributed
def test_torchrun_ranks_hand_their_findings_to_rank_zero(tmp_path):
    # No JSON files at all: rank 1's findings can reach rank 0 only through the process group's store.
    # Rank 0 destroys the group at the end (gradguard keeps its store), rank 1 leaves it alive.
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = ["-m", "gradguard", "run", "--no-json", "--format", "json", SCRIPT, "torchrun"]
    proc = subprocess.run(launch + run, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)  # rank 0's; rank 1 prints nothing
    found = _by_place(report)
    assert set(found) == {("GG101", EVERY), ("GG201", ONLY_RANK_1)}  # nothing from the correct loop
    assert found["GG101", EVERY]["ranks"] == [0, 1]
    assert found["GG201", ONLY_RANK_1]["ranks"] == [1]
    parts = {p["process"]["rank"]: p for p in report["parts"]}
    assert sorted(parts) == [0, 1]
    assert parts[1]["process"]["final"]
    assert found["GG101", EVERY]["count"] == sum(p["findings"][0]["count"] for p in parts.values())
    assert (report["summary"]["world_size"], report["summary"]["ranks"], report["summary"]["steps"]) == (2, [0, 1], 6)
    assert _warned(proc.stderr, EVERY, "GG101") == 1  # once across the ranks
    assert _warned(proc.stderr, ONLY_RANK_1, "GG201") == 0  # rank 1 collects silently
    assert list(tmp_path.iterdir()) == []


@needs_gloo
@pytest.mark.distributed
def test_ranks_without_a_process_group_meet_in_their_files(tmp_path):
    # gradguard run started once per rank, the ranks never forming a group: rank 0 merges rank 1's file.
    # Rank 0 gives up waiting at once and ends first: it merges rank 1's file as written while rank 1 ran;
    # `gradguard report` later merges rank 1's final file in its place.
    args = ["-m", "gradguard", "run", "--json", "r.json", SCRIPT, "alone", str(tmp_path / "r.json")]
    rank1 = subprocess.Popen(
        [sys.executable, *args],
        cwd=tmp_path,
        env=_env(RANK="1", WORLD_SIZE="2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        rank0 = _gradguard(*args[2:], cwd=tmp_path, env=_env(RANK="0", WORLD_SIZE="2", GRADGUARD_GATHER_TIMEOUT="0"))
        _out1, err1 = rank1.communicate(timeout=120)
    finally:
        rank1.kill()
    assert (rank0.returncode, rank1.returncode) == (0, 0), rank0.stderr[-3000:] + err1[-3000:]
    assert "FindingWarning" not in err1
    assert "gradguard:" not in err1
    assert "gradguard: rank 1 did not end in time: merged as written while the run went on" in rank0.stderr

    ended = json.loads((tmp_path / "r.json").read_text())
    parts = {p["process"]["rank"]: p for p in ended["parts"]}
    assert not parts[1]["process"]["final"]
    assert _by_place(ended)["GG201", ONLY_RANK_1]["ranks"] == [1]  # written by rank 1 as soon as found
    final1 = json.loads((tmp_path / "r.rank1.json").read_text())
    assert final1["process"]["final"]
    assert final1["process"]["id"] == parts[1]["process"]["id"]

    shown = _gradguard("report", "r.json", "--format", "json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "gradguard: merged r.rank1.json with r.json" in shown.stderr
    merged, rank1_found = _by_place(json.loads(shown.stdout)), _by_place(final1)
    assert set(merged) == {("GG101", EVERY), ("GG201", ONLY_RANK_1)}
    assert merged["GG201", ONLY_RANK_1]["count"] == rank1_found["GG201", ONLY_RANK_1]["count"]
    rank0_count = _by_place(parts[0])["GG101", EVERY]["count"]
    assert merged["GG101", EVERY]["count"] == rank0_count + rank1_found["GG101", EVERY]["count"]
    again = _gradguard("report", "r.json", cwd=tmp_path)  # r.json itself is as rank 0 wrote it
    assert "merged" in again.stderr
    assert again.stdout.count("GG101 missing-zero-grad") == 1


@needs_gloo
@pytest.mark.distributed
def test_spawned_and_forked_children_are_watched(tmp_path):
    # torch.multiprocessing.spawn starts the 2 DDP ranks; then a data loader's spawned worker (no model),
    # a forked child and a fork server's child, each of the last two with a loop missing zero_grad().
    proc = _gradguard("run", "--json", "r.json", SCRIPT, "spawn", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["process"]["label"] == "main"  # the parent's file: no child wrote over it
    found = _by_place(report)
    assert set(found) == {("GG101", EVERY), ("GG201", ONLY_RANK_1), ("GG101", CHILD)}
    assert found["GG101", EVERY]["ranks"] == [0, 1]
    assert found["GG201", ONLY_RANK_1]["ranks"] == [1]
    assert (found["GG101", CHILD]["count"], found["GG101", CHILD]["ranks"]) == (6, [])  # 3 steps in each child
    assert (report["summary"]["steps"], report["summary"]["world_size"]) == (6, 2)  # the children's steps
    kinds = sorted(p["process"]["label"].split()[0] for p in report["parts"])
    assert kinds == ["child", "child", "main", "rank", "rank"]  # the data loader's worker wrote nothing
    files = sorted(p.name for p in tmp_path.glob("r.*.json"))
    assert files[-2:] == ["r.rank0.json", "r.rank1.json"]
    assert len(files) == 4
    assert all(re.fullmatch(r"r\.child\d+\.json", name) for name in files[:2])
    assert all(p["process"]["parent"] == report["process"]["id"] for p in report["parts"][1:])
    assert _warned(proc.stderr, EVERY, "GG101") == 1  # rank 0's child warns, rank 1's collects
    assert _warned(proc.stderr, ONLY_RANK_1, "GG201") == 0
    assert "on ranks 0, 1" in proc.stderr  # the parent's summary
