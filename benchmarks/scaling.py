"""How gradguard's own cost per step grows with the number of parameter tensors.

Stacks of tiny linear layers (two parameter tensors each) train on one CPU thread, the
launch-bound regime a GPU user is in: the step is short and every per-tensor cost shows.
For each size, blocks of unguarded steps and blocks of steps under a ``Guard`` with every
detector alternate on the same model, in a shuffled order. Each guarded block attaches a
guard with ``Budget(warmup=0)``, which samples from its first step as a guard does after
its warm-up, and runs ``--settle`` steps unmeasured (the one-time costs: parameter lists,
the memory sampler's first samples) before it measures: the figures are those of a long
run. The cost of a pair of blocks is the
difference of their median steps, and the figure is the median over the pairs, which
cancels the drift of a shared machine. Time is the CPU time of this thread
(``time.thread_time``).

It prints, per size, the median unguarded step, gradguard's cost per step (guarded minus
unguarded) and the guard's own timer, then least-squares lines through both: microseconds
per step and per tensor, and the cost at 291 tensors (Llama-7B) against a 30 ms GPU step.

    python benchmarks/scaling.py
    python benchmarks/scaling.py --sizes 20,100,300,800 --repeats 40 --json scaling.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import gradguard

LLAMA_7B_TENSORS = 291
GPU_STEP_MS = 30.0


def tiny_stack(tensors: int, width: int = 8, device: str = "cpu") -> nn.Module:
    """``tensors // 2`` linear layers of ``width`` features (a weight and a bias each)."""
    layers: list[nn.Module] = []
    for _ in range(max(1, tensors // 2)):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers).to(device)


def make_step(model: nn.Module, opt: torch.optim.Optimizer, width: int = 8) -> Callable[[], float]:
    """One training step; returns the CPU time it took on this thread (on a GPU: the launches)."""
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    x = torch.randn(4, width, generator=gen).to(device)
    y = torch.randn(4, width, generator=gen).to(device)

    def step() -> float:
        start = time.thread_time()
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        return time.thread_time() - start

    return step


def measure(tensors: int, args: argparse.Namespace, rng: random.Random) -> dict[str, float]:
    torch.manual_seed(0)
    model = tiny_stack(tensors, device=args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = make_step(model, opt)
    # a guard that starts past its warm-up: the steady state of a long run from the first step
    steady = gradguard.Budget(warmup=0)
    for _ in range(args.warmup):
        step()
    costs, own, base = [], [], []
    for _ in range(args.repeats):
        order = ["none", "guard"]
        rng.shuffle(order)
        medians: dict[str, float] = {}
        for name in order:
            guard = gradguard.Guard(model, opt, policy="collect", budget=steady) if name == "guard" else None
            with guard or contextlib.nullcontext():
                for _ in range(args.settle):
                    step()
                before = guard.overhead_s if guard is not None else 0.0
                medians[name] = min(step() for _ in range(args.steps))
                if guard is not None:
                    own.append((guard.overhead_s - before) / args.steps)
        costs.append(medians["guard"] - medians["none"])
        base.append(medians["none"])
    step_s, cost = statistics.median(base), statistics.median(costs)
    return {
        "tensors": float(sum(1 for _ in model.parameters())),
        "step_us": step_s * 1e6,
        "cost_us": cost * 1e6,
        "ratio": (step_s + cost) / step_s,
        "own_us": statistics.median(own) * 1e6,
    }


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line ``y = a + b x``: (a, b)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20,100,300,800", help="parameter tensors per model, comma-separated")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per block")
    parser.add_argument("--repeats", type=int, default=15, help="pairs of blocks per size")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured steps before the first block")
    parser.add_argument("--settle", type=int, default=40, help="unmeasured steps at the start of each block")
    parser.add_argument("--device", default="cpu", help="where the models train (cpu, cuda)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    rng = random.Random(0)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows = [measure(n, args, rng) for n in sizes]

    print(
        f"torch {torch.__version__} on {args.device}, {args.repeats} pairs of {args.steps}-step blocks per size, "
        "CPU thread time"
    )
    print(f"  {'tensors':>7} {'step':>9} {'cost':>9} {'ratio':>7} {'own timer':>10}")
    for row in rows:
        print(
            f"  {row['tensors']:7.0f} {row['step_us'] / 1e3:6.2f} ms {row['cost_us']:6.0f} us "
            f"{row['ratio']:7.3f} {row['own_us']:7.0f} us"
        )
    xs = [row["tensors"] for row in rows]
    result: dict[str, object] = {"rows": rows}
    for label, key in (("cost (guarded - unguarded)", "cost_us"), ("own timer", "own_us")):
        intercept, slope = fit(xs, [row[key] for row in rows])
        at = intercept + slope * LLAMA_7B_TENSORS
        print(
            f"  {label}: {intercept:.0f} us + {slope:.2f} us/tensor; at {LLAMA_7B_TENSORS} tensors {at:.0f} us/step, "
            f"{1 + at / (GPU_STEP_MS * 1e3):.3f}x a {GPU_STEP_MS:.0f} ms GPU step"
        )
        result[key] = {"intercept_us": intercept, "slope_us_per_tensor": slope, "at_291_us": at}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
