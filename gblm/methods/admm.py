"""ADMM (Boža 2024, arXiv 2401.02938): ``reconstruct=admm``, the weight update after any method's
mask, and ``method=admm``, the published pruner (the math: :mod:`gblm.pruning.admm`)."""

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

Iters = Annotated[int, Range(ge=0)]
Rho = Annotated[float, Range(gt=0)]
Percdamp = Annotated[float, Range(ge=0)]


class AdmmUpdate(WeightUpdate):
    """The kept weights updated by ADMM on the normalised least-squares problem; ``iters``,
    ``rho`` and ``percdamp`` (a share of the normalised ``mean(diag XX)``) as published."""

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
    first ``gradual`` iterations (0: the first mask fixed) as the target rises cubically, the kept
    weights updated by ADMM; ``comparison_group=layer`` is the published default."""

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
        gram = require(stats, "gram", "ADMM")
        weight, mask = admm_prune(
            linear.weight.data, gram, target.ratio, target.structured,
            self.comparison_group == "row", self.gradual, self.iters, self.rho, self.percdamp,
        )  # fmt: skip
        linear.weight.data.copy_(weight)
        return mask
