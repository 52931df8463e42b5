"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774, Algorithm 1).

Prune one Linear against its Hessian ``H = (2/N) sum x x^T``: columns are visited left to right in
blocks; the mask of a block is chosen on the already updated weights by the OBS saliency
``w^2 / [H^-1]_jj^2``, and each pruned column's error is spread over the remaining columns with
the upper Cholesky factor of ``H^-1`` (within the block at once, lazily beyond it).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from gblm import devices
from gblm.pruning.base import LinearStats, Pruner, Sparsity


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    ratio: float,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """The SparseGPT solve for one weight matrix.

    Args:
        weight: (d_out, d_in), any float dtype; not modified.
        hessian: (d_in, d_in) fp32 ``(2/N) sum x x^T``; not modified.
        ratio: unstructured sparsity per block of columns (ignored for N:M).
        n, m: N:M sparsity when ``m > 0``.
        blocksize: columns per block (lazy-update granularity).
        percdamp: dampening, as a share of ``mean(diag(H))`` added to the diagonal.

    Returns:
        The updated weight in ``weight.dtype`` and the boolean mask of zeroed entries (True =
        pruned: the OBS selection plus the columns of dead inputs).
    """
    d_out, d_in = weight.shape
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

        for i1 in range(0, d_in, blocksize):
            i2 = min(i1 + blocksize, d_in)
            W1 = W[:, i1:i2].clone()  # (d_out, B)
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]  # (B, B)
            d1 = torch.diag(Hinv1).reshape(1, -1)  # (1, B)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            k = int(W1.numel() * ratio)
            if m == 0 and k > 0:
                saliency = W1**2 / d1**2  # (d_out, B)
                mask1 = saliency <= torch.sort(saliency.flatten())[0][k]

            for i in range(i2 - i1):
                if m > 0 and i % m == 0:
                    saliency = W1[:, i : i + m] ** 2 / d1[:, i : i + m] ** 2  # (d_out, M)
                    lowest = torch.topk(saliency, n, dim=1, largest=False)[1]
                    mask1.scatter_(1, i + lowest, True)
                w = W1[:, i]  # (d_out,)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                err = (w - q) / Hinv1[i, i]  # (d_out,)
                W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err

            W[:, i1:i2] = Q1  # pruned entries exactly 0
            mask[:, i1:i2] = mask1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])  # lazy update of the later columns

        mask[:, dead] = True
    return W.to(weight.dtype), mask


class SparseGPTPruner(Pruner):
    """Prune with the SparseGPT solve: the surviving weights are updated to absorb the error."""

    name: ClassVar[str] = "sparsegpt"
    needs_hessian: ClassVar[bool] = True

    def __init__(
        self, blocksize: int = 128, percdamp: float = 0.01, true_sequential: bool = False
    ) -> None:
        if blocksize < 1:
            raise ValueError(f"method.blocksize={blocksize}: must be >= 1.")
        if percdamp < 0:
            raise ValueError(f"method.percdamp={percdamp}: must be >= 0.")
        self.blocksize = blocksize
        self.percdamp = percdamp
        self.true_sequential = true_sequential

    @torch.no_grad()
    def prune_linear(self, linear: nn.Linear, stats: LinearStats, sparsity: Sparsity) -> Tensor:
        if stats.hessian is None:
            raise ValueError("SparseGPT needs the Hessian from the layer walk.")
        weight, mask = sparsegpt_prune(
            linear.weight.data,
            stats.hessian,
            sparsity.ratio,
            sparsity.n,
            sparsity.m,
            blocksize=self.blocksize,
            percdamp=self.percdamp,
        )
        linear.weight.data.copy_(weight)
        return mask
