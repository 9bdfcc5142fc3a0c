"""False alarms: correct training loops whose memory goes up and down, run many times.

Each loop is written the way people write it, and none of them leaks:

- ``replay-varying``: a bounded ``collections.deque(maxlen=...)`` replay buffer of
  ``(observation, target)`` tuples with batches of varying size, trained on a sample of it;
  it fills after the point where GG301 first decides;
- ``two-sizes``: batches of two sizes, one step each;
- ``dataloader``: a ``DataLoader`` over a dataset that makes fresh tensors for every item;
- ``lru-tokenizer``: a tokenizer behind ``functools.lru_cache(maxsize=...)`` over a finite
  corpus: the cache fills, then stops (GG301 may say so as info, never as a warning);
- ``tbptt-rnn``: an LSTM trained with truncated backpropagation through time, its hidden
  state detached between chunks.

Every run trains under ``gradguard.Guard(model, optimizer, policy="collect")`` with every
detector on, in a fresh interpreter by default (the allocator starts as a user's run
does; ``--in-process`` runs them all in this one, faster). A warning counts even if a
later revision lowered it, since the user already saw it. The table gives, per loop, the
runs, the runs with a warning, the warnings by code, and the info findings by code; the
exit status is 1 if any run had a warning.

    python benchmarks/false_alarms.py                  # every loop, 10 runs each
    python benchmarks/false_alarms.py --runs 20 --loops replay-varying,two-sizes -v
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import gradguard
from gradguard.findings import Finding

STEPS = 150


def _train(model: nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad()
    loss.backward()
    opt.step()


def replay_varying(guard_of: Callable[..., gradguard.Guard], rng: random.Random, steps: int) -> None:
    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    replay: collections.deque[tuple[torch.Tensor, torch.Tensor]] = collections.deque(maxlen=48)
    with guard_of(model, opt):
        for _ in range(steps):
            n = rng.randint(32, 768)
            replay.append((torch.randn(n, 512), torch.randn(n, 8)))
            batch = rng.sample(list(replay), min(4, len(replay)))
            x = torch.cat([obs for obs, _ in batch])
            y = torch.cat([target for _, target in batch])
            _train(model, opt, F.mse_loss(model(x), y))


def two_sizes(guard_of: Callable[..., gradguard.Guard], rng: random.Random, steps: int) -> None:
    model = nn.Sequential(nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sizes = (rng.choice((32, 64, 128)), rng.choice((512, 768, 1024)))
    with guard_of(model, opt):
        for step in range(steps):
            x = torch.randn(sizes[step % 2], 1024)
            _train(model, opt, model(x).pow(2).mean())


class _Images(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __len__(self) -> int:
        return 100_000

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + index)
        return torch.rand(3, 48, 48, generator=gen), index % 10


def dataloader(guard_of: Callable[..., gradguard.Guard], rng: random.Random, steps: int) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(_Images(rng.randrange(1000)), batch_size=48, shuffle=True)
    with guard_of(model, opt):
        for step, (images, labels) in enumerate(loader):
            if step == steps:
                break
            _train(model, opt, F.cross_entropy(model(images), labels))


def lru_tokenizer(guard_of: Callable[..., gradguard.Guard], rng: random.Random, steps: int) -> None:
    words = [f"w{i}" for i in range(5000)]
    corpus = [" ".join(rng.choices(words, k=rng.randint(200, 3000))) for _ in range(600)]
    vocab = {w: i for i, w in enumerate(words)}

    @functools.lru_cache(maxsize=1024)
    def encode(text: str) -> torch.Tensor:
        return torch.tensor([vocab[w] for w in text.split()])

    model = nn.Sequential(nn.EmbeddingBag(len(words), 64), nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with guard_of(model, opt):
        for _ in range(steps):
            texts = rng.sample(corpus, 16)
            ids = [encode(t) for t in texts]
            offsets = torch.tensor([0] + [len(t) for t in ids[:-1]]).cumsum(0)
            logits = model[1](model[0](torch.cat(ids), offsets))
            _train(model, opt, F.cross_entropy(logits, torch.randint(0, 2, (16,))))


class _Lm(nn.Module):
    def __init__(self, vocab: int = 1000, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 64)
        self.rnn = nn.LSTM(64, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(
        self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out, state = self.rnn(self.embed(tokens), state)
        return self.head(out), state


def tbptt_rnn(guard_of: Callable[..., gradguard.Guard], rng: random.Random, steps: int) -> None:
    model = _Lm()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rng.randrange(1000))
    stream = torch.randint(0, 1000, (32, steps * 35 + 1), generator=gen)
    state = None
    with guard_of(model, opt):
        for step in range(steps):
            chunk = stream[:, step * 35 : (step + 1) * 35 + 1]
            if state is not None:
                state = (state[0].detach(), state[1].detach())  # truncate the graph between chunks
            logits, state = model(chunk[:, :-1], state)
            _train(model, opt, F.cross_entropy(logits.reshape(-1, 1000), chunk[:, 1:].reshape(-1)))


LOOPS: dict[str, Callable[[Callable[..., gradguard.Guard], random.Random, int], None]] = {
    "replay-varying": replay_varying,
    "two-sizes": two_sizes,
    "dataloader": dataloader,
    "lru-tokenizer": lru_tokenizer,
    "tbptt-rnn": tbptt_rnn,
}


def run_once(loop: str, seed: int, steps: int) -> list[dict[str, str]]:
    """One run of a loop with every detector on: each finding as the user first saw it and as it ended."""
    torch.manual_seed(seed)
    seen: dict[tuple[object, ...], dict[str, str]] = {}

    def note(finding: Finding) -> None:
        entry = seen.setdefault(finding.key, {"code": finding.code, "loudest": "info", "message": ""})
        if finding.severity >= entry["loudest"]:
            entry["loudest"] = finding.severity.value
        entry["final"] = finding.severity.value
        entry["message"] = finding.message

    def guard_of(model: nn.Module, opt: torch.optim.Optimizer) -> gradguard.Guard:
        guard = gradguard.Guard(model, opt, policy="collect")
        guard.finding_callbacks.append(note)
        return guard

    LOOPS[loop](guard_of, random.Random(seed), steps)
    return list(seen.values())


def _child(loop: str, seed: int, steps: int) -> list[dict[str, str]]:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", loop, str(seed), "--steps", str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{loop} (seed {seed}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="runs of each loop (default 10)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps of each run (default {STEPS})")
    parser.add_argument("--loops", default=",".join(LOOPS), help="comma-separated loops (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first run")
    parser.add_argument("--in-process", action="store_true", help="run every loop in this interpreter")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every finding")
    parser.add_argument("--child", nargs=2, metavar=("LOOP", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(run_once(args.child[0], int(args.child[1]), args.steps)))
        return 0
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    unknown = [name for name in loops if name not in LOOPS]
    if unknown:
        parser.error(f"Expected loops among {', '.join(LOOPS)} but got {', '.join(unknown)}")
    order = [(loop, args.seed + i) for i in range(args.runs) for loop in loops]
    random.Random(args.seed).shuffle(order)  # interleaved: the machine's drift hits every loop alike
    results: dict[str, list[list[dict[str, str]]]] = {loop: [] for loop in loops}
    start = time.perf_counter()
    for loop, seed in order:
        findings = run_once(loop, seed, args.steps) if args.in_process else _child(loop, seed, args.steps)
        results[loop].append(findings)
        if args.verbose:
            for f in findings:
                print(f"{loop} seed {seed}: {f['code']} [{f['loudest']} -> {f['final']}] {f['message']}")
    print(f"{len(order)} runs of {args.steps} steps, every detector on, in {time.perf_counter() - start:.0f} s")
    print(f"{'loop':<16} {'runs':>5} {'warned':>7}  {'warnings':<20} {'info'}")
    warned_total = 0
    for loop in loops:
        runs = results[loop]
        warned = sum(any(f["loudest"] != "info" for f in run) for run in runs)
        warned_total += warned
        loud = collections.Counter(f["code"] for run in runs for f in run if f["loudest"] != "info")
        quiet = collections.Counter(f["code"] for run in runs for f in run if f["loudest"] == "info")
        print(f"{loop:<16} {len(runs):>5} {warned:>7}  {_counts(loud):<20} {_counts(quiet)}")
    return 1 if warned_total else 0


def _counts(counter: collections.Counter[str]) -> str:
    return ", ".join(f"{code} x{n}" for code, n in sorted(counter.items())) or "-"


if __name__ == "__main__":
    sys.exit(main())
