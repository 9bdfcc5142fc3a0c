"""Where every event comes from: the only code that registers torch hooks or patches functions.

Each source turns one kind of signal into events, is started once per guard when a
detector consumes what it provides (the module and optimizer sources always), and is
stopped on detach with every hook and patch removed. Detectors never register hooks.
"""

from __future__ import annotations

from gradguard.sources.attributes import AttributeSource
from gradguard.sources.autograd import AutogradSource
from gradguard.sources.base import Hub, Source
from gradguard.sources.modules import ModuleSource
from gradguard.sources.numpy import NumpySource
from gradguard.sources.optimizers import OptimizerSource
from gradguard.sources.resets import GradResetSource
from gradguard.sources.schedulers import SchedulerSource

#: Every source, in the order a guard starts them.
SOURCES: tuple[type[Source], ...] = (
    ModuleSource,
    OptimizerSource,
    AutogradSource,
    NumpySource,
    SchedulerSource,
    AttributeSource,
    GradResetSource,
)

__all__ = [
    "SOURCES",
    "AttributeSource",
    "AutogradSource",
    "GradResetSource",
    "Hub",
    "ModuleSource",
    "NumpySource",
    "OptimizerSource",
    "SchedulerSource",
    "Source",
]
