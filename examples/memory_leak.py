"""A training loop that leaks memory: it keeps every step's activations in a dict.

Run it under gradguard, unchanged, and get the HTML report (open it in any browser; it
needs no network):

    gradguard run --json reports/memory_leak.json --html reports/memory_leak.html examples/memory_leak.py

gradguard reports GG301 memory-growth: "`cache` (dict, examples/memory_leak.py:53) gains
1 tensor [512, 1024] float32 (2 MiB) per step", with the rate, the growth and the step at
which the host runs out of memory. The page plots memory per step with the trend drawn
over it. Rebuild the page from the JSON at any time:

    gradguard report reports/memory_leak.json --html reports/memory_leak.html

Pass ``--fixed`` to keep only a bounded window of recent activations, which reports nothing.
"""

import argparse
import collections

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 1024), nn.ReLU())
        self.head = nn.Linear(1024, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(x)
        return self.head(hidden), hidden


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixed", action="store_true", help="keep a bounded window instead")
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    cache = collections.deque(maxlen=8) if args.fixed else {}

    for step in range(args.steps):
        x = torch.randn(512, 64)
        out, hidden = model(x)
        if args.fixed:
            cache.append(hidden.detach())
        else:
            cache[step] = hidden.detach()  # the leak: one [512, 1024] tensor kept per step
        loss = out.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
