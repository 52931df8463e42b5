"""The ADMM weight update and the ADMM pruner (Boža 2024, "Fast and Effective Weight Update for
Pruned Large Language Models", arXiv 2401.02938), as the published code computes them.

Notation (one Linear, fp32): ``XX = sum_n X_n^T X_n`` over every calibration window (not scaled
by N), ``norm_j = sqrt(XX_jj) + 1e-8``, ``D = diag(norm)``.

1. Normalise: ``XX <- D^-1 XX D^-1``, ``W <- (weight D)^T`` (d_in, d_out); dampen
   ``XX_jj += percdamp * mean(diag XX)``.
2. ADMM on ``min ||X (W - W0)||^2`` with ``W`` restricted to the mask: ``XY = XX W0`` (with the
   damping already in ``XX``, as published), ``XX_jj += rho``, ``XXinv = XX^-1``, ``U = 0``; then
   ``iters`` times: ``Z = (W + U) * keep``; ``U += W - Z``; ``W = XXinv (XY + rho (Z - U))``.
3. The result is ``Z = (W + U) * keep`` scaled back: ``weight = Z^T D^-1``.

:func:`admm_update` runs steps 1-3 with a given mask held fixed (any method's mask: the update
composed with it). :func:`admm_prune` is the published pruner: it chooses the mask itself, on
``|W|`` in the normalised space, and with ``gradual > 0`` re-chooses it on ``|W + U|`` in each
of the first ``gradual`` iterations at a sparsity that rises cubically to the target,
``s_t = s - s (1 - (t+1)/gradual)^3``. Published quirks kept:

- per layer (the pruner's default) the re-chosen mask is taken at ``s`` itself, not ``s_t``;
- N:M is 2:4 only: groups of 4 consecutive inputs, the 2 largest kept (the published 4 and 2);
  gradually, those 2 are always kept and the rest kept where ``|W + U|`` reaches the
  ``(numel * s_t + 1)``-th smallest value, the target forced to 0.5;
- the first mask (``gradual = 0``) and the re-chosen ones rank the same ``|W|`` the same way
  (per row: ``|W| >=`` the ``int(d_in * s)``-th smallest of the output's column; per layer: the
  ``int(numel * s)`` smallest by ``topk``).

Masks here are "keep" masks (True = kept) in the normalised (d_in, d_out) layout; the public
functions take and return gblm's (d_out, d_in) masks with True = pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gblm import devices

#: Added to ``sqrt(XX_jj)`` so that a dead input does not divide by zero (published).
NORM_EPS = 1e-8
#: The published 2:4 pattern: groups of 4 consecutive inputs, 2 kept.
GROUP, KEPT = 4, 2


@dataclass
class Normalised:
    """The problem of one Linear in the normalised space (step 1)."""

    W: Tensor  # (d_in, d_out) fp32: (weight * norm)^T, a transposed view as published
    XX: Tensor  # (d_in, d_in) fp32: D^-1 XX D^-1 + percdamp * mean(diag) I
    norm: Tensor  # (d_in,) fp32


def normalise(weight: Tensor, gram: Tensor, percdamp: float) -> Normalised:
    """Step 1: scale inputs to unit norm and dampen; ``weight`` and ``gram`` are not modified."""
    norm = torch.diag(gram).sqrt() + NORM_EPS  # (d_in,)
    XX = gram / norm  # columns j / norm_j
    XX = (XX.T / norm).T  # then rows i / norm_i (a transposed result, as published)
    W = (weight.float() * norm).T  # (d_in, d_out)
    idx = torch.arange(XX.shape[0], device=XX.device)
    XX[idx, idx] += percdamp * torch.diag(XX).mean()
    return Normalised(W=W, XX=XX, norm=norm)


def _per_layer_keep(values: Tensor, ratio: float) -> Tensor:
    """Keep all but the ``int(numel * ratio)`` smallest of ``values`` (d_in, d_out), by topk."""
    lowest = torch.topk(values.flatten(), k=int(values.numel() * ratio), largest=False).indices
    keep = torch.ones(values.numel(), dtype=torch.bool, device=values.device)
    keep[lowest] = False
    return keep.reshape(values.shape)


def _per_output_keep(values: Tensor, ratio: float) -> Tensor:
    """Per output (column of ``values``): keep what reaches its ``int(d_in * ratio)``-th
    smallest entry (0-based)."""
    threshold = values.sort(dim=0)[0][int(values.shape[0] * ratio)]  # (d_out,)
    return values >= threshold.unsqueeze(0)


def _two_of_four_keep(values: Tensor) -> Tensor:
    """The 2 largest of every 4 consecutive inputs of each output (``values`` (d_in, d_out))."""
    groups = values.T.reshape(-1, GROUP)  # (d_out * d_in / 4, 4); a copy: values.T is a view
    order = groups.sort(dim=1)[1]
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=values.device)
    rows = torch.arange(groups.shape[0], device=values.device)
    for rank in range(GROUP - KEPT, GROUP):
        keep[rows, order[:, rank]] = True
    return keep.reshape(values.T.shape).T


def initial_keep(W: Tensor, ratio: float, two_of_four: bool, per_output: bool) -> Tensor:
    """The pruner's mask without the gradual schedule, on ``|W|`` (d_in, d_out)."""
    if two_of_four:
        return _two_of_four_keep(W.abs())
    if per_output:
        return _per_output_keep(W.abs(), ratio)
    return _per_layer_keep(W.abs(), ratio)


