"""gradguard: catch the silent mistakes of PyTorch training loops while they run.

The names that need torch (``Guard``, ``Detector``, ``GradientAccumulator``, the learning
rate helpers) load on first use, so that ``import gradguard``, ``gradguard.install`` and the
command line's ``--help``, ``rules`` and ``explain`` do not import torch before they must.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradguard._version import __version__
from gradguard.errors import (
    ConfigurationError,
    EmptyWindowWarning,
    FindingError,
    FindingWarning,
    GradGuardError,
    GradGuardWarning,
    NothingWatchedWarning,
)
from gradguard.explain import explain
from gradguard.findings import Finding, Location, Severity
from gradguard.install import install, installed, uninstall
from gradguard.policy import Policy
from gradguard.rules import RULES
from gradguard.sampling import Budget

if TYPE_CHECKING:
    from gradguard.accumulate import GradientAccumulator
    from gradguard.detector import Detector
    from gradguard.guard import Guard
    from gradguard.lr import lr_scale_factor, scale_lr

_LAZY = {
    "Detector": "gradguard.detector",
    "GradientAccumulator": "gradguard.accumulate",
    "Guard": "gradguard.guard",
    "lr_scale_factor": "gradguard.lr",
    "scale_lr": "gradguard.lr",
}

__all__ = [
    "RULES",
    "Budget",
    "ConfigurationError",
    "Detector",
    "EmptyWindowWarning",
    "Finding",
    "FindingError",
    "FindingWarning",
    "GradGuardError",
    "GradGuardWarning",
    "GradientAccumulator",
    "Guard",
    "Location",
    "NothingWatchedWarning",
    "Policy",
    "Severity",
    "__version__",
    "explain",
    "install",
    "installed",
    "lr_scale_factor",
    "scale_lr",
    "uninstall",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gradguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
