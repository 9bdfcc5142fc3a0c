"""How gradguard's own cost per step grows with the number of parameter tensors.

Stacks of tiny linear layers (two parameter tensors each) train on one CPU thread, the
launch-bound regime a GPU user is in: the step is short and every per-tensor cost shows.
For each size, blocks of unguarded steps and blocks of steps under a ``Guard`` with every
detector (and, with ``--install``, under ``gradguard.install()`` as ``gradguard run`` does)
run interleaved in one process, in a shuffled order each repeat. A guarded block attaches a
new guard and runs the warm-up steps unmeasured first, so the figures are those of a long
run. Time is the CPU time of this thread (``time.thread_time``), steadier than wall time on
a shared machine.

It prints, per size, the median step of each configuration, gradguard's cost per step (the
guarded median minus the unguarded one) and the guard's own timer, then a least-squares
line through the costs: microseconds per step and per tensor, and the cost at 291 tensors
(Llama-7B) against a 30 ms GPU step.

    python benchmarks/scaling.py
    python benchmarks/scaling.py --sizes 20,100,300,800 --repeats 8 --json scaling.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

import gradguard

LLAMA_7B_TENSORS = 291
GPU_STEP_MS = 30.0


def tiny_stack(tensors: int, width: int = 8) -> nn.Module:
    """``tensors // 2`` linear layers of ``width`` features (a weight and a bias each)."""
    layers: list[nn.Module] = []
    for _ in range(max(1, tensors // 2)):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


def make_step(model: nn.Module, opt: torch.optim.Optimizer, width: int = 8) -> Callable[[], float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, width, generator=gen)
    y = torch.randn(4, width, generator=gen)

    def step() -> float:
        start = time.thread_time()
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        return time.thread_time() - start

    return step


class _Installed:
    def __enter__(self) -> gradguard.Guard:
        return gradguard.install(policy="collect")

    def __exit__(self, *exc: object) -> None:
        gradguard.uninstall()


def measure(tensors: int, args: argparse.Namespace, rng: random.Random) -> dict[str, float]:
    torch.manual_seed(0)
    model = tiny_stack(tensors)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = make_step(model, opt)
    configs: dict[str, Callable[[], AbstractContextManager]] = {
        "none": nullcontext,
        "guard": lambda: gradguard.Guard(model, opt, policy="collect"),
    }
    if args.install:
        configs["install"] = _Installed
    times: dict[str, list[float]] = {name: [] for name in configs}
    own: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.warmup):
        step()
    for _ in range(args.repeats):
        order = list(configs)
        rng.shuffle(order)
        for name in order:
            with configs[name]() as guard:
                for _ in range(args.guard_warmup):
                    step()  # gradguard's own warm-up: full sweeps, checks at every step
                before = guard.overhead_s if isinstance(guard, gradguard.Guard) else 0.0
                block = [step() for _ in range(args.steps)]
                if isinstance(guard, gradguard.Guard):
                    own[name].append((guard.overhead_s - before) / args.steps)
            times[name].extend(block)
    base = statistics.median(times["none"])
    out = {"tensors": float(len(list(model.parameters()))), "step_us": base * 1e6}
    for name in configs:
        if name == "none":
            continue
        out[f"{name}_us"] = (statistics.median(times[name]) - base) * 1e6
        out[f"{name}_ratio"] = statistics.median(times[name]) / base
        out[f"{name}_own_us"] = statistics.median(own[name]) * 1e6
    return out


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line ``y = a + b x``: (a, b)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20,100,300,800", help="parameter tensors per model, comma-separated")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per block")
    parser.add_argument("--repeats", type=int, default=6, help="blocks per configuration and size")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured steps before the first block")
    parser.add_argument("--guard-warmup", type=int, default=40, help="unmeasured steps after attaching a guard")
    parser.add_argument("--install", action="store_true", help="also measure gradguard.install()")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    rng = random.Random(0)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows = [measure(n, args, rng) for n in sizes]
    names = [k[: -len("_us")] for k in rows[0] if k.endswith("_us") and k not in ("step_us",) and "_own" not in k]

    print(f"torch {torch.__version__}, {args.repeats} x {args.steps} steps per block, CPU thread time")
    head = f"  {'tensors':>7} {'step':>9}"
    for name in names:
        head += f"   {name + ' cost':>12} {'ratio':>6} {'own timer':>10}"
    print(head)
    for row in rows:
        line = f"  {row['tensors']:7.0f} {row['step_us'] / 1e3:6.2f} ms"
        for name in names:
            line += f"   {row[name + '_us']:9.0f} us {row[name + '_ratio']:6.3f} {row[name + '_own_us']:7.0f} us"
        print(line)
    result: dict[str, object] = {"rows": rows}
    for name in names:
        xs = [row["tensors"] for row in rows]
        intercept, slope = fit(xs, [row[name + "_us"] for row in rows])
        own_intercept, own_slope = fit(xs, [row[name + "_own_us"] for row in rows])
        at = intercept + slope * LLAMA_7B_TENSORS
        print(
            f"  {name}: cost = {intercept:.0f} us + {slope:.2f} us/tensor (own timer: {own_intercept:.0f} us + "
            f"{own_slope:.2f} us/tensor); at {LLAMA_7B_TENSORS} tensors {at:.0f} us/step, "
            f"{1 + at / (GPU_STEP_MS * 1e3):.3f}x a {GPU_STEP_MS:.0f} ms GPU step"
        )
        result[name] = {
            "intercept_us": intercept,
            "slope_us_per_tensor": slope,
            "own_intercept_us": own_intercept,
            "own_slope_us_per_tensor": own_slope,
            "at_291_us": at,
        }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
