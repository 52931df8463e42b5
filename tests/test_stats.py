"""Calibration statistics: running means against the direct formulas, batching invariance."""

from __future__ import annotations

import pytest
import torch

from gblm.calibration.stats import (
    accumulate_hessian,
    accumulate_row_sq,
    make_hessian,
    make_row_sq,
)

N, T, D = 6, 5, 8


def _inputs(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1, 1, D)  # uneven channels
    return (torch.randn(N, T, D, generator=gen) * scales).to(dtype)  # (N, T, d_in)


def _fold_row_sq(x: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    row_sq, n = make_row_sq(D), 0
    for start in range(0, x.shape[0], batch):
        n = accumulate_row_sq(row_sq, n, x[start : start + batch])
    return row_sq, n


def _fold_hessian(x: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    hessian, n = make_hessian(D), 0
    for start in range(0, x.shape[0], batch):
        n = accumulate_hessian(hessian, n, x[start : start + batch])
    return hessian, n


def test_row_sq_is_mean_over_samples_of_sum_over_tokens() -> None:
    x = _inputs().double()
    row_sq, n = _fold_row_sq(_inputs(), 1)
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
    hessian, n = _fold_hessian(_inputs(), 1)
    tokens = x.reshape(-1, D)  # (N * T, d_in)
    direct = 2.0 / N * tokens.t() @ tokens
    assert n == N
    assert hessian.dtype == torch.float32
    torch.testing.assert_close(hessian.double(), direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hessian, hessian.t())


@pytest.mark.parametrize("batch", [2, 4, 6])
def test_batching_does_not_change_the_statistics(batch: int) -> None:
    x = _inputs()
    row_sq_1, _ = _fold_row_sq(x, 1)
    row_sq_b, n = _fold_row_sq(x, batch)  # 4 leaves a smaller last batch of 2
    assert n == N
    torch.testing.assert_close(row_sq_b, row_sq_1, rtol=1e-5, atol=1e-6)
    hessian_1, _ = _fold_hessian(x, 1)
    hessian_b, _ = _fold_hessian(x, batch)
    torch.testing.assert_close(hessian_b, hessian_1, rtol=1e-5, atol=1e-5)


def test_half_precision_inputs_accumulate_in_fp32() -> None:
    x = _inputs(torch.float16)
    row_sq, _ = _fold_row_sq(x, 2)
    assert row_sq.dtype == torch.float32
    torch.testing.assert_close(row_sq, _fold_row_sq(x.float(), 2)[0])


def test_two_dimensional_input_counts_as_one_sample() -> None:
    x = _inputs()
    row_sq, n = make_row_sq(D), 0
    for sample in x:  # (T, d_in) each
        n = accumulate_row_sq(row_sq, n, sample)
    assert n == N
    torch.testing.assert_close(row_sq, _fold_row_sq(x, 1)[0])
