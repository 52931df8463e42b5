"""The method interface.

A method prunes one Linear at a time, in place, given the statistics the layer walk gathered for
it, and returns the boolean mask of pruned entries (True = pruned). Score methods (magnitude,
Wanda, GBLM-Pruner) differ only in :meth:`ScorePruner.score`; SparseGPT overrides
:meth:`Pruner.prune_linear` because it also updates the surviving weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from gblm.pruning.masks import COMPARISON_GROUPS, select_mask, zero_masked_
from gblm.pruning.sparsity import Sparsity


@dataclass
class LinearStats:
    """What the walk gathered for one Linear. Only the fields the method asks for are filled."""

    row_sq_norms: Tensor | None = None  # (d_in,) fp32: mean over samples of sum_t X[n,t,j]^2
    hessian: Tensor | None = None  # (d_in, d_in) fp32: (2/N) sum_{n,t} x x^T
    grad_norm: Tensor | None = None  # (d_out, d_in): GBLM's accumulated gradient norm
    nsamples: int = 0


class Pruner(ABC):
    """Prunes one Linear in place and returns its mask (True = pruned)."""

    name: ClassVar[str] = "base"
    needs_activations: ClassVar[bool] = False  # row_sq_norms
    needs_hessian: ClassVar[bool] = False
    needs_gradients: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = True  # False: no data, no layer walk (magnitude)

    @abstractmethod
    def prune_linear(self, linear: nn.Linear, stats: LinearStats, sparsity: Sparsity) -> Tensor: ...

    def describe(self) -> dict:
        """The method's settings, for logs and run records."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class ScorePruner(Pruner):
    """score -> select_mask -> zero. Subclasses define ``score``."""

    def __init__(self, comparison_group: str = "row") -> None:
        if comparison_group not in COMPARISON_GROUPS:
            raise ValueError(
                f"method.comparison_group={comparison_group!r}: allowed values are {', '.join(COMPARISON_GROUPS)}."
            )
        self.comparison_group = comparison_group

    @abstractmethod
    def score(self, weight: Tensor, stats: LinearStats) -> Tensor:
        """Importance of every weight entry, shape (d_out, d_in); low scores are pruned."""

    def select(self, score: Tensor, sparsity: Sparsity) -> Tensor:
        return select_mask(score, sparsity.ratio, sparsity.n, sparsity.m, self.comparison_group)

    @torch.no_grad()
    def prune_linear(self, linear: nn.Linear, stats: LinearStats, sparsity: Sparsity) -> Tensor:
        weight = linear.weight.data
        mask = self.select(self.score(weight, stats), sparsity)
        zero_masked_(weight, mask)
        return mask
