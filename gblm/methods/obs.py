"""``reconstruct=obs``: the OBS weight update after any method's mask, SparseGPT's column sweep
with the mask held fixed (Wanda's weight-update ablation, arXiv 2306.11695)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from torch import Tensor

from gblm.calibration.stats import LinearStats
from gblm.methods.base import WeightUpdate, require
from gblm.options import Range
from gblm.pruning.sparsegpt import sparsegpt_prune
from gblm.pruning.sparsity import Sparsity


class ObsUpdate(WeightUpdate):
    """The kept weights updated column by column against the Hessian, as SparseGPT does;
    ``iterative=true`` re-chooses the mask per block of columns (or group of M) on the updated
    weights with the method's own score (the ablation's ``ablate_*_iter``)."""

    name = "obs"
    stats = frozenset({"hessian"})

    def __init__(
        self,
        blocksize: Annotated[int, Range(ge=1)] = 128,
        percdamp: Annotated[float, Range(ge=0)] = 0.01,
        iterative: bool = False,
    ) -> None:
        self.blocksize = blocksize
        self.percdamp = percdamp
        self.iterative = iterative

    @property
    def rechooses_mask(self) -> bool:
        return self.iterative

    def solve(
        self, dense: Tensor, mask: Tensor, stats: LinearStats, target: Sparsity, score: Callable
    ) -> tuple[Tensor, Tensor]:
        hessian = require(stats, "hessian", "reconstruct=obs")
        if self.iterative:
            return sparsegpt_prune(
                dense, hessian, target.ratio, target.n, target.m, self.blocksize, self.percdamp,
                score=score,
            )  # fmt: skip
        return sparsegpt_prune(
            dense, hessian, 0.0, blocksize=self.blocksize, percdamp=self.percdamp, mask=mask
        )
