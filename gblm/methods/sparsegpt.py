"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): prune against the Hessian and update the
surviving weights to absorb the error (:func:`gblm.pruning.sparsegpt.sparsegpt_prune`)."""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor, nn

from gblm.calibration.stats import LinearStats
from gblm.methods.base import Pruner, require
from gblm.options import Range
from gblm.pruning.sparsegpt import sparsegpt_prune
from gblm.pruning.sparsity import Sparsity


class SparseGPTPruner(Pruner):
    """Prune with the SparseGPT solve: the surviving weights are updated to absorb the error."""

    stats = frozenset({"hessian"})
    updates_weights = True

    def __init__(
        self,
        blocksize: Annotated[int, Range(ge=1)] = 128,
        percdamp: Annotated[float, Range(ge=0)] = 0.01,
        true_sequential: bool = False,
    ) -> None:
        self.blocksize = blocksize
        self.percdamp = percdamp
        self.true_sequential = true_sequential

    @torch.no_grad()
    def prune_linear(
        self, name: str, linear: nn.Linear, stats: LinearStats, target: Sparsity
    ) -> Tensor:
        hessian = require(stats, "hessian", "SparseGPT")
        weight, mask = sparsegpt_prune(
            linear.weight.data, hessian, target.ratio, target.n, target.m, self.blocksize,
            self.percdamp,
        )  # fmt: skip
        linear.weight.data.copy_(weight)
        return mask
