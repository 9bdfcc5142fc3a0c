"""A small regression loop with a classic silent bug: no optimizer.zero_grad().

Run it under gradguard, unchanged:

    gradguard run examples/missing_zero_grad.py

gradguard reports GG101 missing-zero-grad at the ``optimizer.step()`` line. Pass ``--fixed``
to run the corrected loop, which reports nothing.
"""

import argparse

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixed", action="store_true", help="reset the gradients every step")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1) + 0.1 * torch.randn(256, 1)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    for step in range(args.steps):
        batch = torch.randint(0, len(x), (32,))
        loss = nn.functional.mse_loss(model(x[batch]), y[batch])
        if args.fixed:
            optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
