"""The static rules, in code order: an explicit registry.

Each rule has the code and name of the runtime detector that finds the same mistake while
the program runs. Rules that the source cannot decide reliably have no static form.
"""

from __future__ import annotations

from gradguard.lint.rule import LintRule
from gradguard.lint.rules.graph_retained import GraphRetained
from gradguard.lint.rules.missing_zero_grad import MissingZeroGrad
from gradguard.lint.rules.numpy_alias import NumpyAlias
from gradguard.lint.rules.param_not_in_optimizer import ParamNotInOptimizer
from gradguard.lint.rules.requires_grad_typo import RequiresGradTypo
from gradguard.lint.rules.zero_grad_before_step import ZeroGradBeforeStep

RULES: tuple[type[LintRule], ...] = (
    MissingZeroGrad,
    ZeroGradBeforeStep,
    GraphRetained,
    RequiresGradTypo,
    ParamNotInOptimizer,
    NumpyAlias,
)

__all__ = [
    "RULES",
    "GraphRetained",
    "MissingZeroGrad",
    "NumpyAlias",
    "ParamNotInOptimizer",
    "RequiresGradTypo",
    "ZeroGradBeforeStep",
]
