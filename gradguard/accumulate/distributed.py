"""Accumulation across processes: the DDP model, one-scalar sums, and the all-reduce of a partial window."""

from __future__ import annotations

import collections
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gradguard.accumulate.window import Weight


def find_ddp(model: torch.nn.Module | None) -> DistributedDataParallel | None:
    module = getattr(model, "_orig_mod", model)  # torch.compile(ddp_model)
    return module if isinstance(module, DistributedDataParallel) else None


def sum_across(value: Weight, group: Any) -> Weight:
    """Sum a count over the processes of ``group``: a Python number on CPU backends, else a tensor."""
    on_cuda = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    if isinstance(value, torch.Tensor):
        total = value.detach().to(device=device, dtype=torch.float64).reshape(1)
    else:
        total = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(total, group=group)
    if on_cuda or isinstance(value, torch.Tensor):
        return total.reshape(())
    return total.item()


def all_reduce_grads(ddp: DistributedDataParallel, world_size: int, group: Any) -> None:
    """Average the gradients of a DDP model across processes, as its synchronised backward would.

    Parameters without a gradient on any process keep none; where some process has one,
    the others contribute zeros.
    """
    ignored: set[str] = getattr(ddp, "parameters_to_ignore", set())
    params = [p for n, p in ddp.module.named_parameters() if p.requires_grad and n not in ignored]
    if not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad, group=group)
    present = has_grad.tolist()
    grads = []
    for p, count in zip(params, present, strict=True):
        if count and p.grad is None:
            p.grad = torch.zeros_like(p)
        if count:
            grads.append(p.grad)
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = collections.defaultdict(list)
    for g in grads:
        buckets[(g.device, g.dtype)].append(g)
    with torch.no_grad():
        for bucket in buckets.values():
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)
            flat.div_(world_size)
            for g, reduced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True):
                g.copy_(reduced)
