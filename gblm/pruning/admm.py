"""The ADMM weight update and pruner (Boža 2024, arXiv 2401.02938), as the published code computes
them.

One Linear, fp32: ``XX = sum_n X_n^T X_n`` (not scaled by N), ``norm_j = sqrt(XX_jj) + 1e-8``.

1. Normalise: ``XX <- XX / (norm_i norm_j)``, ``W <- (weight * norm)^T`` (d_in, d_out); dampen
   ``XX_jj += percdamp * mean(diag XX)``.
2. ADMM on ``min ||X (W - W0)||^2`` with ``W`` restricted to the mask: ``XY = XX W0``,
   ``XX_jj += rho``, ``XXinv = XX^-1``, ``U = 0``; then ``iters`` times: ``Z = (W + U) * keep``;
   ``U += W - Z``; ``W = XXinv (XY + rho (Z - U))``.
3. The result ``Z = (W + U) * keep`` scaled back: ``weight = Z^T / norm``.

:func:`admm_update` holds a given mask fixed. :func:`admm_prune` chooses the mask on ``|W|`` and,
with ``gradual > 0``, re-chooses it on ``|W + U|`` in the first ``gradual`` iterations at
``s_t = s - s (1 - (t+1)/gradual)^3``. Published quirks kept: per layer the re-chosen mask is at
``s``, not ``s_t``; N:M is 2:4 only (the 2 largest of every 4 consecutive inputs kept), and
gradually those 2 are always kept and the rest kept from the ``(numel * s_t + 1)``-th smallest
``|W + U|`` up, the target forced to 0.5.

Masks here are keep masks (True = kept) in the (d_in, d_out) layout; the public functions take
and return gblm's (d_out, d_in) masks, True = pruned.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gblm import devices

#: The published 2:4 pattern: groups of 4 consecutive inputs, 2 kept.
GROUP, KEPT = 4, 2


def normalise(weight: Tensor, gram: Tensor, percdamp: float) -> tuple[Tensor, Tensor, Tensor]:
    """Step 1: ``(W, XX, norm)``; ``weight`` and ``gram`` are not modified."""
    norm = torch.diag(gram).sqrt() + 1e-8  # (d_in,); a dead input does not divide by zero
    XX = ((gram / norm).T / norm).T  # columns, then rows (a transposed result, as published)
    W = (weight.float() * norm).T  # (d_in, d_out), a transposed view as published
    idx = torch.arange(XX.shape[0], device=XX.device)
    XX[idx, idx] += percdamp * torch.diag(XX).mean()
    return W, XX, norm


def _keep(values: Tensor, ratio: float, two_of_four: bool, per_output: bool) -> Tensor:
    """Keep mask on ``values`` (d_in, d_out): the top 2 of every 4 inputs; per output all that
    reach its ``int(d_in * ratio)``-th smallest (0-based); per layer all but the
    ``int(numel * ratio)`` smallest (by topk)."""
    if two_of_four:
        groups = values.T.reshape(-1, GROUP)  # (d_out * d_in / 4, 4); a copy
        order = groups.sort(dim=1)[1]
        keep = torch.zeros(groups.shape, dtype=torch.bool, device=values.device)
        rows = torch.arange(groups.shape[0], device=values.device)
        for rank in range(GROUP - KEPT, GROUP):
            keep[rows, order[:, rank]] = True
        return keep.reshape(values.T.shape).T
    if per_output:
        threshold = values.sort(dim=0)[0][int(values.shape[0] * ratio)]  # (d_out,)
        return values >= threshold.unsqueeze(0)
    lowest = torch.topk(values.flatten(), k=int(values.numel() * ratio), largest=False).indices
    keep = torch.ones(values.numel(), dtype=torch.bool, device=values.device)
    keep[lowest] = False
    return keep.reshape(values.shape)


def gradual_keep(
    V: Tensor, ratio: float, step: int, gradual: int, two_of_four: bool, per_output: bool
) -> Tensor:
    """The keep mask of iteration ``step`` (< ``gradual``) on ``V = W + U``."""
    if two_of_four:
        ratio = 0.5  # published: the target is forced to 2:4's
    current = ratio - ratio * (1 - (step + 1) / gradual) ** 3
    if two_of_four:
        ranked = V.abs()
        ranked[_keep(V.abs(), ratio, True, False)] = torch.inf  # always kept
        threshold = ranked.flatten().kthvalue(int(V.numel() * current) + 1)[0]
        return ranked >= threshold
    return _keep(V.abs(), current if per_output else ratio, False, per_output)


def _iterate(W, XX, norm, keep, iters, rho, reselect=None, gradual=0) -> tuple[Tensor, Tensor]:
    """Steps 2-3 (``XX`` is dampened in place); ``reselect(V, step)`` re-chooses the keep mask
    in the first ``gradual`` iterations. Returns (weight (d_out, d_in) fp32, keep)."""
    if iters == 0:
        return (W * keep).T / norm, keep
    XY = XX.matmul(W)  # (d_in, d_out)
    idx = torch.arange(XX.shape[0], device=XX.device)
    XX[idx, idx] += rho
    XXinv = torch.inverse(XX)
    del XX
    U = torch.zeros_like(W)
    for step in range(iters):
        if reselect is not None and step < gradual:
            keep = reselect(W + U, step)
        Z = (W + U) * keep
        U = U + (W - Z)
        W = XXinv.matmul(XY + rho * (Z - U))
    Z = (W + U) * keep
    return Z.T / norm, keep


@torch.no_grad()
def admm_update(
    weight: Tensor, gram: Tensor, mask: Tensor, iters: int = 20, rho: float = 1.0,
    percdamp: float = 0.1,
) -> Tensor:  # fmt: skip
    """``weight`` (d_out, d_in) with its kept weights updated for the fixed ``mask`` (True =
    pruned), in its dtype; ``gram`` is the fp32 ``sum_n X_n^T X_n``. Inputs are not modified."""
    with devices.no_tf32():
        W, XX, norm = normalise(weight, gram.float(), percdamp)
        W, _ = _iterate(W, XX, norm, mask.logical_not().T, iters, rho)
    return W.to(weight.dtype)


@torch.no_grad()
def admm_prune(
    weight: Tensor, gram: Tensor, ratio: float, two_of_four: bool = False,
    per_output: bool = False, gradual: int = 15, iters: int = 20, rho: float = 1.0,
    percdamp: float = 0.1,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The published ADMM pruner: the updated weights (``weight.dtype``) and the mask (True =
    pruned). ``ratio`` is ignored for 2:4; ``per_output`` chooses per output row (else per layer,
    the published default); ``gradual=0`` keeps the first mask fixed."""
    with devices.no_tf32():
        W, XX, norm = normalise(weight, gram.float(), percdamp)
        keep = None  # chosen by reselect in the first iteration
        if gradual == 0 or iters == 0:
            keep = _keep(W.abs(), ratio, two_of_four, per_output)

        def reselect(V: Tensor, step: int) -> Tensor:
            return gradual_keep(V, ratio, step, gradual, two_of_four, per_output)

        W, keep = _iterate(W, XX, norm, keep, iters, rho, reselect, gradual)
    return W.to(weight.dtype), keep.logical_not().T
