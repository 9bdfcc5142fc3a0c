"""The registry of detectors: one per file, listed here explicitly in code order."""

from __future__ import annotations

from gradguard.detector import Detector
from gradguard.detectors.missing_zero_grad import MissingZeroGrad
from gradguard.detectors.numpy_alias import NumpyAliasMutated
from gradguard.errors import ConfigurationError
from gradguard.rules import RULES, resolve

DETECTORS: tuple[type[Detector], ...] = (MissingZeroGrad, NumpyAliasMutated)

__all__ = ["DETECTORS", "MissingZeroGrad", "NumpyAliasMutated", "detector_class"]


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
