"""Training loops on 2 CPU ranks, run under ``gradguard run`` by tests/test_distributed_reports.py.

``python ddp_ranks.py MODE``:

- ``torchrun``: one process per rank started by ``torchrun``; DDP over gloo. Rank 0 destroys
  the process group at the end, rank 1 leaves it alive.
- ``alone REPORT``: ``gradguard run`` started once per rank (``RANK``, ``WORLD_SIZE``), no
  process group at all. Rank 1 ends only once rank 0's report REPORT is final, and rank 0
  only once rank 1 has trained: rank 0 merges rank 1's report as written while it ran.
- ``spawn``: the ranks started with ``torch.multiprocessing.spawn``, as PyTorch's DDP
  tutorial does; then a data loader with a spawned worker, a forked child and a child of a
  fork server, each of the last two with a loop missing ``zero_grad()``.

Each rank runs a loop missing ``zero_grad()`` (GG101 on every rank), a correct loop, and a
loop that keeps every step's loss on rank 1 only (GG201 on rank 1).
"""

import json
import multiprocessing
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset


def loops(rank, wrap):
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    model = wrap(nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(4):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()  # <- every rank: no zero_grad()

    model = wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    model = wrap(nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    history = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        if rank == 1:
            history.append(loss)  # <- rank 1 only: every step's graph kept


def ddp_worker(rank, world, port):
    if port is not None:  # started by torch.multiprocessing.spawn, as the DDP tutorial does
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    else:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    loops(dist.get_rank(), DistributedDataParallel)
    dist.barrier()  # no rank leaves while its peer still talks to it
    if port is not None or dist.get_rank() == 0:
        dist.destroy_process_group()


def child_loop():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(4):
        model(torch.ones(2, 3)).sum().backward()
        opt.step()  # <- a child: no zero_grad()


def spawn_run():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(ddp_worker, args=(2, port), nprocs=2, join=True)
    children = [multiprocessing.get_context(method).Process(target=child_loop) for method in ("fork", "forkserver")]
    for child in children:
        child.start()
    data = DataLoader(TensorDataset(torch.ones(4, 3)), batch_size=2, num_workers=1, multiprocessing_context="spawn")
    assert sum(len(batch) for (batch,) in data) == 4
    for child in children:
        child.join()
        assert child.exitcode == 0, (child, child.exitcode)


def alone(report):
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    loops(rank, lambda module: module)
    trained = os.path.join(os.path.dirname(report), "rank1-trained")
    if rank == 1:
        open(trained, "w").close()
    while not (os.path.exists(trained) if rank == 0 else _final(report)):
        time.sleep(0.05)


def _final(path):
    try:
        with open(path) as fh:
            return json.load(fh)["process"]["final"]
    except (OSError, ValueError, KeyError):
        return False


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "spawn":
        spawn_run()
    elif mode == "torchrun":
        ddp_worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), None)
    else:
        alone(sys.argv[2])
