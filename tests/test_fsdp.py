"""The detectors under FSDP2 (``fully_shard``) as under DDP, and no collective added: 2 CPU processes over gloo.

One spawn runs every scenario (starting processes is the slow part). Each process runs each
loop twice over the same data, without a guard and then with one, and writes the findings
and the collectives each step issued. Collectives are counted by the sequence numbers of
the process groups, which every collective moves whoever issues it (DDP's reducer in C++,
FSDP2's hooks, a DTensor read in Python).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import zlib

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradguard

from .conftest import REPO

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # a torch without FSDP2
    fully_shard = None

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        fully_shard is None or not (dist.is_available() and dist.is_gloo_available()),
        reason="needs torch.distributed with gloo and fully_shard",
    ),
]

WORLD = 2
KINDS = ("ddp", "fsdp")
NAMES = ["emb.weight", "emb.bias", "body.0.weight", "body.0.bias", "head.weight", "head.bias"]

# name: (steps, what the guard finds, under DDP and under fully_shard alike)
SCENARIOS = {
    "no_zero_grad": (6, ["GG101"]),
    "correct": (6, []),
    "correct_kept_grads": (24, []),  # zero_grad(set_to_none=False): more steps than GG405's window
    "accumulate": (6, []),
    "frozen": (6, []),
    "frozen_zero_grads": (4, ["GG402"]),
    "hand_written_data": (6, ["GG101"]),
    "zero_grad_before_step": (4, ["GG102"]),
    "head_not_in_optimizer": (6, ["GG403"]),
    "optimizer_updates_nothing": (5, ["GG406"]),
    "attached_mid_step": (6, ["GG101"]),  # attached between a forward and its backward
}

#: the parameters a finding names (the same under DDP)
PARAMETERS = {
    "no_zero_grad": NAMES,
    "frozen_zero_grads": ["body.0.weight", "body.0.bias"],
    "head_not_in_optimizer": ["emb.weight", "emb.bias", "head.weight", "head.bias"],
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(torch.tanh(self.emb(x))))


def _count() -> int:
    """Collectives issued so far by this process, over every process group."""
    groups = dist.distributed_c10d._world.pg_map
    return sum(pg._get_sequence_number_for_group() for pg in list(groups))


def _build(kind, scenario):
    torch.manual_seed(0)
    model = Net()
    if scenario.startswith(("frozen", "optimizer_updates_nothing")):
        model.body.requires_grad_(False)  # frozen before wrapping
    if kind == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    else:
        fully_shard(model.body)
        wrapped = fully_shard(model)  # emb and head stay with the root: unsharded from forward to backward
    if scenario in ("head_not_in_optimizer", "optimizer_updates_nothing"):
        opt = torch.optim.SGD(model.body.parameters(), lr=0.01)
    elif scenario == "frozen":
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    elif scenario == "hand_written_data":
        opt = None
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, weight_decay=0.1 if scenario.startswith("frozen") else 0)
    return model, wrapped, opt


def _batch(scenario, rank, i):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{scenario}/{rank}/{i}".encode()))
    return torch.randn(4, 4, generator=gen)


def _sync(kind, model, wrapped, on):
    """A context that syncs gradients in this backward (``on``) or accumulates them locally."""
    if kind == "ddp":
        return contextlib.nullcontext() if on else wrapped.no_sync()
    model.set_requires_gradient_sync(on)
    return contextlib.nullcontext()


def _loop(kind, scenario, rank, guarded):
    model, wrapped, opt = _build(kind, scenario)
    steps = SCENARIOS[scenario][0]
    guard = None
    per_step = []
    for i in range(steps):
        before = _count()
        if guarded and guard is None and scenario != "attached_mid_step":
            guard = gradguard.Guard(wrapped, opt, policy="collect").attach()
        if scenario == "accumulate":
            for micro in range(2):
                with _sync(kind, model, wrapped, on=micro == 1):
                    wrapped(_batch(scenario, rank, 2 * i + micro)).sum().backward()
            opt.step()
            opt.zero_grad()
            per_step.append(_count() - before)
            continue
        out = wrapped(_batch(scenario, rank, i))
        if guarded and guard is None:  # the root's parameters are unsharded views now
            guard = gradguard.Guard(wrapped, opt, policy="collect").attach()
        out.sum().backward()
        if scenario == "frozen_zero_grads":
            for p in model.body.parameters():
                p.grad = torch.zeros_like(p)  # frozen, yet a gradient tensor: weight decay moves it
        if scenario == "hand_written_data":
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-0.01)  # no reset
        elif scenario == "zero_grad_before_step":
            opt.zero_grad()
            opt.step()
        elif scenario in ("no_zero_grad", "attached_mid_step"):
            opt.step()
        else:
            opt.step()
            opt.zero_grad(set_to_none=scenario != "correct_kept_grads")
        per_step.append(_count() - before)
    result = {"collectives": per_step}
    if guard is not None:
        guard.detach()
        result["findings"] = [[f.code, f.where, (f.data or {}).get("parameters")] for f in guard.findings]
        result["names"] = [guard.param_name(p) for _, p in model.named_parameters()]
    return result


def _full_tensor_is_counted():
    """What the count sees of one read of a DTensor as a whole: it must see collectives."""
    torch.manual_seed(0)
    layer = fully_shard(nn.Linear(4, 4))
    before = _count()
    layer.weight.full_tensor()
    return _count() - before


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {"full_tensor": _full_tensor_is_counted()}
        for scenario in SCENARIOS:
            for kind in KINDS:
                results[f"{kind}/{scenario}"] = {
                    "plain": _loop(kind, scenario, rank, guarded=False),
                    "guarded": _loop(kind, scenario, rank, guarded=True),
                }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(results, fh)
        dist.barrier()  # no process leaves while its peer still talks to it (gloo aborts on a closed peer)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


# One test reads the whole spawn: under pytest-xdist each worker that runs a test of the
# fixture would start the processes again.
def test_fully_shard_finds_what_ddp_finds_and_the_guard_adds_no_collective(ranks):
    wrong = []
    for r, rank in enumerate(ranks):
        for scenario, (_, expected) in SCENARIOS.items():
            ddp, fsdp = (rank[f"{kind}/{scenario}"]["guarded"] for kind in KINDS)
            if [f[0] for f in fsdp["findings"]] != expected:
                wrong.append(f"rank {r}, {scenario}: fully_shard found {fsdp['findings']}, expected {expected}")
            if fsdp["findings"] != ddp["findings"]:  # the same codes, places and parameter names
                wrong.append(f"rank {r}, {scenario}: fully_shard found {fsdp['findings']}, DDP {ddp['findings']}")
            named = [f[2] for f in fsdp["findings"]]
            if scenario in PARAMETERS and named != [PARAMETERS[scenario]]:
                wrong.append(f"rank {r}, {scenario}: the finding names {named}, expected {PARAMETERS[scenario]}")
            if not fsdp["names"] == ddp["names"] == NAMES:  # the sharded parameters, named through their modules
                wrong.append(f"rank {r}, {scenario}: parameters named {fsdp['names']} (DDP: {ddp['names']})")
            for kind in KINDS:
                plain, guarded = (rank[f"{kind}/{scenario}"][run]["collectives"] for run in ("plain", "guarded"))
                if not all(n > 0 for n in plain):  # every step synchronises gradients: the count sees it
                    wrong.append(f"rank {r}, {kind}/{scenario}: a step with no collective counted: {plain}")
                if guarded != plain:
                    wrong.append(f"rank {r}, {kind}/{scenario}: collectives per step {guarded} guarded, {plain} not")
        if rank["full_tensor"] < 1:
            wrong.append(f"rank {r}: the count saw no collective in DTensor.full_tensor()")
    assert not wrong, "\n".join(wrong)


SCRIPT = os.path.join(REPO, "tests", "scripts", "fsdp_no_zero_grad.py")
SCRIPT_NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_gradguard_run_on_each_rank_finds_the_missing_zero_grad(tmp_path):
    # each process as torchrun starts it: the same command, its rank in the environment
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD))
    logs = [open(tmp_path / f"stderr{r}.txt", "w+") for r in range(WORLD)]  # noqa: SIM115 (closed below)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gradguard", "run", "--json", "report.json", SCRIPT],
            cwd=tmp_path,
            env=dict(env, RANK=str(r)),
            stdout=subprocess.DEVNULL,
            stderr=logs[r],
        )
        for r in range(WORLD)
    ]
    try:
        for proc in procs:
            proc.wait(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        errors = []
        for log in logs:
            log.seek(0)
            errors.append(log.read()[-3000:])
            log.close()
    assert [proc.returncode for proc in procs] == [0, 0], errors
    reports = sorted(tmp_path.glob("report*.json"))  # rank 0's, and any other rank's beside it
    assert tmp_path / "report.json" in reports
    for path in reports:
        found = json.loads(path.read_text())["findings"]
        assert [(f["code"], f["data"]["parameters"]) for f in found] == [("GG101", SCRIPT_NAMES)], path
        for finding in found:
            assert finding.get("ranks", []) in ([], [0, 1], [1])  # a merged report lists both ranks
