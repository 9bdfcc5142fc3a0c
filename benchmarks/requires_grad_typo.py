"""GG401's cost per step, in a program that misspells ``requires_grad`` nowhere and in one that does.

An MLP of 32 parameter tensors trains on CPU with ``zero_grad(set_to_none=True)``, whose
``p.grad = None`` is the attribute store that a patch of ``Tensor.__setattr__`` would slow.
Four configurations run in blocks of steps, interleaved in a shuffled order each repeat:
no guard; a guard running GG601 alone, which consumes no per-step event (the fixed cost of
the guard's own hooks); a guard running GG401 alone in a program whose files assign no near
miss of ``requires_grad``; the same guard while a module that assigns ``p.requres_grad`` (in
a function never called) is imported, so that this name is watched on every tensor. Guards
use ``Budget(warmup=0)``, as after the warm-up of a long run. The figure is the median step
(CPU time of this thread) divided by the unguarded median; "inside gradguard" is the
guard's own timer per step. The cost of one ``p.grad = None``, one ``p.requires_grad_(True)``
and one watched store (``t.requres_grad = False`` on a tensor outside the model) is timed in
each configuration too.

    python benchmarks/requires_grad_typo.py
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn

import gradguard
from gradguard.sources.attributes import watched

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import interleave

TYPO_MODULE = "gg401_bench_typo"
TYPO_SOURCE = "def freeze(model):\n    for p in model.parameters():\n        p.requres_grad = False\n"


def make_step(model: nn.Module, opt: torch.optim.Optimizer, batch: int) -> Callable[[], float]:
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        x = torch.randn(batch, 64, generator=gen)
        start = time.thread_time()
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()
        return time.thread_time() - start

    return step


class _Guarded:
    """One detector; with ``typo``, while a module that misspells ``requires_grad`` is imported."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, code: str, typo: bool = False) -> None:
        self.model, self.opt, self.code, self.typo = model, opt, code, typo
        self.guard: gradguard.Guard | None = None

    def __enter__(self) -> gradguard.Guard:
        if self.typo:
            importlib.import_module(TYPO_MODULE)
        guard = gradguard.Guard(
            self.model, self.opt, detectors=[self.code], policy="collect", budget=gradguard.Budget(warmup=0)
        )
        self.guard = guard.attach()
        if self.code == "GG401" and watched() != (["requres_grad"] if self.typo else []):
            raise RuntimeError(f"Expected the typo module to decide what is watched but got {watched()}")
        return guard

    def __exit__(self, *exc: object) -> None:
        if self.guard is not None:
            self.guard.detach()
        sys.modules.pop(TYPO_MODULE, None)


def per_store_ns(stmt: str, env: dict[str, object]) -> float:
    return min(timeit.repeat(stmt, globals=env, number=20_000, repeat=5)) / 20_000 * 1e9


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps per block")
    parser.add_argument("--repeats", type=int, default=8, help="blocks per configuration")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured steps first")
    parser.add_argument("--settle", type=int, default=10, help="unmeasured steps at the start of each block")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(*[m for _ in range(16) for m in (nn.Linear(64, 64), nn.Tanh())])  # 32 tensors
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    step = make_step(model, opt, args.batch)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, f"{TYPO_MODULE}.py").write_text(TYPO_SOURCE)
        sys.path.insert(0, folder)
        importlib.invalidate_caches()
        configs: dict[str, Callable[[], AbstractContextManager]] = {
            "none": nullcontext,
            "guard only (GG601)": lambda: _Guarded(model, opt, "GG601"),
            "GG401, no typo": lambda: _Guarded(model, opt, "GG401"),
            "GG401, typo watched": lambda: _Guarded(model, opt, "GG401", typo=True),
        }
        stores: dict[str, dict[str, float]] = {}
        env: dict[str, object] = {"p": next(model.parameters()), "t": torch.zeros(1)}

        def measure_stores(name: str) -> None:  # inside the block, with its guard attached
            if name not in stores:
                stores[name] = {
                    "p.grad = None": per_store_ns("p.grad = None", env),
                    "p.requires_grad_(True)": per_store_ns("p.requires_grad_(True)", env),
                    "t.requres_grad = False": per_store_ns("t.requres_grad = False", env),
                }

        for _ in range(args.warmup):
            step()
        times, inside = interleave(configs, step, args.repeats, args.settle, args.steps, measure_stores)
        sys.path.remove(folder)

    base = statistics.median(times["none"])
    ratios = {name: statistics.median(t) / base for name, t in times.items()}
    print(
        f"torch {torch.__version__}, {args.repeats} x {args.steps} steps per configuration, "
        f"median unguarded step {base * 1e3:.3f} ms"
    )
    print(f"  {'configuration':<22} {'ratio':>7}   {'inside gradguard':>16}   " + "   ".join(stores["none"]))
    for name, ratio in ratios.items():
        own = f"{statistics.median(inside[name]) * 1e6:8.1f} us/step" if inside[name] else ""
        cells = "   ".join(f"{stores[name][k]:>{len(k) - 3}.0f} ns" for k in stores["none"])
        print(f"  {name:<22} {ratio:6.3f}x   {own:>16}   {cells}")
    return ratios


if __name__ == "__main__":
    main(sys.argv[1:])