def gradual_keep(
    V: Tensor, ratio: float, step: int, gradual: int, two_of_four: bool, per_output: bool
) -> Tensor:
    """The mask of iteration ``step`` (< ``gradual``) on ``V = W + U`` (module docstring)."""
    if two_of_four:
        ratio = 0.5  # published: the target is forced to 2:4's
    current = ratio - ratio * (1 - (step + 1) / gradual) ** 3
    if two_of_four:
        ranked = V.abs()
        ranked[_two_of_four_keep(V.abs())] = torch.inf  # always kept
        threshold = ranked.flatten().kthvalue(int(V.numel() * current) + 1)[0]
        return ranked >= threshold
    if per_output:
        return _per_output_keep(V.abs(), current)
    return _per_layer_keep(V.abs(), ratio)  # published: at the target, not the schedule's


def iterate(
    problem: Normalised,
    keep: Tensor | None,
    iters: int,
    rho: float = 1.0,
    reselect=None,
    gradual: int = 0,
) -> tuple[Tensor, Tensor]:
    """Steps 2-3: ``iters`` ADMM iterations; ``reselect(V, step)`` re-chooses the keep mask on
    ``V = W + U`` in the first ``gradual`` of them. Returns (weight (d_out, d_in) fp32, keep).

    ``problem.XX`` is dampened by ``rho`` in place (it is not needed afterwards).
    """
    W, XX = problem.W, problem.XX
    if iters == 0:
        return (W * keep).T / problem.norm, keep
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
    return Z.T / problem.norm, keep


@torch.no_grad()
def admm_update(
    weight: Tensor,
    gram: Tensor,
    mask: Tensor,
    iters: int = 20,
    rho: float = 1.0,
    percdamp: float = 0.1,
) -> Tensor:
    """The kept weights of ``weight`` updated by ADMM for the fixed ``mask``.

    Args:
        weight: (d_out, d_in) dense weights, any float dtype; not modified.
        gram: (d_in, d_in) fp32 ``sum_n X_n^T X_n`` (not scaled); not modified.
        mask: (d_out, d_in) bool, True = pruned; held fixed.
        iters: ADMM iterations (20 published).
        rho: the penalty (1 published).
        percdamp: dampening, a share of the normalised ``mean(diag XX)`` (0.1 published).

    Returns:
        The updated weights in ``weight.dtype``, 0 where ``mask`` is True.
    """
    with devices.no_tf32():
        problem = normalise(weight, gram.float(), percdamp)
        W, _ = iterate(problem, mask.logical_not().T, iters, rho)
    return W.to(weight.dtype)


@torch.no_grad()
def admm_prune(
    weight: Tensor,
    gram: Tensor,
    ratio: float,
    two_of_four: bool = False,
    per_output: bool = False,
    gradual: int = 15,
    iters: int = 20,
    rho: float = 1.0,
    percdamp: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """The published ADMM pruner for one Linear: the mask and the weights together.

    Args:
        weight: (d_out, d_in) dense weights, any float dtype; not modified.
        gram: (d_in, d_in) fp32 ``sum_n X_n^T X_n``; not modified.
        ratio: target sparsity (unstructured; ignored for 2:4).
        two_of_four: 2:4 sparsity (the published pruner knows no other N:M).
        per_output: choose per output row (else per layer, the published default).
        gradual: iterations with a re-chosen mask (15 published; 0: the first mask fixed).
        iters: ADMM iterations (20 published).
        rho, percdamp: as in :func:`admm_update`.

    Returns:
        The updated weights in ``weight.dtype`` and the mask (d_out, d_in), True = pruned.
    """
    with devices.no_tf32():
        problem = normalise(weight, gram.float(), percdamp)
        keep = None  # chosen by reselect in the first iteration
        if gradual == 0 or iters == 0:
            keep = initial_keep(problem.W, ratio, two_of_four, per_output)

        def reselect(V: Tensor, step: int) -> Tensor:
            return gradual_keep(V, ratio, step, gradual, two_of_four, per_output)

        W, keep = iterate(problem, keep, iters, rho, reselect, gradual)
    return W.to(weight.dtype), keep.logical_not().T
