"""GradientAccumulator under DistributedDataParallel: 2 CPU processes over gloo.

One spawn runs every scenario (starting processes is the slow part). Each process writes
what it measured; the test compares it with a single-process run on the global batch.
"""

import os
import socket
import zlib

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from gradguard import GradientAccumulator

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORLD = 2

# name: (steps, sizes of each rank's micro-batches, num_items?, sync_num_items?, optimizer)
SCENARIOS = {
    "mean": (3, lambda rank: [2] * 7, False, False, "momentum"),  # 2 full windows and a partial one
    "tokens_synced": (2, lambda rank: [1 + rank, 4, 3 - rank, 2, 1 + 3 * rank], True, True, "adamw"),
    "tokens_per_rank": (3, lambda rank: [2 + rank, 1, 4, 3 * rank + 1], True, False, "sgd"),
}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def make_optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    if kind == "momentum":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.AdamW(params, lr=0.01)


def micro_batch(name, rank, index, size):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{rank}/{index}".encode()))
    return torch.randn(size, 3, generator=gen), torch.randn(size, 2, generator=gen)


def item_losses(model, x, y):
    return F.mse_loss(model(x), y, reduction="none").mean(dim=1)


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {"plain": _plain_loop(rank)}
        for name, spec in SCENARIOS.items():
            results[name] = _accumulated(name, rank, *spec)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no process leaves while its peer still talks to it (gloo aborts on a closed peer)
    finally:
        dist.destroy_process_group()


def _counting_ddp():
    ddp = DistributedDataParallel(make_model())
    calls = []

    def hook(state, bucket):
        calls.append(bucket.index())
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    return ddp, calls


def _plain_loop(rank):
    # The baseline the hook counts against: a hand-written loop synchronises every backward.
    ddp, calls = _counting_ddp()
    opt = make_optimizer("sgd", ddp.parameters())
    per_step, seen = [], 0
    for i in range(6):
        x, y = micro_batch("plain", rank, i, 2)
        (item_losses(ddp, x, y).mean() / 3).backward()
        if (i + 1) % 3 == 0:
            opt.step()
            opt.zero_grad()
            per_step.append(len(calls) - seen)
            seen = len(calls)
    return {"all_reduces_per_step": per_step}


def _accumulated(name, rank, steps, sizes, weighted, sync, kind):
    ddp, calls = _counting_ddp()
    opt = make_optimizer(kind, ddp.parameters())
    acc = GradientAccumulator(opt, steps=steps, model=ddp, sync_num_items=sync)
    per_step, seen = [], 0
    for i, size in enumerate(sizes(rank)):
        x, y = micro_batch(name, rank, i, size)
        if acc.backward(item_losses(ddp, x, y).mean(), num_items=size if weighted else None):
            per_step.append(len(calls) - seen)
            seen = len(calls)
    flushed = acc.flush()
    return {
        "all_reduces_per_step": per_step,
        "flush_all_reduces": len(calls) - seen,
        "flushed": flushed,
        "optimizer_steps": acc.optimizer_steps,
        "params": {k: v.detach().clone() for k, v in ddp.module.state_dict().items()},
    }


def _reference(name, steps, sizes, weighted, sync, kind):
    """One process, one step per window on every rank's micro-batches of that window."""
    model = make_model()
    opt = make_optimizer(kind, model.parameters())
    per_rank = {r: sizes(r) for r in range(WORLD)}
    count = len(per_rank[0])
    for start in range(0, count, steps):
        idx = range(start, min(start + steps, count))
        total_all = sum(per_rank[r][i] for r in range(WORLD) for i in idx)
        loss = 0.0
        for r in range(WORLD):
            total_rank = sum(per_rank[r][i] for i in idx)
            for i in idx:
                x, y = micro_batch(name, r, i, per_rank[r][i])
                losses = item_losses(model, x, y)
                if not weighted:  # every micro-batch weighs the same, over all ranks
                    loss = loss + losses.mean() / (len(idx) * WORLD)
                elif sync:  # every item weighs the same, over all ranks
                    loss = loss + losses.sum() / total_all
                else:  # each rank's item mean, averaged over the ranks
                    loss = loss + losses.sum() / (total_rank * WORLD)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(port, str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_a_plain_loop_all_reduces_every_micro_batch(ddp_results):
    for rank in ddp_results:
        assert rank["plain"]["all_reduces_per_step"] == [3, 3]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_one_all_reduce_per_optimizer_step(ddp_results, name):
    steps, sizes, *_ = SCENARIOS[name]
    full = len(sizes(0)) // steps
    for rank in ddp_results:
        assert rank[name]["all_reduces_per_step"] == [1] * full
        assert rank[name]["flush_all_reduces"] == 0  # flush() reduces the partial window itself


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_parameters_equal_the_single_process_big_batch(ddp_results, name):
    reference = _reference(name, *SCENARIOS[name])
    steps, sizes, *_ = SCENARIOS[name]
    for rank in ddp_results:
        assert rank[name]["flushed"] == (len(sizes(0)) % steps > 0)
        assert rank[name]["optimizer_steps"] == -(-len(sizes(0)) // steps)
        for key, value in reference.items():
            torch.testing.assert_close(rank[name]["params"][key], value, rtol=1e-6, atol=1e-7, msg=key)
