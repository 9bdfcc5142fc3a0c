"""torchmetrics list states that keep growing from epoch to epoch: a metric nobody resets.

A ``Metric`` whose state is a list (``CatMetric``, curves, retrieval metrics) appends to it at
every ``update()``; unless the metric is reset each epoch (Lightning does it for a metric
object passed to ``self.log``), the list holds every step of the run. torchmetrics is only
read when the program has imported it.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

import torch


def _list_states(metric: Any) -> list[str]:
    return [name for name, default in getattr(metric, "_defaults", {}).items() if isinstance(default, list)]


class MetricStates:
    """The list states of the metrics inside the watched models, seen at epoch starts."""

    def __init__(self) -> None:
        self._metrics: list[tuple[str, weakref.ref[Any]]] = []
        self._structure = -1
        self._sizes: dict[tuple[str, str], int] = {}
        self._flagged: set[tuple[str, str]] = set()

    def refresh(self, models: list[torch.nn.Module], structure: int) -> None:
        if structure == self._structure:
            return
        self._structure = structure
        torchmetrics = sys.modules.get("torchmetrics")
        metric_type = getattr(torchmetrics, "Metric", None)
        if metric_type is None:
            self._metrics = []
            return
        self._metrics = [
            (name, weakref.ref(m))
            for model in models
            for name, m in model.named_modules()
            if isinstance(m, metric_type) and name
        ]

    def grown(self) -> list[tuple[str, str, list[Any]]]:
        """The (metric path, state, values) that grew since the last epoch began and were not reset."""
        out = []
        for path, ref in self._metrics:
            metric = ref()
            if metric is None:
                continue
            for state in _list_states(metric):
                values = getattr(metric, state, None) or []
                key = (path, state)
                before = self._sizes.get(key)
                self._sizes[key] = len(values)
                if before is None or not values or len(values) <= before or key in self._flagged:
                    continue
                if before > 0:  # not reset since the last epoch began, and still growing
                    self._flagged.add(key)
                    out.append((path, state, list(values)))
        return out
