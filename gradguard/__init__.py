"""gradguard: catch the silent mistakes of PyTorch training loops while they run."""

from gradguard._version import __version__
from gradguard.accumulate import GradientAccumulator
from gradguard.detector import Detector
from gradguard.errors import ConfigurationError, FindingError, FindingWarning, GradGuardError, GradGuardWarning
from gradguard.explain import explain
from gradguard.findings import Finding, Location, Severity
from gradguard.guard import Guard
from gradguard.install import install, installed, uninstall
from gradguard.lr import lr_scale_factor, scale_lr
from gradguard.policy import Policy
from gradguard.rules import RULES
from gradguard.sampling import Budget

__all__ = [
    "RULES",
    "Budget",
    "ConfigurationError",
    "Detector",
    "Finding",
    "FindingError",
    "FindingWarning",
    "GradGuardError",
    "GradGuardWarning",
    "GradientAccumulator",
    "Guard",
    "Location",
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
