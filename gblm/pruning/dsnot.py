"""DSnoT, training-free mask refinement (Zhang et al., ICLR 2024): the pure tensor steps.

Given a Linear's initial mask (True = pruned), DSnoT swaps a pruned and a kept weight per output
row, cycle after cycle, to drive the row's expected reconstruction error towards zero; the
weights themselves never change. With ``mean_j = (1/N) sum_n sum_t X[n,t,j]`` (T times the token
mean) and ``D_ij = W_ij * mean_j``, the row's error is ``e_i = sum_{j pruned} D_ij``.

Unstructured (:func:`dsnot_unstructured`), every row at once:

- grow order: a stable ascending sort of ``G_ij = D_ij / var_j ** p`` on the pruned entries and 0
  on the kept ones; the weight to grow back is taken from its back while ``e > 0``, else from its
  front;
- prune list: the kept entries by ascending Wanda score, reordered as those with ``D < 0`` (Wanda
  ascending), then those with ``D > 0`` (Wanda descending); an entry with ``D == 0`` stands for
  the list's first entry (as the published reorder does). The weight to prune is taken from its
  back while ``e < 0``, else from its front;
- each side used moves its pointer one step; a row stops for good once ``|e| <= threshold`` (the
  error before the swap); while it is active the swap is made and ``e += D_prune - D_grow``.

N:M (:func:`dsnot_nm`): the weight to grow back is chosen as above; the one to prune is the kept
entry of the same group of M with the lowest initial score (used entries are set to +inf; ties,
such as a group whose entries are all used, go as ``torch.topk(..., largest=False)`` breaks them,
as published), and a row also stops when the swap would flip the sign of its initial error.

Rows run together: a row that has stopped keeps moving its pointers while others go on, and its
entries are written back (q kept, r pruned), which changes nothing unless a pointer has reached
the kept entries in the middle of the grow order (published; only with more cycles than the
row has pruned entries of one sign). Where the published code would index past the end of a list,
the row stops and is left alone instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gblm import devices


def obs_saliency(weight: Tensor, hessian: Tensor, percdamp: float = 0.01) -> Tensor:
    """SparseGPT's initial score ``W^2 / diag(Hinv)^2`` (no weight update), fp32 (d_out, d_in).

    Dead inputs (``H_jj == 0``) get ``H_jj = 1`` and a zero weight; ``percdamp * mean(diag H)``
    is added to the diagonal; Hinv is the upper Cholesky factor of ``H^-1``.
    """
    with devices.no_tf32():
        W = weight.detach().float().clone()
        H = hessian.detach().float().clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        diag = torch.arange(H.shape[0], device=H.device)
        H[diag, diag] += percdamp * torch.mean(torch.diag(H))
        H = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        return W**2 / torch.diag(H).reshape(1, -1) ** 2


def _growth(pruned: Tensor, D: Tensor, var: Tensor, var_power: float) -> tuple[Tensor, Tensor]:
    """The initial errors (d_out, 1) and the grow order (d_out, d_in)."""
    G = torch.where(pruned, D, torch.zeros_like(D))
    error = G.sum(dim=1, keepdim=True)
    if var_power:
        G = G / torch.pow(var.reshape(1, -1), var_power)
    return error, torch.sort(G, dim=1, stable=True).indices


def _prune_list(pruned: Tensor, D: Tensor, wanda: Tensor) -> tuple[Tensor, Tensor]:
    """The kept entries in pruning order (padded with the pruned ones) and their count per row."""
    d_in = D.shape[1]
    kept = (~pruned).sum(dim=1, keepdim=True)
    by_wanda = torch.sort(wanda.masked_fill(pruned, float("inf")), dim=1, stable=True).indices
    d = D.gather(1, by_wanda)
    pos = torch.arange(d_in, device=D.device).expand_as(d)
    in_list = pos < kept
    key = torch.where(d < 0, pos, torch.where(d > 0, 3 * d_in - pos, d_in + pos))
    key = torch.where(in_list, key, 4 * d_in + pos)
    order = torch.sort(key, dim=1, stable=True).indices
    zero = ((d == 0) & in_list).gather(1, order)
    order = torch.where(zero, torch.zeros_like(order), order)
    return by_wanda.gather(1, order), kept


def _take(order: Tensor, ptr: Tensor, side: Tensor, end: Tensor) -> tuple[Tensor, Tensor]:
    """Entry at the pointer of ``side`` (0 front, 1 back) of each row; moves it; in-range flag."""
    at = ptr.gather(1, side)
    ok = (at >= 0) & (at < end)
    picked = order.gather(1, at.clamp(min=0).minimum(end - 1))
    ptr.scatter_(1, side, at + 1 - 2 * side)
    return picked, ok


def _swap(
    pruned: Tensor, error: Tensor, active: Tensor, ok: Tensor, q: Tensor, r: Tensor, D: Tensor
) -> None:
    """Prune q and keep r where ``active``, else write back q kept and r pruned (as published);
    rows whose pointers ran out (``~ok``) are left alone. Then update the error."""
    dq, dr = D.gather(1, q), D.gather(1, r)
    pruned.scatter_(1, q, torch.where(ok, active, pruned.gather(1, q)))
    pruned.scatter_(1, r, torch.where(ok, ~active, pruned.gather(1, r)))
    error += torch.where(active, dq, torch.zeros_like(dq))
    error -= torch.where(active, dr, torch.zeros_like(dr))


def dsnot_unstructured(
    mask: Tensor,
    D: Tensor,
    wanda: Tensor,
    var: Tensor,
    max_cycle: int = 50,
    threshold: float = 0.1,
    var_power: float = 1.0,
) -> Tensor:
    """The refined mask (True = pruned) of an unstructured initial ``mask`` (d_out, d_in).

    Args:
        mask: the initial mask; not modified.
        D: ``W * mean`` (fp32), the expected contribution of every weight.
        wanda: ``|W| * sqrt(row_sq)``, the order in which kept weights are pruned.
        var: (d_in,) the token variance of every input.
        max_cycle, threshold, var_power: the published 50, 0.1 and 1.
    """
    d_out, d_in = D.shape
    pruned = mask.clone()
    error, grow = _growth(pruned, D, var, var_power)
    prune, kept = _prune_list(pruned, D, wanda)
    full = torch.full((d_out, 1), d_in, dtype=torch.long, device=D.device)
    grow_ptr = torch.cat([torch.zeros_like(full), full - 1], dim=1)
    prune_ptr = torch.cat([torch.zeros_like(kept), kept - 1], dim=1)
    active = torch.ones(d_out, 1, dtype=torch.bool, device=D.device)
    for _ in range(max_cycle):
        if not bool(active.any()):
            break
        r, r_ok = _take(grow, grow_ptr, (error > 0).long(), full)
        q, q_ok = _take(prune, prune_ptr, (error < 0).long(), kept)
        ok = r_ok & q_ok
        active &= (error.abs() > threshold) & ok
        _swap(pruned, error, active, ok, q, r, D)
    return pruned


def dsnot_nm(
    mask: Tensor,
    D: Tensor,
    initial: Tensor,
    var: Tensor,
    m: int,
    max_cycle: int = 50,
    threshold: float = 0.1,
    var_power: float = 1.0,
) -> Tensor:
    """The refined mask of an N:M initial ``mask``: every swap stays inside one group of ``m``.

    ``initial`` is the initial score; the kept entry of the grown weight's group with the lowest
    initial score is pruned.
    """
    d_out, d_in = D.shape
    pruned = mask.clone()
    error, grow = _growth(pruned, D, var, var_power)
    sign = torch.sign(error)
    score = initial.float().masked_fill(pruned, float("inf"))
    full = torch.full((d_out, 1), d_in, dtype=torch.long, device=D.device)
    grow_ptr = torch.cat([torch.zeros_like(full), full - 1], dim=1)
    offsets = torch.arange(m, device=D.device).reshape(1, -1)
    active = torch.ones(d_out, 1, dtype=torch.bool, device=D.device)
    for _ in range(max_cycle):
        if not bool(active.any()):
            break
        r, r_ok = _take(grow, grow_ptr, (error > 0).long(), full)
        start = r - r % m
        # topk, not argmin: ties (all +inf once a group's kept entries are used) go as published
        q = start + torch.topk(score.gather(1, start + offsets), 1, dim=1, largest=False).indices
        after = error + D.gather(1, q) - D.gather(1, r)
        active &= (sign == torch.sign(after)) & (error.abs() > threshold) & r_ok
        score.scatter_(1, q, float("inf"))
        _swap(pruned, error, active, r_ok, q, r, D)
    return pruned
