"""Magnitude pruning: score = |W|, no calibration data.

The published default compares over the whole layer (one threshold, ``score <= t``); N:M uses
per-row groups of M columns.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from gblm.pruning.base import LinearStats, ScorePruner


class MagnitudePruner(ScorePruner):
    """Prune the weights of smallest absolute value."""

    name: ClassVar[str] = "magnitude"
    needs_calibration: ClassVar[bool] = False

    def __init__(self, comparison_group: str = "layer") -> None:
        super().__init__(comparison_group)

    def score(self, weight: Tensor, stats: LinearStats) -> Tensor:
        return weight.abs()  # (d_out, d_in)
