"""Step-time overhead of gradguard against the unguarded loop.

A small transformer trains on CPU. Every configuration (no guard, each detector alone, all
detectors through ``Guard``, all detectors through ``gradguard.install()`` as
``gradguard run`` does) runs in blocks of steps, interleaved in one process and in a
shuffled order each repeat, so that drift of the machine hits them all alike. A guarded
block attaches a guard with ``Budget(warmup=0)`` (sampling as after the warm-up) and runs
``--settle`` steps unmeasured first, so the figures are those of a long run. The figure is
the median step (CPU time of this thread) of a configuration divided by the median step without a guard;
"inside gradguard" is the guard's own timer per measured step.

    python benchmarks/overhead.py                    # all configurations
    python benchmarks/overhead.py --detectors GG101  # one detector (and all, and none)
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
from gradguard.detectors import DETECTORS


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 128, d_model: int = 64, layers: int = 2, seq: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.pos))


def make_step(model: nn.Module, opt: torch.optim.Optimizer, batch: int, seq: int) -> Callable[[], float]:
    vocab = model.head.out_features
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
        start = time.thread_time()
        opt.zero_grad()
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        return time.thread_time() - start

    return step


def contexts(
    model: nn.Module, opt: torch.optim.Optimizer, codes: list[str]
) -> dict[str, Callable[[], AbstractContextManager]]:
    configs: dict[str, Callable[[], AbstractContextManager]] = {"none": nullcontext}
    steady = gradguard.Budget(warmup=0)
    for code in codes:
        configs[code] = lambda code=code: gradguard.Guard(model, opt, detectors=[code], policy="collect", budget=steady)
    configs["all (Guard)"] = lambda: gradguard.Guard(model, opt, policy="collect", budget=steady)
    configs["all (install)"] = _Installed
    return configs


class _Installed:
    def __enter__(self) -> gradguard.Guard:
        return gradguard.install(policy="collect", budget=gradguard.Budget(warmup=0))

    def __exit__(self, *exc: object) -> None:
        gradguard.uninstall()


def interleave(
    configs: dict[str, Callable[[], AbstractContextManager]],
    step: Callable[[], float],
    repeats: int,
    settle: int,
    steps: int,
    after_block: Callable[[str], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Blocks of ``steps`` steps under each configuration, in a shuffled order, ``repeats`` times.

    Returns the step times of each configuration and, for guarded ones, gradguard's own time
    per step in each block. ``settle`` unmeasured steps start every block (unguarded ones
    too: the same cache state); ``after_block(name)`` runs inside each block, after it.
    """
    times: dict[str, list[float]] = {name: [] for name in configs}
    inside: dict[str, list[float]] = {name: [] for name in configs}  # gradguard's own time per step
    rng = random.Random(0)
    for _ in range(repeats):
        order = list(configs)
        rng.shuffle(order)
        for name in order:
            with configs[name]() as guard:
                for _ in range(settle):
                    step()
                before = guard.overhead_s if isinstance(guard, gradguard.Guard) else 0.0
                block = [step() for _ in range(steps)]
                if isinstance(guard, gradguard.Guard):
                    inside[name].append((guard.overhead_s - before) / steps)
                if after_block is not None:
                    after_block(name)
            times[name].extend(block)
    return times, inside


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="steps per block")
    parser.add_argument("--repeats", type=int, default=6, help="blocks per configuration")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured steps first")
    parser.add_argument("--settle", type=int, default=40, help="unmeasured steps at the start of each block")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--detectors", default="", help="comma-separated codes (default: every detector)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = TinyTransformer(seq=args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = make_step(model, opt, args.batch, args.seq)
    codes = [c.strip().upper() for c in args.detectors.split(",") if c.strip()] or [d.code for d in DETECTORS]
    configs = contexts(model, opt, codes)
    for _ in range(args.warmup):
        step()
    times, inside = interleave(configs, step, args.repeats, args.settle, args.steps)

    base = statistics.median(times["none"])
    ratios = {name: statistics.median(t) / base for name, t in times.items()}
    print(
        f"torch {torch.__version__}, {args.repeats} x {args.steps} steps per configuration, "
        f"median unguarded step {base * 1e3:.2f} ms"
    )
    print(f"  {'configuration':<16} {'ratio':>7}   {'step':>9}   {'inside gradguard':>16}")
    own = {name: statistics.median(v) for name, v in inside.items() if v}
    for name, ratio in ratios.items():
        median_ms = statistics.median(times[name]) * 1e3
        inner = f"{own[name] * 1e6:8.0f} us/step" if name in own else ""
        print(f"  {name:<16} {ratio:6.3f}x   {median_ms:6.2f} ms   {inner:>16}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"median_step_s": base, "ratios": ratios, "inside_s_per_step": own}, fh, indent=2)
    return ratios


if __name__ == "__main__":
    main(sys.argv[1:])
