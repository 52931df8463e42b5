"""Magnitude pruning: score = |W|, no calibration data.

The published default compares over the whole layer (one threshold, ``score <= t``); N:M uses
per-row groups of M columns.
"""

from __future__ import annotations

from torch import Tensor

from gblm.calibration.stats import LinearStats
from gblm.methods.base import ComparisonGroup, ScorePruner


class MagnitudePruner(ScorePruner):
    """Prune the weights of smallest absolute value."""

    needs_calibration = False
    elementwise_score = True

    def __init__(self, comparison_group: ComparisonGroup = "layer") -> None:
        super().__init__(comparison_group)

    def score(self, name: str, weight: Tensor, stats: LinearStats) -> Tensor:
        return weight.abs()  # (d_out, d_in)

    def column_score(
        self, name: str, stats: LinearStats, weight_cols: Tensor, start: int, end: int
    ) -> Tensor:
        return weight_cols.abs()
