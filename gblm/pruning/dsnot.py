"""DSnoT, training-free mask refinement (Zhang et al., ICLR 2024): the pure tensor steps.

DSnoT swaps a pruned and a kept weight per output row, cycle after cycle, to drive the row's
expected reconstruction error ``e_i = sum_{j pruned} D_ij`` towards zero, with ``D_ij = W_ij *
mean_j`` (``mean_j``: T times the token mean of input j); the weights never change.

Unstructured (:func:`dsnot_unstructured`), every row at once:

- grow order: a stable ascending sort of ``D_ij / var_j ** p`` on the pruned entries (0 on the
  kept); the weight to grow back is taken from its back while ``e > 0``, else from its front;
- prune list: the kept entries by ascending Wanda score, reordered as those with ``D < 0`` (Wanda
  ascending), then ``D > 0`` (descending); an entry with ``D == 0`` stands for the list's first
  (the published reorder). The weight to prune is taken from its back while ``e < 0``, else front;
- each side used moves its pointer one step; a row stops for good once ``|e| <= threshold``;
  while active the swap is made and ``e += D_prune - D_grow``.

N:M (:func:`dsnot_nm`): the weight to prune is the kept entry of the grown one's group of M with
the lowest initial score (used entries set to +inf; ties go as ``torch.topk`` breaks them, as
published), and a row also stops when the swap would flip the sign of its initial error.

As published, a stopped row keeps moving its pointers and its entries are written back (q kept,
r pruned), which changes nothing unless a pointer has crossed into the kept entries of the grow
order. Where the published code would index past the end of a list, the row is left alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gblm import devices
from gblm.pruning.sparsegpt import damped_inverse_factor


def obs_saliency(weight: Tensor, hessian: Tensor, percdamp: float = 0.01) -> Tensor:
    """SparseGPT's initial score ``W^2 / diag(Hinv)^2`` (no weight update), fp32 (d_out, d_in)."""
    with devices.no_tf32():
        W, Hinv, _ = damped_inverse_factor(weight, hessian, percdamp)
        return W**2 / torch.diag(Hinv).reshape(1, -1) ** 2


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
    mask: Tensor, D: Tensor, wanda: Tensor, var: Tensor, max_cycle: int = 50,
    threshold: float = 0.1, var_power: float = 1.0,
) -> Tensor:  # fmt: skip
    """The refined copy of an unstructured initial ``mask`` (d_out, d_in; True = pruned), from
    ``D = W * mean`` (fp32), the Wanda score and the token variance ``var`` (d_in,)."""
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
    mask: Tensor, D: Tensor, initial: Tensor, var: Tensor, m: int, max_cycle: int = 50,
    threshold: float = 0.1, var_power: float = 1.0,
) -> Tensor:  # fmt: skip
    """The refined copy of an N:M initial ``mask``; every swap stays inside one group of ``m``."""
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
