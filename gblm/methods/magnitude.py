"""Magnitude pruning: score ``|W|``, no calibration data; one threshold per layer by default."""

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

    def column_score(
        self, name: str, stats: LinearStats, weight_cols: Tensor, start: int, end: int | None
    ) -> Tensor:
        return weight_cols.abs()
