"""The registry of detectors: one per file, listed here explicitly in code order."""

from __future__ import annotations

from gradguard.detector import Detector
from gradguard.detectors.accumulation_batchnorm import AccumulationBatchNorm
from gradguard.detectors.frozen_norm_stats import FrozenNormStats
from gradguard.detectors.frozen_param_updated import FrozenParamUpdated
from gradguard.detectors.graph_retained import GraphRetained
from gradguard.detectors.memory_growth import MemoryGrowth
from gradguard.detectors.missing_zero_grad import MissingZeroGrad
from gradguard.detectors.numpy_alias import NumpyAliasMutated
from gradguard.detectors.param_not_in_optimizer import ParamNotInOptimizer
from gradguard.detectors.param_without_grad import ParamWithoutGrad
from gradguard.detectors.requires_grad_typo import RequiresGradTypo
from gradguard.errors import ConfigurationError
from gradguard.rules import RULES, resolve

DETECTORS: tuple[type[Detector], ...] = (
    MissingZeroGrad,
    GraphRetained,
    MemoryGrowth,
    RequiresGradTypo,
    FrozenParamUpdated,
    ParamNotInOptimizer,
    FrozenNormStats,
    ParamWithoutGrad,
    NumpyAliasMutated,
    AccumulationBatchNorm,
)

__all__ = [
    "DETECTORS",
    "AccumulationBatchNorm",
    "FrozenNormStats",
    "FrozenParamUpdated",
    "GraphRetained",
    "MemoryGrowth",
    "MissingZeroGrad",
    "NumpyAliasMutated",
    "ParamNotInOptimizer",
    "ParamWithoutGrad",
    "RequiresGradTypo",
    "detector_class",
]


def detector_class(code_or_name: str) -> type[Detector]:
    """The detector class for a code or rule name.

    >>> detector_class("missing-zero-grad").__name__
    'MissingZeroGrad'
    """
    code = resolve(code_or_name)
    for cls in DETECTORS:
        if cls.code == code:
            return cls
    if code is not None:
        raise ConfigurationError(f"Rule {code} {RULES[code]} has no detector in this version of gradguard")
    known = ", ".join(f"{c.code} ({c.name})" for c in DETECTORS)
    raise ConfigurationError(f"Expected a detector code or name among {known} but got {code_or_name!r}")
