"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774, Algorithm 1), and the OBS weight update.

Prune one Linear against its Hessian ``H = (2/N) sum x x^T``: dead inputs (``H_jj = 0``) get
``H_jj = 1`` and weight 0, ``H`` is damped by ``percdamp * mean(diag H)``. Columns are visited left
to right in blocks; a block's mask is chosen on the already updated weights by the OBS saliency
``w^2 / [H^-1]_jj^2`` (one threshold per block, or the N lowest of every M), and each pruned
column's error is spread over the columns right of it with the upper Cholesky factor of ``H^-1``
(within the block at once, lazily beyond it).

Given a ``mask``, the same sweep holds it fixed: the OBS weight update of any method's mask
(``reconstruct=obs``, Wanda's weight-update ablation, arXiv 2306.11695). Given a ``score`` of the
current weights, the mask is chosen with it in place of the saliency (``iterative=true``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gblm import devices
from gblm.pruning.masks import kth_smallest, zero_masked_


def _kth_smallest(values: Tensor, k: int) -> Tensor:
    """``sort(values)[k]`` (0-based) by selection; the sort only when NaN makes ranks ambiguous."""
    if not bool(torch.isfinite(values.sum())) and bool(torch.isnan(values).any()):
        return torch.sort(values)[0][k]
    return kth_smallest(values.reshape(1, -1), k + 1).to(values.device).reshape(())


def damped_inverse_factor(weight: Tensor, hessian: Tensor, percdamp: float):
    """``(W, U, dead)``: an fp32 copy of ``weight`` with dead inputs' columns zeroed, the upper
    Cholesky factor ``U`` of the damped ``H^-1`` (``H^-1 = U^T U``), and the dead inputs."""
    W = weight.detach().clone().float()  # (d_out, d_in)
    H = hessian.detach().clone().float()  # (d_in, d_in)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    H = torch.cholesky_inverse(torch.linalg.cholesky(H))  # H^-1
    return W, torch.linalg.cholesky(H, upper=True), dead


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor, hessian: Tensor, ratio: float, n: int = 0, m: int = 0, blocksize: int = 128,
    percdamp: float = 0.01, mask: Tensor | None = None,
    score: Callable[[Tensor, int, int], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The updated ``weight`` (d_out, d_in; its dtype) and its mask (True = pruned, dead inputs'
    columns included). ``ratio`` is per block of columns (unused for N:M, ``m > 0``); ``mask``
    (bool) is held fixed instead of chosen; ``score(W_cols, start, end)`` scores the current
    columns ``start:end`` in place of the saliency. The inputs are not modified."""
    d_out, d_in = weight.shape
    fixed = mask
    if fixed is not None:
        n = m = 0  # nothing is chosen: the sweep only updates
    if m > 0 and (d_in % m or blocksize % m):
        raise ValueError(
            f"N:M {n}:{m} needs d_in ({d_in}) and blocksize ({blocksize}) divisible by M."
        )
    with devices.no_tf32():
        W, Hinv, dead = damped_inverse_factor(weight, hessian, percdamp)
        mask = torch.zeros_like(W, dtype=torch.bool)
        zero = W.new_zeros(())
        diag = torch.diag(Hinv).reshape(1, -1)  # (1, d_in)
        rank = score or (lambda cols, start, end: cols**2 / diag[:, start:end] ** 2)

        for i1 in range(0, d_in, blocksize):
            i2 = min(i1 + blocksize, d_in)
            Hinv1 = Hinv[i1:i2, i1:i2]  # (B, B)
            # The block is worked on transposed, one contiguous row per column of W, so every
            # step of the column loop touches contiguous memory.
            W1t = W[:, i1:i2].t().contiguous()  # (B, d_out)
            Err1t = torch.empty_like(W1t)  # (B, d_out)
            k = int(W1t.numel() * ratio)
            if fixed is not None:
                mask1t = fixed[:, i1:i2].t().contiguous()  # (B, d_out)
            elif m == 0 and k > 0:
                saliency = rank(W[:, i1:i2], i1, i2)  # (d_out, B)
                mask1t = (saliency <= _kth_smallest(saliency.flatten(), k)).t().contiguous()
            else:
                mask1t = torch.zeros_like(W1t, dtype=torch.bool)  # (B, d_out)

            for i in range(i2 - i1):
                if m > 0 and i % m == 0:
                    saliency = rank(W1t[i : i + m].t(), i1 + i, i1 + i + m).contiguous()
                    lowest = torch.topk(saliency, n, dim=1, largest=False)[1]  # (d_out, N)
                    mask1t[i : i + m].t().scatter_(1, lowest, True)
                # q = w with the pruned entries zeroed; err = (w - q) / Hinv[i, i] is w on the
                # pruned entries (and +0 elsewhere) over Hinv[i, i], bit for bit.
                err = Err1t[i]  # (d_out,)
                torch.where(mask1t[i], W1t[i], zero, out=err)
                err.div_(Hinv1[i, i])
                # W[:, i+1:] -= err x Hinv[i, i+1:]. Column i itself is not updated: its final
                # value is q, written below from the row kept as it was when visited.
                W1t[i + 1 :].sub_(torch.outer(Hinv1[i, i + 1 :], err))

            W[:, i1:i2] = zero_masked_(W1t, mask1t).t()  # q: pruned entries exactly 0
            mask[:, i1:i2] = mask1t.t()
            # the lazy update of the later columns, with Err in the published (d_out, B) layout
            W[:, i2:] -= Err1t.t().contiguous().matmul(Hinv[i1:i2, i2:])

        mask[:, dead] = True
    return W.to(weight.dtype), mask
