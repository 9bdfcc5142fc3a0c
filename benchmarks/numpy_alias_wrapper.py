"""Cost per call of the GG501 wrappers of ``from_numpy``, ``as_tensor``, ``Tensor.numpy`` and the legacy constructors.

Each call is timed without a guard, then with a guard running GG501 only: called from this
script (the alias is recorded: checksum, record, bookkeeping) and from inside torch
(``default_convert``, as DataLoader collation does: only the caller's file is looked at).
The result of every call is dropped at once, as in a loop that makes a fresh alias per batch.
The legacy constructors are also timed without an array (sizes, a parameter: only the
first argument is looked at), beside ``torch.empty``, which no wrapper sees.

    python benchmarks/numpy_alias_wrapper.py
"""

from __future__ import annotations

import sys
import timeit

import numpy as np
import torch
from torch.utils.data._utils.collate import default_convert

import gradguard

NUMBER = 20_000
REPEAT = 7


def per_call_ns(stmt: str, env: dict[str, object]) -> float:
    return min(timeit.repeat(stmt, globals=env, number=NUMBER, repeat=REPEAT)) / NUMBER * 1e9


def main() -> None:
    torch.set_num_threads(1)
    small = np.random.default_rng(0).random(16).astype(np.float32)  # 64 bytes: checksummed whole
    large = np.random.default_rng(0).random((256, 1024)).astype(np.float32)  # 1 MiB: 256 samples
    env: dict[str, object] = {"torch": torch, "small": small, "large": large, "default_convert": default_convert}
    env["t"] = torch.from_numpy(small.copy())
    cases = {
        "torch.from_numpy(small)": "torch.from_numpy(small)",
        "torch.from_numpy(large)": "torch.from_numpy(large)",
        "torch.as_tensor(small)": "torch.as_tensor(small)",
        "t.numpy()": "t.numpy()",
        "torch.Tensor(small)": "torch.Tensor(small)",
        "torch.FloatTensor(small)": "torch.FloatTensor(small)",
        "default_convert(small)  [torch caller]": "default_convert(small)",
        "torch.Tensor(2, 8)  [no array]": "torch.Tensor(2, 8)",
        "torch.FloatTensor(2, 8)  [no array]": "torch.FloatTensor(2, 8)",
        "torch.nn.Parameter(t)  [no array]": "torch.nn.Parameter(t)",
        "torch.empty(2, 8)  [not wrapped]": "torch.empty(2, 8)",
    }
    plain = {name: per_call_ns(stmt, env) for name, stmt in cases.items()}
    with gradguard.Guard(detectors=["GG501"], policy="collect") as guard:
        guarded = {name: per_call_ns(stmt, env) for name, stmt in cases.items()}
        seen = guard.detector("GG501").aliases_seen  # type: ignore[union-attr]
    print(f"torch {torch.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}")
    print(f"{'call':<40} {'plain ns':>9} {'GG501 ns':>9} {'added ns':>9}")
    for name in cases:
        print(f"{name:<40} {plain[name]:9.0f} {guarded[name]:9.0f} {guarded[name] - plain[name]:9.0f}")
    print(f"aliases recorded: {seen}; findings: {len(guard.findings)}")


if __name__ == "__main__":
    main()
