"""Overhead of GradientAccumulator against a hand-written accumulation loop.

A small transformer trains on CPU with ``--accum`` micro-batches per optimizer step. The
hand-written loop is the usual one::

    (loss / accum).backward()
    if (i + 1) % accum == 0:
        opt.step(); opt.zero_grad(set_to_none=True)

and is compared with ``acc.backward(loss)``, with ``acc.backward(loss, num_items=n)``
(token-weighted: one extra in-place pass over the gradients per window) and with the
accumulator under a Guard with every detector. Configurations run in blocks of windows,
interleaved in one process in a shuffled order each repeat; the figure is the median time
of one window (``accum`` forward/backward passes and one step) divided by that of the
hand-written loop.

    python benchmarks/accumulation.py
    python benchmarks/accumulation.py --accum 8 --repeats 10
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch
from overhead import TinyTransformer  # the same model as the overhead harness (same folder)
from torch import nn

import gradguard
from gradguard import GradientAccumulator


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    vocab = model.head.out_features
    logits = model(tokens)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))


def make_windows(
    model: nn.Module, opt: torch.optim.Optimizer, accum: int, batch: int, seq: int
) -> dict[str, Callable[[], float]]:
    vocab = model.head.out_features
    gen = torch.Generator().manual_seed(0)
    acc = GradientAccumulator(opt, steps=accum, model=model)
    items = batch * (seq - 1)

    def data() -> list[torch.Tensor]:
        return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(accum)]

    def hand_written() -> float:
        micro = data()
        start = time.perf_counter()
        for i, tokens in enumerate(micro):
            (lm_loss(model, tokens) / accum).backward()
            if (i + 1) % accum == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def accumulator() -> float:
        micro = data()
        start = time.perf_counter()
        for tokens in micro:
            acc.backward(lm_loss(model, tokens))
        return time.perf_counter() - start

    def weighted() -> float:
        micro = data()
        start = time.perf_counter()
        for tokens in micro:
            acc.backward(lm_loss(model, tokens), num_items=items)
        return time.perf_counter() - start

    def guarded() -> float:
        micro = data()
        with gradguard.Guard(model, opt, policy="collect"):
            start = time.perf_counter()
            for tokens in micro:
                acc.backward(lm_loss(model, tokens))
            return time.perf_counter() - start

    return {
        "hand-written": hand_written,
        "GradientAccumulator": accumulator,
        "  num_items": weighted,
        "  under Guard": guarded,
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--windows", type=int, default=10, help="windows per block")
    parser.add_argument("--repeats", type=int, default=6, help="blocks per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured windows first")
    parser.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=64, help="smaller makes the fixed cost per call show more")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = TinyTransformer(d_model=args.d_model, layers=args.layers, seq=args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    configs = make_windows(model, opt, args.accum, args.batch, args.seq)
    times: dict[str, list[float]] = {name: [] for name in configs}

    for run in configs.values():
        for _ in range(args.warmup):
            run()
    rng = random.Random(0)
    for _ in range(args.repeats):
        order = list(configs)
        rng.shuffle(order)
        for name in order:
            times[name].extend(configs[name]() for _ in range(args.windows))

    base = statistics.median(times["hand-written"])
    ratios = {name: statistics.median(t) / base for name, t in times.items()}
    print(
        f"torch {torch.__version__}, {args.accum} micro-batches of {args.batch}x{args.seq} tokens per step, "
        f"{args.repeats} x {args.windows} windows per configuration; "
        f"median hand-written window {base * 1e3:.2f} ms"
    )
    for name, ratio in ratios.items():
        print(f"  {name:<20} {ratio:6.3f}x   ({statistics.median(times[name]) * 1e3:.2f} ms)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"median_window_s": base, "ratios": ratios}, fh, indent=2)
    return ratios


if __name__ == "__main__":
    main(sys.argv[1:])
