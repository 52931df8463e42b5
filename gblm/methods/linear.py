"""A sparsity schedule rising linearly with depth: block ``b`` of ``B`` gets
``r + spread * (b / (B - 1) - 1/2)``, so the mean is the target ``r``."""

from __future__ import annotations

from typing import Annotated

from torch import Tensor, nn

from gblm.methods.base import RunContext
from gblm.methods.plans import SparsityPlan
from gblm.models.layers import decoder_layers
from gblm.options import Range
from gblm.pruning.sparsity import Sparsity


def linear_ratios(ratio: float, spread: float, blocks: int) -> list[float]:
    """``blocks`` ratios rising evenly by ``spread`` in all, centred on ``ratio``."""
    if blocks == 1:
        return [ratio]
    return [ratio + spread * (b / (blocks - 1) - 0.5) for b in range(blocks)]


class LinearPlan(SparsityPlan):
    """``sparsity=linear``: unstructured ratios; ``spread`` is the last block's minus the first's."""

    label = "linear"

    def __init__(self, sparsity: Sparsity, spread: Annotated[float, Range(ge=0)] = 0.1) -> None:
        super().__init__(sparsity)
        if sparsity.structured:
            raise ValueError(
                f"sparsity.allocator=linear with N:M {sparsity.label}: the schedule is for "
                "unstructured sparsity only; set sparsity=unstructured."
            )
        low, high = sparsity.ratio - spread / 2, sparsity.ratio + spread / 2
        if not (low >= 0 and high < 1):
            raise ValueError(
                f"sparsity.spread={spread} around sparsity.ratio={sparsity.ratio}: the ratios "
                f"would span [{low:g}, {high:g}]; allowed: spread >= 0 with both ends in [0, 1)."
            )
        self.spread = spread

    def prepare(self, model: nn.Module, windows: Tensor | None, context: RunContext) -> None:
        blocks = len(decoder_layers(model))
        ratios = linear_ratios(self.sparsity.ratio, self.spread, blocks)
        self.targets = [Sparsity(r) for r in ratios]
