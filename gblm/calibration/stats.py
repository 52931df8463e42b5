"""Calibration statistics of a Linear's inputs X (N samples of T tokens), in fp32.

- ``row_sq`` (Wanda, GBLM-Pruner): ``(1/N) sum_{n,t} X[n,t,j]^2``; scores use its sqrt.
- ``hessian`` (SparseGPT, the OBS update): ``H = (2/N) sum_{n,t} x x^T`` (d_in x d_in).
- ``gram`` (ADMM): ``XX = sum_{n,t} x x^T``, a plain sum, folded as ``XX += X^T X``.
- ``mean`` (DSnoT): ``(1/N) sum_n sum_t X[n,t,j]``, the mean over samples of each one's token sum.
- ``var`` (DSnoT): the token-weighted mean of each sample's population variance over its tokens.

The means over samples fold a batch of ``b`` samples as the published code does:
``S *= n / (n + b); n += b; S += (batch sum) / n``, so batching does not change them (up to
rounding). Pure tensor functions; the caller keeps the state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

#: The per-Linear statistics a method can ask the layer walk for.
STATISTICS = ("row_sq", "hessian", "gram", "mean", "var")


@dataclass
class LinearStats:
    """What the walk gathered for one Linear. Only the statistics the method asks for are filled."""

    row_sq_norms: Tensor | None = None  # (d_in,)
    hessian: Tensor | None = None  # (d_in, d_in)
    gram: Tensor | None = None  # (d_in, d_in)
    mean: Tensor | None = None  # (d_in,)
    var: Tensor | None = None  # (d_in,)
    nsamples: int = 0
    ntokens: int = 0  # tokens folded into ``var``

    @classmethod
    def empty(cls, wanted: frozenset[str], d_in: int, device: torch.device) -> LinearStats:
        """Zeroed accumulators for the statistics in ``wanted`` (names from :data:`STATISTICS`)."""
        vector = {"row_sq": "row_sq_norms", "mean": "mean", "var": "var"}
        stats = {field: make_row_sq(d_in, device) for s, field in vector.items() if s in wanted}
        stats |= {s: make_hessian(d_in, device) for s in ("hessian", "gram") if s in wanted}
        return cls(**stats)

    def fold(self, sample: Tensor) -> None:
        """Fold one sample's inputs (1, T, d_in) into every statistic held, in place."""
        if self.row_sq_norms is not None:
            accumulate_row_sq(self.row_sq_norms, self.nsamples, sample)
        if self.hessian is not None:
            accumulate_hessian(self.hessian, self.nsamples, sample)
        if self.gram is not None:
            accumulate_gram(self.gram, sample)
        if self.mean is not None:
            _running_mean(self.mean, self.nsamples, sample, lambda cols, n: cols.sum(dim=1) / n)
        if self.var is not None:
            _, cols = _columns(sample)  # (d_in, T)
            count, sample_var = cols.shape[1], torch.var(cols, dim=1, unbiased=False)
            if self.ntokens == 0:
                self.var.copy_(sample_var)
            else:
                self.var.mul_(self.ntokens).add_(sample_var * count).div_(self.ntokens + count)
            self.ntokens += count
        self.nsamples += 1


def _columns(x: Tensor) -> tuple[int, Tensor]:
    """``(b, ..., d_in)`` -> (b, x as (d_in, b * tokens) in fp32). A 2-D input is one sample."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    return x.shape[0], x.reshape(-1, x.shape[-1]).t().float()


def _running_mean(
    acc: Tensor, nsamples: int, x: Tensor, term: Callable[[Tensor, int], Tensor]
) -> int:
    """Fold the batch ``x`` (b, T, d_in) into ``acc``, the mean so far over ``nsamples`` samples,
    in place: ``acc *= n / (n + b); acc += term(X^T, n + b)``. Returns ``n + b``."""
    batch, cols = _columns(x)  # (d_in, b * T)
    acc *= nsamples / (nsamples + batch)
    nsamples += batch
    acc += term(cols, nsamples)
    return nsamples


def make_row_sq(d_in: int, device: torch.device | str | None = None) -> Tensor:
    return torch.zeros(d_in, dtype=torch.float32, device=device)


def make_hessian(d_in: int, device: torch.device | str | None = None) -> Tensor:
    return torch.zeros(d_in, d_in, dtype=torch.float32, device=device)


def accumulate_row_sq(row_sq: Tensor, nsamples: int, x: Tensor) -> int:
    """Fold ``x`` (b, T, d_in) or (T, d_in) into ``row_sq`` in place; returns ``nsamples + b``."""
    return _running_mean(row_sq, nsamples, x, lambda cols, n: torch.norm(cols, p=2, dim=1) ** 2 / n)


def accumulate_hessian(hessian: Tensor, nsamples: int, x: Tensor) -> int:
    """Fold ``x`` (b, T, d_in) or (T, d_in) into ``hessian`` in place; returns ``nsamples + b``."""

    def term(cols: Tensor, n: int) -> Tensor:
        cols = math.sqrt(2 / n) * cols
        return cols.matmul(cols.t())

    return _running_mean(hessian, nsamples, x, term)


def accumulate_gram(gram: Tensor, x: Tensor) -> None:
    """Add ``X^T X`` of ``x`` (b, T, d_in) or (T, d_in) to ``gram`` in place."""
    _, cols = _columns(x)  # (d_in, b * T): X^T
    gram += cols.matmul(cols.t())
