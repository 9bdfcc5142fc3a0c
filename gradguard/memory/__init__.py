"""The framework-free core of GG301: memory samples, a robust trend test, a tensor census.

Nothing here knows of the Guard. The detector samples memory once per step through
:class:`MemorySampler`, asks :func:`growing` whether a window of samples grows steadily,
and only then takes a :func:`take_census` of the live tensors twice and names, through
:func:`find_owners`, the containers that keep the growing ones alive.
"""

from gradguard.memory.census import (
    Census,
    GroupKey,
    Growth,
    describe_group,
    diff,
    graph_storages,
    group_key,
    live_tensors,
    new_tensors,
    storage_key,
    take_census,
)
from gradguard.memory.cuda import cuda_allocation_sites, start_cuda_history, stop_cuda_history
from gradguard.memory.owners import find_owners, locate
from gradguard.memory.sampler import SIGNALS, MemorySampler, MiB, format_bytes
from gradguard.memory.trend import Trend, growing, theil_sen

__all__ = [
    "SIGNALS",
    "Census",
    "GroupKey",
    "Growth",
    "MemorySampler",
    "MiB",
    "Trend",
    "cuda_allocation_sites",
    "describe_group",
    "diff",
    "find_owners",
    "format_bytes",
    "graph_storages",
    "group_key",
    "growing",
    "live_tensors",
    "locate",
    "new_tensors",
    "start_cuda_history",
    "stop_cuda_history",
    "storage_key",
    "take_census",
    "theil_sen",
]
