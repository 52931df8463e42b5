"""Pruner-Zero (Dong et al., ICML 2024): the symbolic score its genetic search found.

The published metric (``best_tree.json``) is ``mul(abs(mul(W, W)), mms(G))``:

    S = |W|^2 * mms(G),    mms(G) = (G - min G) / (max G - min G)

with ``G`` GBLM-Pruner's l2 gradient norms (scale 100, stored in fp16; the same cache entry as
``method=gblm method.norm=l2``), min and max over the whole Linear; the mask is Wanda's. As
published, ``|W|`` is taken in the weight's dtype, both factors are widened to fp32 first and
``mms`` subtracts and divides, so the bits are the published ones. Norms all equal give 0/0 = NaN
everywhere, and NaN sorts last and stably: every row prunes its first ``k`` columns, as published.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gblm.calibration.stats import LinearStats
from gblm.methods.base import ComparisonGroup
from gblm.methods.gradient_score import (
    AccumulatorDtype,
    GradientScorePruner,
    GroupSize,
    Norm,
    Scale,
    check_shape,
)


def min_max_scale(values: Tensor) -> Tensor:
    """``(x - min x) / (max x - min x)`` over the whole tensor, in its dtype (a new tensor)."""
    low, high = values.min(), values.max()
    return (values - low).div_(high - low)


def pruner_zero_score(weight: Tensor, grad_norm: Tensor) -> Tensor:
    """Pruner-Zero's score ``|W|^2 * mms(G)`` (d_out, d_in) in fp32; low is pruned."""
    check_shape(grad_norm, weight)
    magnitude = weight.abs().to(torch.float32)  # |W| in the weight's dtype, widened (a copy)
    scaled = min_max_scale(grad_norm.to(device=weight.device, dtype=torch.float32))
    return magnitude.mul_(magnitude).mul_(scaled)


class PrunerZeroPruner(GradientScorePruner):
    """``|W|^2`` times the min-max scaled gradient norm, selected per output row."""

    stats = frozenset()

    def __init__(
        self,
        norm: Norm = "l2",
        scale: Scale = 100.0,
        comparison_group: ComparisonGroup = "row",
        accumulator_dtype: AccumulatorDtype = "float16",
        gradient_blockwise: bool = False,
        gradient_group_size: GroupSize = 8,
    ) -> None:
        super().__init__(
            comparison_group, norm, scale, accumulator_dtype, gradient_blockwise,
            gradient_group_size,
        )  # fmt: skip

    def score(self, name: str, weight: Tensor, stats: LinearStats) -> Tensor:
        return pruner_zero_score(weight, self.gradient_norm(name, "Pruner-Zero"))
