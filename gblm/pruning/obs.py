"""The OBS weight update of a given mask (the weight-update ablation of Wanda, arXiv 2306.11695,
Section 5; SparseGPT's column sweep, arXiv 2301.00774, Algorithm 1, without its selection).

With the Hessian ``H = (2/N) sum x x^T`` of the Linear's inputs, dead inputs (``H_jj = 0``) get
``H_jj = 1`` and their weights 0; ``H`` is damped by ``percdamp * mean(diag H)`` and ``U`` is the
upper Cholesky factor of ``H^-1``. Columns are visited left to right in blocks of ``blocksize``:
column ``i``'s pruned entries are set to 0 and their error ``w / U_ii`` is spread over the
columns right of it with row ``i`` of ``U`` (within the block at once, beyond it after the
block). The mask is the method's and stays as it is; only the kept weights change.

:func:`obs_iterative` is the ablation's other form: the mask is not given but chosen during the
sweep with the method's own score of the *updated* weights, at the start of each block (one
threshold over the block, ``score <= sort(score)[int(numel * ratio)]``) or, for N:M, at the start
of each group of M columns (the N lowest of the group in each row), as SparseGPT chooses with its
saliency.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from gblm.pruning.sparsegpt import sparsegpt_prune


def obs_update(
    weight: Tensor, hessian: Tensor, mask: Tensor, blocksize: int = 128, percdamp: float = 0.01
) -> tuple[Tensor, Tensor]:
    """The kept weights of ``weight`` updated to absorb the error of pruning ``mask``.

    Args:
        weight: (d_out, d_in) dense weights, any float dtype; not modified.
        hessian: (d_in, d_in) fp32 ``(2/N) sum x x^T``; not modified.
        mask: (d_out, d_in) bool, True = pruned.
        blocksize: columns per block of the sweep (its lazy-update granularity).
        percdamp: dampening, a share of ``mean(diag H)`` added to the diagonal (0.01 published).

    Returns:
        The updated weights in ``weight.dtype`` (exactly 0 where ``mask`` is True and in the
        columns of dead inputs) and the mask with those columns marked pruned.
    """
    return sparsegpt_prune(
        weight, hessian, 0.0, blocksize=blocksize, percdamp=percdamp, mask=mask.bool()
    )


def obs_iterative(
    weight: Tensor,
    hessian: Tensor,
    ratio: float,
    score: Callable[[Tensor, int, int], Tensor],
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """The sweep with the mask chosen block by block on the updated weights by ``score``.

    Args:
        weight, hessian, blocksize, percdamp: as in :func:`obs_update`.
        ratio: unstructured sparsity of every block of columns (ignored for N:M).
        score: ``score(W_cols, start, end)``: the method's score of columns ``start:end`` from
            their current values (d_out, end - start); low scores are pruned.
        n, m: N:M sparsity when ``m > 0``.

    Returns:
        The updated weights in ``weight.dtype`` and the mask chosen (True = pruned).
    """
    return sparsegpt_prune(weight, hessian, ratio, n, m, blocksize, percdamp, score=score)
