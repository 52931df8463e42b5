"""Calibration statistics: running means against the direct formulas."""

from __future__ import annotations

import torch

from gblm.calibration.stats import LinearStats

N, T, D = 6, 5, 8


def _inputs(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1, 1, D)  # uneven channels
    return (torch.randn(N, T, D, generator=gen) * scales).to(dtype)  # (N, T, d_in)


def _fold(x: torch.Tensor, wanted: str) -> LinearStats:
    stats = LinearStats.empty(frozenset({wanted}), D)
    for sample in x.split(1):  # (1, T, d_in) each, as the walk folds them
        stats.fold(sample)
    return stats


def test_row_sq_is_mean_over_samples_of_sum_over_tokens() -> None:
    x = _inputs().double()
    stats = _fold(_inputs(), "row_sq")
    row_sq, n = stats.row_sq_norms, stats.nsamples
    direct = torch.zeros(D, dtype=torch.float64)
    for sample in range(N):
        for t in range(T):
            direct += x[sample, t] ** 2
    direct /= N  # (1/N) sum_{n,t} X[n,t,j]^2: per sample, not per token
    assert n == N
    assert row_sq.dtype == torch.float32
    torch.testing.assert_close(row_sq.double(), direct, rtol=1e-5, atol=0)


def test_hessian_is_two_over_n_sum_xxt() -> None:
    x = _inputs().double()
    stats = _fold(_inputs(), "hessian")
    hessian, n = stats.hessian, stats.nsamples
    tokens = x.reshape(-1, D)  # (N * T, d_in)
    direct = 2.0 / N * tokens.t() @ tokens
    assert n == N
    assert hessian.dtype == torch.float32
    torch.testing.assert_close(hessian.double(), direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hessian, hessian.t())


def test_half_precision_inputs_accumulate_in_fp32() -> None:
    x = _inputs(torch.float16)
    row_sq = _fold(x, "row_sq").row_sq_norms
    assert row_sq.dtype == torch.float32
    torch.testing.assert_close(row_sq, _fold(x.float(), "row_sq").row_sq_norms)
