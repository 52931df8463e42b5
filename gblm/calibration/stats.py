"""Calibration statistics of a Linear's inputs, as running means over samples (fp32).

- Activation statistic (Wanda, GBLM-Pruner): ``row_sq[j] = (1/N) sum_{n,t} X[n,t,j]^2``; the
  scores use ``sqrt(row_sq)`` = ``||X_j||_2 / sqrt(N)``.
- Hessian (SparseGPT, the OBS update): ``H = (2/N) sum_{n,t} x x^T`` (d_in x d_in).
- Gram matrix (the ADMM update and pruner): ``XX = sum_{n,t} x x^T``, a plain sum (not scaled by
  N), folded one sample at a time as ``XX += X^T X`` as the published code does.
- Input sum (mask refinement, DSnoT): ``mean[j] = (1/N) sum_n sum_t X[n,t,j]``: the running mean
  over samples of each sample's token sum (so ``T`` times the token mean).
- Token variance (DSnoT): ``var[j]``, the token-weighted running mean of each sample's population
  variance over its tokens (within a sample only).

The first three are folded in one batch of ``b`` samples at a time exactly as the published code does:
``S *= n / (n + b); n += b; S += (batch sum) / n``, so the result does not depend on how the N
samples are batched (up to rounding). Pure tensor functions; the caller keeps the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: The per-Linear statistics a method can ask the layer walk for.
STATISTICS = ("row_sq", "hessian", "gram", "mean", "var")


@dataclass
class LinearStats:
    """What the walk gathered for one Linear. Only the statistics the method asks for are filled."""

    row_sq_norms: Tensor | None = None  # (d_in,) fp32: mean over samples of sum_t X[n,t,j]^2
    hessian: Tensor | None = None  # (d_in, d_in) fp32: (2/N) sum_{n,t} x x^T
    gram: Tensor | None = None  # (d_in, d_in) fp32: sum_{n,t} x x^T
    mean: Tensor | None = None  # (d_in,) fp32: mean over samples of sum_t X[n,t,j]
    var: Tensor | None = None  # (d_in,) fp32: token-weighted mean of per-sample variances
    nsamples: int = 0
    ntokens: int = 0  # tokens folded into ``var``

    @classmethod
    def empty(cls, wanted: frozenset[str], d_in: int, device: torch.device) -> LinearStats:
        """Zeroed accumulators for the statistics in ``wanted`` (names from :data:`STATISTICS`)."""
        return cls(
            row_sq_norms=make_row_sq(d_in, device) if "row_sq" in wanted else None,
            hessian=make_hessian(d_in, device) if "hessian" in wanted else None,
            gram=make_hessian(d_in, device) if "gram" in wanted else None,
            mean=make_row_sq(d_in, device) if "mean" in wanted else None,
            var=make_row_sq(d_in, device) if "var" in wanted else None,
        )

    def fold(self, sample: Tensor) -> None:
        """Fold one sample's inputs (1, T, d_in) into every statistic held, in place."""
        if self.row_sq_norms is not None:
            accumulate_row_sq(self.row_sq_norms, self.nsamples, sample)
        if self.hessian is not None:
            accumulate_hessian(self.hessian, self.nsamples, sample)
        if self.gram is not None:
            accumulate_gram(self.gram, sample)
        if self.mean is not None:
            accumulate_input_sum(self.mean, self.nsamples, sample)
        if self.var is not None:
            self.ntokens = accumulate_token_var(self.var, self.ntokens, sample)
        self.nsamples += 1


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


def accumulate_gram(gram: Tensor, x: Tensor) -> None:
    """Add a batch's ``X^T X`` to the plain sum ``gram`` (d_in, d_in) fp32, in place.

    ``x`` is (b, T, d_in) or (T, d_in); its tokens are the rows of ``X``.
    """
    _, cols = _columns(x)  # (d_in, b * T): X^T
    gram += cols.matmul(cols.t())


def accumulate_input_sum(mean: Tensor, nsamples: int, x: Tensor) -> int:
    """Fold a batch into the running mean over samples of the token sums, in place.

    Args:
        mean: (d_in,) fp32, the mean so far over ``nsamples`` samples; updated in place.
        nsamples: samples folded in so far.
        x: the Linear's input for ``b`` samples, shape (b, T, d_in) (or (T, d_in): one sample).

    Returns:
        The new sample count, ``nsamples + b``.
    """
    batch, cols = _columns(x)
    mean *= nsamples / (nsamples + batch)
    nsamples += batch
    mean += torch.sum(cols, dim=1) / nsamples  # (d_in,)
    return nsamples


def accumulate_token_var(var: Tensor, ntokens: int, x: Tensor) -> int:
    """Fold one sample into the token-weighted running mean of population variances, in place.

    Args:
        var: (d_in,) fp32, the mean so far over ``ntokens`` tokens; updated in place.
        ntokens: tokens folded in so far.
        x: one sample's input, (1, T, d_in) or (T, d_in); the variance is over its T tokens.

    Returns:
        The new token count, ``ntokens + T``.
    """
    _, cols = _columns(x)  # (d_in, T)
    count = cols.shape[1]
    sample_var = torch.var(cols, dim=1, unbiased=False)  # (d_in,)
    if ntokens == 0:
        var.copy_(sample_var)
    else:
        var.mul_(ntokens).add_(sample_var * count).div_(ntokens + count)
    return ntokens + count
