"""Wanda (Sun et al. 2023, arXiv 2306.11695): score ``|W_ij| * ||X_j||_2 / sqrt(N)``, per output row.

``use_variant`` is the paper's appendix variant (a per-row cumulative-score budget, found by
bisection), for unstructured sparsity only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gblm.calibration.stats import LinearStats
from gblm.methods.base import ComparisonGroup, ScorePruner, require
from gblm.pruning.masks import variant_mask
from gblm.pruning.sparsity import Sparsity


def activation_term(weight: Tensor, row_sq_norms: Tensor) -> Tensor:
    """``|W| * sqrt(row_sq)`` in fp32 (d_out, d_in): Wanda's score, GBLM-Pruner's first term."""
    norms = row_sq_norms.to(device=weight.device, dtype=torch.float32).sqrt()  # (d_in,)
    return weight.abs().float().mul_(norms.reshape(1, -1))  # abs() is a fresh tensor


class WandaPruner(ScorePruner):
    """Prune by weight magnitude times input activation norm."""

    stats = frozenset({"row_sq"})
    elementwise_score = True

    def __init__(
        self, comparison_group: ComparisonGroup = "row", use_variant: bool = False
    ) -> None:
        super().__init__(comparison_group)
        if use_variant and comparison_group != "row":
            raise ValueError(
                "method.use_variant=true works per output row; got "
                f"comparison_group={comparison_group!r}."
            )
        self.use_variant = use_variant

    def check_target(self, target: Sparsity) -> None:
        if self.use_variant and target.structured:
            raise ValueError(
                "method.use_variant=true is for unstructured sparsity only; with N:M "
                f"{target.label} set method.use_variant=false."
            )

    def column_score(
        self, name: str, stats: LinearStats, weight_cols: Tensor, start: int, end: int | None
    ) -> Tensor:
        return activation_term(weight_cols, require(stats, "row_sq_norms", "Wanda")[start:end])

    def select(self, score: Tensor, target: Sparsity) -> Tensor:
        if self.use_variant and not target.structured:
            return variant_mask(score, target.ratio)
        return super().select(score, target)
