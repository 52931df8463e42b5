"""Calibration statistics of a Linear's inputs, as running means over samples (fp32).

- Activation statistic (Wanda, GBLM-Pruner): ``row_sq[j] = (1/N) sum_{n,t} X[n,t,j]^2``; the
  scores use ``sqrt(row_sq)`` = ``||X_j||_2 / sqrt(N)``.
- Hessian (SparseGPT): ``H = (2/N) sum_{n,t} x x^T`` (d_in x d_in).

Both are folded in one batch of ``b`` samples at a time exactly as the published code does:
``S *= n / (n + b); n += b; S += (batch sum) / n``, so the result does not depend on how the N
samples are batched (up to rounding). Pure tensor functions; the caller keeps the state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _columns(x: Tensor) -> tuple[int, Tensor]:
    """``(b, ..., d_in)`` -> (b, x as (d_in, b * tokens) in fp32). A 2-D input is one sample."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    batch = x.shape[0]
    return batch, x.reshape(-1, x.shape[-1]).t().float()  # (d_in, b * T)


def make_row_sq(d_in: int, device: torch.device | str | None = None) -> Tensor:
    """An empty activation statistic: zeros of shape (d_in,), fp32."""
    return torch.zeros(d_in, dtype=torch.float32, device=device)


def accumulate_row_sq(row_sq: Tensor, nsamples: int, x: Tensor) -> int:
    """Fold a batch into the running mean of squared input norms, in place.

    Args:
        row_sq: (d_in,) fp32, the mean so far over ``nsamples`` samples; updated in place.
        nsamples: samples folded in so far.
        x: the Linear's input for ``b`` samples, shape (b, T, d_in) (or (T, d_in): one sample).

    Returns:
        The new sample count, ``nsamples + b``.
    """
    batch, cols = _columns(x)
    row_sq *= nsamples / (nsamples + batch)
    nsamples += batch
    row_sq += torch.norm(cols, p=2, dim=1) ** 2 / nsamples  # (d_in,)
    return nsamples


def make_hessian(d_in: int, device: torch.device | str | None = None) -> Tensor:
    """An empty Hessian: zeros of shape (d_in, d_in), fp32."""
    return torch.zeros(d_in, d_in, dtype=torch.float32, device=device)


def accumulate_hessian(hessian: Tensor, nsamples: int, x: Tensor) -> int:
    """Fold a batch into the running Hessian ``(2/N) sum x x^T``, in place.

    Args:
        hessian: (d_in, d_in) fp32, the running value over ``nsamples`` samples; updated in place.
        nsamples: samples folded in so far.
        x: the Linear's input for ``b`` samples, shape (b, T, d_in) (or (T, d_in): one sample).

    Returns:
        The new sample count, ``nsamples + b``.
    """
    batch, cols = _columns(x)
    hessian *= nsamples / (nsamples + batch)
    nsamples += batch
    cols = math.sqrt(2 / nsamples) * cols  # (d_in, b * T)
    hessian += cols.matmul(cols.t())
    return nsamples
