"""Mask selection from a score matrix (d_out, d_in); True in a mask means pruned.

- ``row``: in every output row prune the first ``int(d_in * ratio)`` of a stable ascending sort
  (among equal scores the lower column first; Wanda / GBLM-Pruner).
- ``layer``: prune ``score <= sort(score.flatten())[int(numel * ratio)]`` (the published
  magnitude rule; ties may overshoot, a ratio that rounds to zero entries prunes nothing).
- N:M: the N lowest of every group of M consecutive columns of a row.
- :func:`variant_mask`: Wanda's appendix variant, a per-row cumulative-score budget.

NaN sorts last, so a NaN is pruned only when a row or layer has too few finite entries.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

COMPARISON_GROUPS = ("row", "layer")
_NUMPY_SELECTS = (torch.float16, torch.float32, torch.float64)


def kth_smallest(values: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest entry (1-based) of every row of ``values`` (rows, n): (rows, 1).

    On the CPU NumPy's ``np.partition`` (faster than ``torch.kthvalue`` there; both put NaN
    last); bf16 and other devices use ``torch.kthvalue``.
    """
    if values.device.type == "cpu" and values.dtype in _NUMPY_SELECTS:
        rows = np.partition(values.detach().numpy(), k - 1, axis=1)  # (rows, n), a copy
        return torch.from_numpy(np.ascontiguousarray(rows[:, k - 1 : k]))
    return torch.kthvalue(values, k, dim=1, keepdim=True).values


def zero_masked_(weight: Tensor, mask: Tensor) -> Tensor:
    """``weight[mask] = 0`` in place, writing exactly +0.0: the raw bits times ``~mask`` (bit for
    bit a masked fill, and much faster on a CPU)."""
    bits = _SAME_SIZE_INT.get(weight.dtype)
    if bits is None:
        weight[mask] = 0
    else:
        weight.view(bits).mul_(mask.logical_not())
    return weight


_SAME_SIZE_INT = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}


def unstructured_row_mask(score: Tensor, ratio: float) -> Tensor:
    """Prune the first ``int(d_in * ratio)`` entries of a stable ascending sort of every row.

    Without sorting: with ``v`` the row's k-th smallest entry, those are every entry below ``v``
    and the leftmost entries equal to ``v``, up to k in all (NaNs tie, as in ``torch.sort``).
    """
    d_in = score.shape[1]
    k = int(d_in * ratio)
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k == d_in:
        return torch.ones_like(score, dtype=torch.bool)
    kth = kth_smallest(score, k)  # (d_out, 1); NaN where a row has fewer than k numbers
    below, tied = score < kth, score == kth  # (d_out, d_in)
    kth_nan = kth.isnan()
    if bool(kth_nan.any()):  # such rows prune every number and the leftmost NaNs
        nan = score.isnan()
        below = torch.where(kth_nan, ~nan, below)
        tied = torch.where(kth_nan, nan, tied)
    room = k - below.sum(dim=1, keepdim=True, dtype=torch.int32)  # ties still to prune per row
    return below | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= room))


def unstructured_layer_mask(score: Tensor, ratio: float) -> Tensor:
    """Prune every entry at or below ``sorted(score.flatten())[int(numel * ratio)]`` (found by
    ``kthvalue``, compared in fp32)."""
    k = int(score.numel() * ratio)
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    values = score.float()
    threshold = torch.kthvalue(values.flatten(), k + 1).values
    return values <= threshold


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """In every group of ``m`` consecutive columns of each row, prune the ``n`` lowest."""
    d_out, d_in = score.shape
    if d_in % m:
        raise ValueError(f"N:M {n}:{m} needs the input width ({d_in}) to be a multiple of M.")
    groups = score.float().reshape(d_out, d_in // m, m)  # (d_out, groups, m)
    lowest = torch.topk(groups, n, dim=-1, largest=False)[1]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True)
    return mask.reshape(d_out, d_in)


def select_mask(score: Tensor, ratio: float, n: int = 0, m: int = 0, group: str = "row") -> Tensor:
    """Dispatch on the sparsity pattern: N:M when ``m > 0``, else unstructured by ``group``."""
    if m > 0:
        return nm_mask(score, n, m)
    if group == "row":
        return unstructured_row_mask(score, ratio)
    if group == "layer":
        return unstructured_layer_mask(score, ratio)
    raise ValueError(
        f"comparison_group={group!r}: allowed values are {', '.join(COMPARISON_GROUPS)}."
    )


def _mask_for_alpha(
    score: Tensor, sorted_score: Tensor, cumsum: Tensor, row_sum: Tensor, alpha: float
) -> Tensor:
    under = cumsum <= (row_sum * alpha).reshape(-1, 1)  # (d_out, d_in)
    count = under.sum(dim=1, keepdim=True)  # entries per row under the budget
    threshold = torch.gather(sorted_score, 1, (count - 1).clamp(min=0))
    threshold = torch.where(count > 0, threshold, torch.full_like(threshold, -torch.inf))
    return score <= threshold


def variant_mask(score: Tensor, ratio: float, tolerance: float = 0.001) -> Tensor:
    """Wanda's variant: bisection on alpha in [0, 0.8] from 0.4 until sparsity is within 0.001."""
    sorted_score = torch.sort(score, dim=-1, stable=True)[0]
    cumsum = torch.cumsum(sorted_score, dim=1)
    row_sum = score.sum(dim=1)
    alpha, low, high = 0.4, 0.0, 0.8
    mask = _mask_for_alpha(score, sorted_score, cumsum, row_sum, alpha)
    achieved = mask.float().mean().item()
    while abs(achieved - ratio) > tolerance and high - low >= 0.001:
        if achieved > ratio:
            alpha, high = (alpha + low) / 2.0, alpha
        else:
            alpha, low = (alpha + high) / 2.0, alpha
        mask = _mask_for_alpha(score, sorted_score, cumsum, row_sum, alpha)
        achieved = mask.float().mean().item()
    return mask
