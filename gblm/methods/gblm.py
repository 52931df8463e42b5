"""GBLM-Pruner (Das et al., arXiv 2311.04902): prune, per output row, the lowest

    W_m[i, j] = |W[i, j]| * ||X[:, j]||_2  +  alpha * |W[i, j]| * ||G[:, i, j]||_p

computed as published: ``S = |W| * sqrt(row_sq) + |W| * G_p``, with ``row_sq`` the walk's mean
of squared inputs and ``G_p`` the dense model's per-sample gradient norm, alpha folded in (the
gradient stage, run and cached by :class:`gblm.methods.gradient_score.GradientScorePruner`). The
first term is fp32; the second, ``|W| * G_p``, takes torch's type promotion as published (fp16
only when both the weight and ``G_p`` are fp16; ``promote_types(bf16, fp16)`` is fp32), then is
widened for the sum.

Ablations: ``score=gradient`` keeps only ``|W| * G_p``, formed in fp32 as the published
``prune_gradient`` does (both factors widened first); ``score=activation`` only the first term,
which is Wanda (``scale=0`` also gives Wanda's mask exactly).
"""

from __future__ import annotations

from typing import Annotated

from torch import Tensor

from gblm.calibration.stats import LinearStats
from gblm.methods.base import ComparisonGroup, require
from gblm.methods.gradient_score import (
    AccumulatorDtype,
    GradientScorePruner,
    GroupSize,
    Norm,
    Scale,
    check_shape,
)
from gblm.methods.wanda import activation_term
from gblm.options import OneOf

SCORES = ("combined", "gradient", "activation")


def gblm_score(
    weight: Tensor, row_sq_norms: Tensor | None, grad_norm: Tensor | None, score: str = "combined"
) -> Tensor:
    """GBLM-Pruner's score (d_out, d_in) in fp32; ``row_sq_norms`` (d_in,) and ``grad_norm``
    (d_out, d_in) may be None where ``score`` does not use them."""
    if score not in SCORES:
        raise ValueError(f"method.score={score!r}: allowed values are {', '.join(SCORES)}.")
    if score == "activation":
        return activation_term(weight, row_sq_norms)
    check_shape(grad_norm, weight)
    grad_norm = grad_norm.to(weight.device)
    if score == "gradient":  # the published prune_gradient widens both factors first
        return weight.abs().float().mul_(grad_norm.float())
    gradient = weight.abs() * grad_norm  # torch's type promotion, as published (prune_gblm)
    return activation_term(weight, row_sq_norms).add_(gradient)  # the same sum as widened first


class GBLMPruner(GradientScorePruner):
    """Gradient-informed pruning: activation term plus ``|W|`` times the gradient norm."""

    elementwise_score = True

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
        super().__init__(
            comparison_group, norm, scale, accumulator_dtype, gradient_blockwise,
            gradient_group_size, uses_gradients=score != "activation",
        )  # fmt: skip
        self.score_kind = score
        self.stats = frozenset() if score == "gradient" else frozenset({"row_sq"})

    def column_score(
        self, name: str, stats: LinearStats, weight_cols: Tensor, start: int, end: int | None
    ) -> Tensor:
        row_sq = None
        if self.score_kind != "gradient":
            row_sq = require(stats, "row_sq_norms", "GBLM-Pruner")[start:end]
        grad = None
        if self.uses_gradients:
            grad = self.gradient_norm(name, "GBLM-Pruner")[:, start:end]
        return gblm_score(weight_cols, row_sq, grad, self.score_kind)
