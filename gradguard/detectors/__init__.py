"""The registry of detectors: one per file, listed here explicitly in code order."""

from __future__ import annotations

from collections.abc import Sequence

from gradguard.detector import Detector
from gradguard.detectors.accumulation_batchnorm import AccumulationBatchNorm
from gradguard.detectors.frozen_norm_stats import FrozenNormStats
from gradguard.detectors.frozen_param_updated import FrozenParamUpdated
from gradguard.detectors.graph_retained import GraphRetained
from gradguard.detectors.memory_growth import MemoryGrowth
from gradguard.detectors.missing_zero_grad import MissingZeroGrad
from gradguard.detectors.numpy_alias import NumpyAliasMutated
from gradguard.detectors.optimizer_updates_nothing import OptimizerUpdatesNothing
from gradguard.detectors.param_not_in_optimizer import ParamNotInOptimizer
from gradguard.detectors.param_without_grad import ParamWithoutGrad
from gradguard.detectors.requires_grad_typo import RequiresGradTypo
from gradguard.detectors.zero_grad_before_step import ZeroGradBeforeStep
from gradguard.errors import ConfigurationError
from gradguard.rules import RULES, resolve

DETECTORS: tuple[type[Detector], ...] = (
    MissingZeroGrad,
    ZeroGradBeforeStep,
    GraphRetained,
    MemoryGrowth,
    RequiresGradTypo,
    FrozenParamUpdated,
    ParamNotInOptimizer,
    FrozenNormStats,
    ParamWithoutGrad,
    OptimizerUpdatesNothing,
    NumpyAliasMutated,
    AccumulationBatchNorm,
)

#: What ``Guard(detectors=...)`` takes for one detector: a code or name, a class or an instance.
DetectorSpec = str | type[Detector] | Detector

__all__ = [
    "DETECTORS",
    "AccumulationBatchNorm",
    "DetectorSpec",
    "FrozenNormStats",
    "FrozenParamUpdated",
    "GraphRetained",
    "MemoryGrowth",
    "MissingZeroGrad",
    "NumpyAliasMutated",
    "OptimizerUpdatesNothing",
    "ParamNotInOptimizer",
    "ParamWithoutGrad",
    "RequiresGradTypo",
    "ZeroGradBeforeStep",
    "detector_class",
    "make_detectors",
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


def make_detectors(specs: Sequence[DetectorSpec] | None) -> list[Detector]:
    """Detector instances from what ``Guard(detectors=...)`` accepts (all registered ones for ``None``)."""
    if specs is None:
        return [cls() for cls in DETECTORS]
    if isinstance(specs, (str, Detector)) or (isinstance(specs, type) and issubclass(specs, Detector)):
        specs = [specs]
    out: list[Detector] = []
    for spec in specs:
        if isinstance(spec, Detector):
            if spec.attached:
                raise ConfigurationError(f"Expected a detached detector but {spec.code} is attached to a Guard")
            out.append(spec)
        elif isinstance(spec, type) and issubclass(spec, Detector):
            out.append(spec())
        elif isinstance(spec, str):
            out.append(detector_class(spec)())
        else:
            raise ConfigurationError(
                f"Expected detectors to hold codes, names, Detector classes or instances but got {spec!r}"
            )
    codes = [d.code for d in out]
    if len(set(codes)) != len(codes):
        raise ConfigurationError(f"Expected each detector once but got {codes}")
    return out
