"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774, Algorithm 1).

Prune one Linear against its Hessian ``H = (2/N) sum x x^T``: columns are visited left to right in
blocks; the mask of a block is chosen on the already updated weights by the OBS saliency
``w^2 / [H^-1]_jj^2``, and each pruned column's error is spread over the remaining columns with
the upper Cholesky factor of ``H^-1`` (within the block at once, lazily beyond it).

Given a mask, the same sweep runs with that mask held fixed and no selection: the OBS weight
update of any method's mask (:func:`gblm.pruning.obs.obs_update`). Given another score of the
current weights (``score``), the mask is chosen as above with that score in place of the OBS
saliency (the "iterative" weight update, :func:`gblm.pruning.obs.obs_iterative`).
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


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    ratio: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    mask: Tensor | None = None,
    score: Callable[[Tensor, int, int], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The SparseGPT solve for one weight matrix.

    Args:
        weight: (d_out, d_in), any float dtype; not modified.
        hessian: (d_in, d_in) fp32 ``(2/N) sum x x^T``; not modified.
        ratio: unstructured sparsity per block of columns (ignored for N:M).
        n, m: N:M sparsity when ``m > 0``.
        blocksize: columns per block (lazy-update granularity).
        percdamp: dampening, as a share of ``mean(diag(H))`` added to the diagonal.
        mask: (d_out, d_in) bool, True = pruned: held fixed instead of chosen (``ratio``, ``n``
            and ``m`` are then not used).
        score: ``score(W_cols, start, end)``, the score (low = pruned) of the current weights of
            columns ``start:end`` (d_out, end - start), in place of ``w^2 / [H^-1]_jj^2``.

    Returns:
        The updated weight in ``weight.dtype`` and the boolean mask of zeroed entries (True =
        pruned: the OBS selection plus the columns of dead inputs).
    """
    d_out, d_in = weight.shape
    fixed = mask
    if fixed is not None:
        n = m = 0  # nothing is chosen: the sweep only updates
    if m > 0 and (d_in % m or blocksize % m):
        raise ValueError(
            f"N:M {n}:{m} needs d_in ({d_in}) and blocksize ({blocksize}) divisible by M."
        )
    with devices.no_tf32():
        W = weight.detach().clone().float()  # (d_out, d_in)
        H = hessian.detach().clone().float()  # (d_in, d_in)
        dead = torch.diag(H) == 0  # inputs never active in the calibration data
        H[dead, dead] = 1
        W[:, dead] = 0
        idx = torch.arange(d_in, device=H.device)
        H[idx, idx] += percdamp * torch.mean(torch.diag(H))
        H = torch.cholesky_inverse(torch.linalg.cholesky(H))  # H^-1
        Hinv = torch.linalg.cholesky(H, upper=True)  # upper U with H^-1 = U^T U
        mask = torch.zeros_like(W, dtype=torch.bool)
        zero = W.new_zeros(())

        for i1 in range(0, d_in, blocksize):
            i2 = min(i1 + blocksize, d_in)
            Hinv1 = Hinv[i1:i2, i1:i2]  # (B, B)
            d1 = torch.diag(Hinv1).reshape(1, -1)  # (1, B)
            # The block is worked on transposed, one contiguous row per column of W, so every
            # step of the column loop touches contiguous memory.
            W1t = W[:, i1:i2].t().contiguous()  # (B, d_out)
            Err1t = torch.empty_like(W1t)  # (B, d_out)
            k = int(W1t.numel() * ratio)
            if fixed is not None:
                mask1t = fixed[:, i1:i2].t().contiguous()  # (B, d_out)
            elif m == 0 and k > 0:
                if score is None:
                    saliency = W[:, i1:i2] ** 2 / d1**2  # (d_out, B)
                else:
                    saliency = score(W[:, i1:i2], i1, i2)
                mask1t = (saliency <= _kth_smallest(saliency.flatten(), k)).t().contiguous()
            else:
                mask1t = torch.zeros_like(W1t, dtype=torch.bool)  # (B, d_out)

            for i in range(i2 - i1):
                if m > 0 and i % m == 0:
                    if score is None:
                        saliency = W1t[i : i + m].t() ** 2 / d1[:, i : i + m] ** 2
                    else:
                        saliency = score(W1t[i : i + m].t(), i1 + i, i1 + i + m)
                    saliency = saliency.contiguous()
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
