"""``reconstruct=obs``: the OBS weight update after any method's mask (SparseGPT's column sweep
with the mask held fixed, as in the weight-update ablation of Wanda, arXiv 2306.11695; the math
is :func:`gblm.pruning.obs.obs_update`)."""

from __future__ import annotations

from torch import Tensor

from gblm.calibration.stats import LinearStats
from gblm.methods.base import WeightUpdate, require
from gblm.pruning.obs import obs_update


class ObsUpdate(WeightUpdate):
    """The kept weights updated column by column against the Hessian, as SparseGPT does.

    Args:
        blocksize: columns per block of the sweep (128 published).
        percdamp: dampening, a share of ``mean(diag H)`` (0.01 published).
    """

    name = "obs"
    stats = frozenset({"hessian"})

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01) -> None:
        if blocksize < 1:
            raise ValueError(f"reconstruct.blocksize={blocksize}: must be >= 1.")
        if percdamp < 0:
            raise ValueError(f"reconstruct.percdamp={percdamp}: must be >= 0.")
        self.blocksize = blocksize
        self.percdamp = percdamp

    def solve(self, dense: Tensor, mask: Tensor, stats: LinearStats) -> tuple[Tensor, Tensor]:
        hessian = require(stats, "hessian", "reconstruct=obs")
        return obs_update(dense, hessian, mask, self.blocksize, self.percdamp)
