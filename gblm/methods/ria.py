"""RIA, relative importance and activations (Zhang et al., ICLR 2024).

``S_ij = (|W_ij| / sum_i' |W_i'j| + |W_ij| / sum_j' |W_ij'|) * sqrt(row_sq_j) ** a``: the
weight's share of its input column plus its share of its output row, times the input activation
norm to the ``a`` (relative importance in the weight's dtype, the product in fp32, as published).
One threshold per layer by default; ``comparison_group=row`` is the published ``--per_outneuron``.

For N:M, ``reallocation=true`` is the channel permutation: the input columns are reordered by
their total score so that every group of M mixes strong and weak ones, and the N:M mask is chosen
on the permuted score and mapped back (the weights are not moved). ``lsa=true`` then improves the
permutation slot by slot with a linear-sum assignment (scipy).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor

from gblm.calibration.stats import LinearStats
from gblm.methods.base import ComparisonGroup, ScorePruner, require
from gblm.options import Range
from gblm.pruning.masks import nm_mask
from gblm.pruning.sparsity import Sparsity


def ria_score(weight: Tensor, row_sq_norms: Tensor, a: float = 0.5) -> Tensor:
    """The RIA score (d_out, d_in) in fp32; the relative importance in ``weight.dtype``."""
    magnitude = weight.abs()
    relative = magnitude / magnitude.sum(dim=0) + magnitude / magnitude.sum(dim=1).reshape(-1, 1)
    activation = row_sq_norms.to(device=weight.device, dtype=torch.float32).sqrt() ** a
    return relative * activation.reshape(1, -1)


def reallocation_order(score: Tensor, m: int) -> Tensor:
    """The heuristic channel permutation: position ``k * m + q`` takes entry k of chunk q.

    The columns sorted by their total score (ascending) are cut into ``m`` chunks of ``d_in / m``;
    chunks 1, 3, ... (0-based) are read backwards. Returns ``idx`` (d_in,): permuted column p is
    original column ``idx[p]``.
    """
    d_in = score.shape[1]
    ranked = torch.sort(score.sum(dim=0), stable=True).indices  # (d_in,) ascending total score
    idx = torch.empty_like(ranked)
    for q in range(m):
        chunk = ranked[d_in * q // m : d_in * (q + 1) // m]
        idx[q::m] = chunk.flip(0) if q % 2 else chunk
    return idx


def _kept_score(groups: Tensor, n: int) -> Tensor:
    """Sum of the kept scores of N:M groups (..., rows, m): all but the ``n`` smallest of each."""
    lowest = torch.topk(groups, n, dim=-1, largest=False).values
    return groups.sum(dim=(-1, -2)) - lowest.sum(dim=(-1, -2))


def lsa_refine(score: Tensor, idx: Tensor, n: int, m: int) -> Tensor:
    """Improve a permutation slot by slot: for slot l, assign group g the slot-l column of group c.

    For every slot ``l < m`` the kept score of group g with its slot-l column taken from group c
    is tabulated for all (g, c), and scipy's linear-sum assignment (maximising) picks the columns.
    """
    from scipy.optimize import linear_sum_assignment

    idx = idx.clone()
    d_out, d_in = score.shape
    groups = d_in // m
    for slot in range(m):
        permuted = score[:, idx].float().reshape(d_out, groups, m)  # (d_out, groups, m)
        others = [q for q in range(m) if q != slot]
        candidates = permuted[:, :, slot]  # (d_out, c): the slot-l column of group c
        table = torch.empty(groups, groups)
        for g in range(groups):
            rest = permuted[:, g, others]  # (d_out, m - 1): group g's other columns
            trial = torch.cat(  # (c, d_out, m): group g with each candidate in slot l
                [candidates.t().unsqueeze(-1), rest.unsqueeze(0).expand(groups, -1, -1)], dim=-1
            )
            table[g] = _kept_score(trial, n)
        _, chosen = linear_sum_assignment(table.numpy(), maximize=True)
        chosen = torch.as_tensor(chosen, dtype=torch.long)
        slots = torch.arange(groups) * m + slot
        idx[slots] = idx[chosen * m + slot]
    return idx


class RIAPruner(ScorePruner):
    """Relative importance times the activation norm to the power ``a``."""

    stats = frozenset({"row_sq"})

    def __init__(
        self,
        a: Annotated[float, Range(ge=0)] = 0.5,
        comparison_group: ComparisonGroup = "layer",
        reallocation: bool = False,
        lsa: bool = False,
    ) -> None:
        super().__init__(comparison_group)
        if lsa and not reallocation:
            raise ValueError("method.lsa=true refines the channel reallocation: set reallocation.")
        if lsa:
            try:
                import scipy.optimize  # noqa: F401
            except ImportError as err:
                raise ValueError("method.lsa=true needs scipy (pip install scipy).") from err
        self.a = a
        self.reallocation = reallocation
        self.lsa = lsa

    def check_target(self, target: Sparsity) -> None:
        if self.reallocation and not target.structured:
            raise ValueError(
                "method.reallocation=true permutes the columns of N:M groups: it needs N:M "
                "sparsity (sparsity=nm_2_4 or nm_4_8); with unstructured sparsity set "
                "method.reallocation=false (and method.lsa=false)."
            )

    def score(self, name: str, weight: Tensor, stats: LinearStats) -> Tensor:
        return ria_score(weight, require(stats, "row_sq_norms", "RIA"), self.a)

    def select(self, score: Tensor, target: Sparsity) -> Tensor:
        if not (self.reallocation and target.structured):
            return super().select(score, target)
        idx = reallocation_order(score, target.m)
        if self.lsa:
            idx = lsa_refine(score, idx, target.n, target.m)
        mask = torch.zeros_like(score, dtype=torch.bool)
        mask[:, idx] = nm_mask(score[:, idx], target.n, target.m)
        return mask
