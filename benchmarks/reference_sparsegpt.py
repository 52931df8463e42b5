"""The published per-Linear SparseGPT solve, re-implemented plainly as a timing reference.

This follows SparseGPT's Algorithm 1 as its authors' code runs it (Frantar & Alistarh 2023,
arXiv 2301.00774; ``fasterprune`` in IST-DASLab/sparsegpt), step for step and with the same
blocksize: dead inputs, dampening, the upper Cholesky factor of ``H^-1``, per block the mask from
``w^2 / diag(Hinv)^2`` (a full sort for the unstructured threshold; ``topk`` per M columns for
N:M), then column by column ``q = w`` with the pruned entries zeroed, the reconstruction loss,
``err = (w - q) / Hinv[i, i]``, ``W1[:, i:] -= err x Hinv[i, i:]`` as a rank-1 matmul, and the
lazy update of the later columns after each block. The quantizer, Conv1D handling, debug prints
and device syncs of the original are left out: they are not part of the pruning cost.

It lives in the benchmark, not in gblm: :mod:`gblm.pruning.sparsegpt` must produce the same
weights no slower than this.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def reference_sparsegpt(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Prune ``weight`` (d_out, d_in) against ``hessian`` (d_in, d_in) as published.

    Returns:
        The pruned and updated weight in ``weight.dtype`` and the per-row reconstruction loss
        ``sum_i (w - q)^2 / Hinv[i, i]^2 / 2`` (d_out,), which the published code also computes.
    """
    W = weight.clone().float()  # (rows, columns)
    rows, columns = W.shape
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    losses = torch.zeros(rows)

    damp = percdamp * torch.mean(torch.diag(H))
    diagonal = torch.arange(columns)
    H[diagonal, diagonal] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        if prune_n == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                tmp = (
                    W1[:, i : i + prune_m] ** 2
                    / (torch.diag(Hinv1)[i : i + prune_m].reshape((1, -1))) ** 2
                )
                mask1.scatter_(1, i + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    return W.to(weight.dtype), losses
