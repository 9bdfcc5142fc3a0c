"""Gradient accumulation as a drop-in step: a token-weighted language-model loop.

A plain loop becomes an accumulating one by replacing three lines::

    loss.backward()                  ->  acc.backward(loss, num_items=n_tokens)
    optimizer.step()                 ->  (done by acc when a window is full)
    optimizer.zero_grad()            ->  (done by acc, after the step)

and calling ``acc.flush()`` at the end of the data. Sequences here have different lengths,
so each micro-batch's loss is a mean over a different number of tokens: ``num_items``
makes every window's step the step of the token mean over the whole window (the bug fixed
in transformers 4.46 with ``num_items_in_batch``), the last partial window included. The
learning rate, tuned for batches of 8 sequences, is scaled with the square-root rule for
AdamW, with a short warm-up, and the scheduler steps once per optimizer step.

    python examples/accumulation.py
    gradguard run examples/accumulation.py      # nothing to report
"""

import argparse

import torch
from torch import nn

from gradguard import GradientAccumulator


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


def batches(count: int, micro_batch_size: int, vocab: int = 64, pad: int = 0):
    """Micro-batches of padded sequences of random lengths (a counting task: next = this + 1)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(count):
        lengths = torch.randint(4, 24, (micro_batch_size,), generator=gen)
        tokens = torch.full((micro_batch_size, int(lengths.max())), pad)
        for row, length in enumerate(lengths.tolist()):
            start = int(torch.randint(1, vocab - length, (1,), generator=gen))
            tokens[row, :length] = torch.arange(start, start + length)
        yield tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--micro-batches", type=int, default=90)
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    windows = -(-args.micro_batches // args.accum)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=windows)
    acc = GradientAccumulator(
        optimizer,
        steps=args.accum,
        model=model,
        scheduler=scheduler,
        max_grad_norm=1.0,
        lr_scaling="sqrt",  # AdamW: lr x sqrt(effective / base)
        base_batch_size=8,
        micro_batch_size=args.micro_batch_size,
        warmup_steps=3,
    )
    print(f"effective batch {acc.effective_batch_size}, lr scaled by {acc.lr_factor:.2f}")

    for i, tokens in enumerate(batches(args.micro_batches, args.micro_batch_size)):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mask = targets != 0
        logits = model(inputs)
        loss = nn.functional.cross_entropy(logits[mask], targets[mask])  # mean over this micro-batch's tokens
        stepped = acc.backward(loss, num_items=int(mask.sum()))
        if stepped and acc.optimizer_steps % 5 == 0:
            print(f"micro-batch {i + 1:3d}  step {acc.optimizer_steps:2d}  loss {loss.item():.3f}")
    if acc.flush():
        print(f"flushed a partial window: {acc.optimizer_steps} optimizer steps in all")


if __name__ == "__main__":
    main()
