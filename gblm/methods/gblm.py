"""GBLM-Pruner (Das et al., arXiv 2311.04902): ``|W| * sqrt(row_sq) + |W| * G_p``, per output row.

The method owns two stages: its dense-model pass (the gradient stage of
:mod:`gblm.calibration.gradients`, cached on disk by :mod:`gblm.calibration.gradient_cache`; run
by :class:`gblm.methods.gradient_score.GradientScorePruner`, which Pruner-Zero shares) and the
per-Linear score (:func:`gblm.pruning.gblm.gblm_score`). The gradient stage's options are
declared (type and range) in :class:`GBLMPruner`'s signature and held by
:class:`gblm.calibration.fold.GradientSettings`.
"""

from __future__ import annotations

from typing import Annotated

from torch import Tensor

from gblm.calibration.stats import LinearStats
from gblm.methods.base import ComparisonGroup
from gblm.methods.gradient_score import (
    AccumulatorDtype,
    GradientScorePruner,
    GroupSize,
    Norm,
    Scale,
)
from gblm.options import OneOf
from gblm.pruning.gblm import SCORES, gblm_score


class GBLMPruner(GradientScorePruner):
    """Gradient-informed pruning: activation term plus ``|W|`` times the gradient norm."""

    def __init__(
        self,
        norm: Norm = "l1",
        scale: Scale = 100.0,
        score: Annotated[str, OneOf(SCORES)] = "combined",
        comparison_group: ComparisonGroup = "row",
        accumulator_dtype: AccumulatorDtype = "float16",
        gradient_blockwise: bool = False,
        gradient_group_size: GroupSize = 8,
    ) -> None:
        # An activation-only score (Wanda) needs no gradient stage.
        super().__init__(
            comparison_group, norm, scale, accumulator_dtype, gradient_blockwise,
            gradient_group_size, uses_gradients=score != "activation",
        )  # fmt: skip
        self.score_kind = score
        # A gradient-only score needs no activation statistic.
        self.stats = frozenset() if score == "gradient" else frozenset({"row_sq"})

    elementwise_score = True

    def column_score(
        self, name: str, stats: LinearStats, weight_cols: Tensor, start: int, end: int
    ) -> Tensor:
        row_sq = stats.row_sq_norms
        grad = self.gradient_norm(name, "GBLM-Pruner") if self.uses_gradients else None
        return gblm_score(
            weight_cols,
            row_sq[start:end] if row_sq is not None else None,
            grad[:, start:end] if grad is not None else None,
            self.score_kind,
        )

    def score(self, name: str, weight: Tensor, stats: LinearStats) -> Tensor:
        grad_norm = self.gradient_norm(name, "GBLM-Pruner") if self.uses_gradients else None
        return gblm_score(weight, stats.row_sq_norms, grad_norm, self.score_kind)

    def describe(self) -> dict:
        return {
            **self.gradient_options(),
            "score": self.score_kind,
            "comparison_group": self.comparison_group,
        }
