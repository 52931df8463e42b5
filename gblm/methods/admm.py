"""ADMM (Boža 2024, arXiv 2401.02938): ``reconstruct=admm``, the weight update after any method's
mask, and ``method=admm``, the published pruner with its gradual mask (the math is
:mod:`gblm.pruning.admm`)."""

from __future__ import annotations

from torch import Tensor

from gblm.calibration.stats import LinearStats
from gblm.methods.base import WeightUpdate, require
from gblm.pruning.admm import admm_update

COMPARISON_GROUPS = ("layer", "row")


def _check(iters: int, rho: float, percdamp: float, key: str) -> None:
    if iters < 0:
        raise ValueError(f"{key}.iters={iters}: must be >= 0.")
    if rho <= 0:
        raise ValueError(f"{key}.rho={rho}: must be > 0.")
    if percdamp < 0:
        raise ValueError(f"{key}.percdamp={percdamp}: must be >= 0.")


class AdmmUpdate(WeightUpdate):
    """The kept weights updated by ADMM iterations on the normalised least-squares problem.

    Args:
        iters: ADMM iterations (20 published).
        rho: the ADMM penalty (1 published).
        percdamp: dampening, a share of the normalised ``mean(diag XX)`` (0.1 published).
    """

    name = "admm"
    stats = frozenset({"gram"})

    def __init__(self, iters: int = 20, rho: float = 1.0, percdamp: float = 0.1) -> None:
        _check(iters, rho, percdamp, "reconstruct")
        self.iters = iters
        self.rho = rho
        self.percdamp = percdamp

    def solve(self, dense: Tensor, mask: Tensor, stats: LinearStats) -> tuple[Tensor, Tensor]:
        gram = require(stats, "gram", "reconstruct=admm")
        return admm_update(dense, gram, mask, self.iters, self.rho, self.percdamp), mask
