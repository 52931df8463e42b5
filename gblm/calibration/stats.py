"""Calibration statistics of a Linear's inputs X (N samples of T tokens), in fp32.

- ``row_sq`` (Wanda, GBLM-Pruner): ``(1/N) sum_{n,t} X[n,t,j]^2``; scores use its sqrt.
- ``hessian`` (SparseGPT, the OBS update): ``H = (2/N) sum_{n,t} x x^T`` (d_in x d_in).
- ``gram`` (ADMM): ``XX = sum_{n,t} x x^T``, a plain sum, folded as ``XX += X^T X``.
- ``mean`` (DSnoT): ``(1/N) sum_n sum_t X[n,t,j]``, the mean over samples of each one's token sum.
- ``var`` (DSnoT): the token-weighted mean of each sample's population variance over its tokens.

The means over samples fold one sample at a time as the published code does:
``S *= (n - 1) / n; S += (sample's sum) / n`` for the n-th sample.
"""

from __future__ import annotations

import functools
import math
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
    def empty(
        cls, wanted: frozenset[str], d_in: int, device: torch.device | str | None = None
    ) -> LinearStats:
        """Zeroed fp32 accumulators for the statistics in ``wanted`` (names from
        :data:`STATISTICS`)."""
        vector = {"row_sq": "row_sq_norms", "mean": "mean", "var": "var"}
        zeros = functools.partial(torch.zeros, dtype=torch.float32, device=device)
        stats = {field: zeros(d_in) for s, field in vector.items() if s in wanted}
        stats |= {s: zeros(d_in, d_in) for s in ("hessian", "gram") if s in wanted}
        return cls(**stats)

    def fold(self, sample: Tensor) -> None:
        """Fold one sample's inputs (1, T, d_in) into every statistic held, in place."""
        cols = sample.reshape(-1, sample.shape[-1]).t().float()  # (d_in, T): X^T in fp32
        n = self.nsamples + 1

        def running_mean(acc: Tensor, term: Tensor) -> None:
            acc *= self.nsamples / n
            acc += term

        if self.row_sq_norms is not None:
            running_mean(self.row_sq_norms, torch.norm(cols, p=2, dim=1) ** 2 / n)
        if self.hessian is not None:
            scaled = math.sqrt(2 / n) * cols
            running_mean(self.hessian, scaled.matmul(scaled.t()))
        if self.gram is not None:
            self.gram += cols.matmul(cols.t())
        if self.mean is not None:
            running_mean(self.mean, cols.sum(dim=1) / n)
        if self.var is not None:
            count, sample_var = cols.shape[1], torch.var(cols, dim=1, unbiased=False)
            if self.ntokens == 0:
                self.var.copy_(sample_var)
            else:
                self.var.mul_(self.ntokens).add_(sample_var * count).div_(self.ntokens + count)
            self.ntokens += count
        self.nsamples = n
