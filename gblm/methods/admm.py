"""ADMM (Boža 2024, arXiv 2401.02938): ``reconstruct=admm``, the weight update after any method's
mask, and ``method=admm``, the published pruner with its gradual mask (the math is
:mod:`gblm.pruning.admm`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
from torch import Tensor, nn

from gblm.calibration.stats import LinearStats
from gblm.methods.base import ComparisonGroup, Pruner, WeightUpdate, require
from gblm.options import Range
from gblm.pruning.admm import admm_prune, admm_update
from gblm.pruning.sparsity import Sparsity

#: The ADMM options, declared once for the update and the pruner.
Iters = Annotated[int, Range(ge=0)]
Rho = Annotated[float, Range(gt=0)]
Percdamp = Annotated[float, Range(ge=0)]


class AdmmUpdate(WeightUpdate):
    """The kept weights updated by ADMM iterations on the normalised least-squares problem.

    Args:
        iters: ADMM iterations (20 published).
        rho: the ADMM penalty (1 published).
        percdamp: dampening, a share of the normalised ``mean(diag XX)`` (0.1 published).
    """

    name = "admm"
    stats = frozenset({"gram"})

    def __init__(self, iters: Iters = 20, rho: Rho = 1.0, percdamp: Percdamp = 0.1) -> None:
        self.iters = iters
        self.rho = rho
        self.percdamp = percdamp

    def solve(
        self, dense: Tensor, mask: Tensor, stats: LinearStats, target: Sparsity, score: Callable
    ) -> tuple[Tensor, Tensor]:
        gram = require(stats, "gram", "reconstruct=admm")
        return admm_update(dense, gram, mask, self.iters, self.rho, self.percdamp), mask


class AdmmPruner(Pruner):
    """The published ADMM pruner: the mask chosen on the normalised weights, re-chosen in the
    first ``gradual`` iterations as the target rises cubically, the kept weights updated by ADMM.

    Args:
        comparison_group: ``layer`` (published default; the re-chosen mask is at the target from
            the first iteration, a published quirk) | ``row`` (per output row, the schedule's
            sparsity at each step).
        gradual: iterations with a re-chosen mask (15 published; 0: the first mask fixed).
        iters: ADMM iterations (20 published).
        rho: the ADMM penalty (1 published).
        percdamp: dampening, a share of the normalised ``mean(diag XX)`` (0.1 published).
    """

    stats = frozenset({"gram"})
    updates_weights = True

    def __init__(
        self,
        comparison_group: ComparisonGroup = "layer",
        gradual: Annotated[int, Range(ge=0)] = 15,
        iters: Iters = 20,
        rho: Rho = 1.0,
        percdamp: Percdamp = 0.1,
    ) -> None:
        self.comparison_group = comparison_group
        self.gradual = gradual
        self.iters = iters
        self.rho = rho
        self.percdamp = percdamp

    def check_target(self, target: Sparsity) -> None:
        if target.structured and (target.n, target.m) != (2, 4):
            raise ValueError(
                f"sparsity N:M={target.n}:{target.m}: the published ADMM pruner prunes 2:4 only "
                "(allowed: sparsity=nm_2_4, or an unstructured sparsity.ratio)."
            )

    @torch.no_grad()
    def prune_linear(
        self, name: str, linear: nn.Linear, stats: LinearStats, target: Sparsity
    ) -> Tensor:
        self.check_target(target)  # a per-block plan may give a block another N
        weight, mask = admm_prune(
            linear.weight.data,
            require(stats, "gram", "ADMM"),
            target.ratio,
            two_of_four=target.structured,
            per_output=self.comparison_group == "row",
            gradual=self.gradual,
            iters=self.iters,
            rho=self.rho,
            percdamp=self.percdamp,
        )
        linear.weight.data.copy_(weight)
        return mask
