"""Wanda: score = |W[i, j]| * ||X_j||_2 / sqrt(N) (Sun et al. 2023, arXiv 2306.11695, Eq. 1).

``sqrt(row_sq)`` is the input-channel activation norm gathered by the layer walk; the comparison
group is the output row. ``use_variant`` is the paper's appendix variant (per-row cumulative-score
budget ``alpha``, found by bisection), for unstructured sparsity only.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from gblm.pruning.base import LinearStats, ScorePruner, Sparsity
from gblm.pruning.masks import variant_mask


def activation_term(weight: Tensor, row_sq_norms: Tensor) -> Tensor:
    """``|W| * sqrt(row_sq)`` in fp32, shape (d_out, d_in): Wanda's score, GBLM-Pruner's first term.

    An fp16 or bf16 weight is widened (exactly) before the product, as type promotion would.
    """
    norms = row_sq_norms.to(device=weight.device, dtype=torch.float32).sqrt()  # (d_in,)
    # abs() makes a fresh tensor (so does float() of a narrower one): the in-place product is safe
    return weight.abs().float().mul_(norms.reshape(1, -1))  # (d_out, d_in) * (1, d_in)


class WandaPruner(ScorePruner):
    """Prune by weight magnitude times input activation norm."""

    name: ClassVar[str] = "wanda"
    needs_activations: ClassVar[bool] = True

    def __init__(self, comparison_group: str = "row", use_variant: bool = False) -> None:
        super().__init__(comparison_group)
        if use_variant and comparison_group != "row":
            raise ValueError(
                f"method.use_variant=true works per output row; got comparison_group={comparison_group!r}."
            )
        self.use_variant = use_variant

    def score(self, weight: Tensor, stats: LinearStats) -> Tensor:
        if stats.row_sq_norms is None:
            raise ValueError(
                "Wanda needs the activation statistic row_sq_norms from the layer walk."
            )
        return activation_term(weight, stats.row_sq_norms)

    def select(self, score: Tensor, sparsity: Sparsity) -> Tensor:
        if self.use_variant and not sparsity.structured:
            return variant_mask(score, sparsity.ratio)
        return super().select(score, sparsity)
