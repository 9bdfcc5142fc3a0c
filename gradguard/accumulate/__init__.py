"""Gradient accumulation that equals the big batch: exact weights, partial windows, LR scaling, DDP."""

from gradguard.accumulate.accumulator import GradientAccumulator
from gradguard.accumulate.window import LrRamp, Weight, Window, ratio, rescale_grads_

__all__ = ["GradientAccumulator", "LrRamp", "Weight", "Window", "ratio", "rescale_grads_"]
