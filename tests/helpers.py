"""Small helpers shared by the tests."""

from __future__ import annotations

import inspect
import os
import textwrap


def line_of(marker: str, path: str | None = None) -> int:
    """The line number of the only line of ``path`` (default: the caller's file) ending with ``marker``."""
    if path is None:
        path = inspect.stack()[1].filename
    with open(path, encoding="utf-8") as fh:
        hits = [i for i, line in enumerate(fh, start=1) if line.rstrip().endswith(marker)]
    if len(hits) != 1:
        raise AssertionError(f"expected one line with {marker!r} in {path}, found {hits}")
    return hits[0]


def codes(findings) -> list[str]:
    return sorted(f.code for f in findings)


def same_file(location_file: str, path: str) -> bool:
    return os.path.abspath(location_file) == os.path.abspath(path)


def tiny_data(n: int = 8):
    """``n`` regression samples ``(x [n, 4], y [n, 1])``, the same every call."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=gen), torch.randn(n, 1, generator=gen)


def tiny_model():
    """A 4 -> 8 -> 1 MLP, the same weights every call."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def tiny_trainer(callbacks, **kwargs):
    """A quiet CPU Lightning ``Trainer`` for tests: one epoch, no logger, no checkpoints."""
    import lightning.pytorch as pl

    options = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


#: A script that never resets its gradients: GG101 at its `opt.step()` line (the last).
BUGGY_SCRIPT = textwrap.dedent(
    """
    import torch
    from torch import nn

    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for _ in range(4):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    """
)
