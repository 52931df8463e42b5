"""The OBS weight update of a given mask: known answers, a naive per-entry sweep, invariants."""

from __future__ import annotations

import pytest
import torch

from gblm.pruning.sparsegpt import sparsegpt_prune
from tests.conftest import correlated_problem, hessian_of, naive_obs_start

D_OUT, D_IN, N, T = 6, 40, 4, 16


def obs_update(weight, hessian, mask, **kwargs):
    """The OBS weight update: the sweep with ``mask`` held fixed."""
    return sparsegpt_prune(weight, hessian, 0.0, mask=mask, **kwargs)


def obs_iterative(weight, hessian, ratio, score, **kwargs):
    """The sweep with the mask chosen by ``score`` on the updated weights."""
    return sparsegpt_prune(weight, hessian, ratio, score=score, **kwargs)


def _naive_obs(weight, hessian, mask, percdamp=0.01):
    """The sweep one entry at a time, in float64, without blocks (every later column at once)."""
    d_out, d_in = weight.shape
    W, U = naive_obs_start(weight, hessian, percdamp)
    for c in range(d_in):
        for r in range(d_out):
            if mask[r][c]:
                err = W[r][c] / U[c][c]
                for c2 in range(c + 1, d_in):
                    W[r][c2] -= err * U[c][c2]
                W[r][c] = 0.0
    return torch.tensor(W, dtype=torch.float64)


def _random_mask(seed: int, ratio: float = 0.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(D_OUT, D_IN, generator=gen) < ratio


@pytest.mark.parametrize("blocksize", [128, 16, 7])
def test_matches_the_naive_sweep(blocksize):
    weight, x = correlated_problem(D_OUT, D_IN, N, T, 1, dead=(3,))
    hessian, mask = hessian_of(x), _random_mask(2)
    updated, out_mask = obs_update(weight, hessian, mask, blocksize=blocksize)
    expected = _naive_obs(weight, hessian, mask.tolist())
    assert torch.allclose(updated.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(out_mask[:, 3], torch.ones(D_OUT, dtype=torch.bool))  # the dead input
    keep = [j for j in range(D_IN) if j != 3]
    assert torch.equal(out_mask[:, keep], mask[:, keep])  # the method's mask is kept
    assert bool((updated[out_mask] == 0).all())


def test_two_inputs_known_answer():
    """Pruning w0 of a row moves w0 * H01 / H11 (damped H) onto w1: the OBS formula."""
    H = torch.tensor([[2.0, 0.6], [0.6, 1.0]])
    weight = torch.tensor([[0.8, -0.5]])
    mask = torch.tensor([[True, False]])
    updated, _ = obs_update(weight, H, mask)
    damp = 0.01 * 1.5
    expected = -0.5 + 0.8 * 0.6 / (1.0 + damp)
    assert updated[0, 0] == 0
    assert updated[0, 1].item() == pytest.approx(expected, abs=1e-6)


def test_uncorrelated_inputs_leave_the_kept_weights():
    """A diagonal H spreads no error: the update is the masked weight, bit for bit."""
    weight = correlated_problem(D_OUT, D_IN, N, T, 3)[0]
    hessian = torch.diag(torch.rand(D_IN) + 0.5)
    mask = _random_mask(4)
    updated, _ = obs_update(weight, hessian, mask)
    assert torch.equal(updated, weight * ~mask)


def test_nothing_pruned_changes_nothing():
    weight, x = correlated_problem(D_OUT, D_IN, N, T, 5)
    updated, _ = obs_update(weight, hessian_of(x), torch.zeros(D_OUT, D_IN, dtype=torch.bool))
    assert torch.equal(updated, weight)


def test_lowers_the_output_error_and_equals_sparsegpt_on_its_mask():
    weight, x = correlated_problem(D_OUT, D_IN, N, T, 6)
    hessian = hessian_of(x)
    solved, mask = sparsegpt_prune(weight, hessian, 0.5)
    updated, _ = obs_update(weight, hessian, mask)
    assert torch.equal(updated, solved)  # SparseGPT = its own mask + this update
    xs = x.reshape(-1, D_IN)
    dense = xs @ weight.T
    masked_error = (xs @ (weight * ~mask).T - dense).norm()
    assert (xs @ updated.T - dense).norm() < 0.8 * masked_error


def test_fp16_weights_come_back_in_fp16():
    weight, x = correlated_problem(D_OUT, D_IN, N, T, 7)
    updated, _ = obs_update(weight.half(), hessian_of(x), _random_mask(8))
    assert updated.dtype == torch.float16


def _naive_iterative(weight, hessian, ratio, blocksize, percdamp=0.01):
    """The iterative form with |W| as the score, one entry at a time in float64: each block's
    mask chosen on its current values (one threshold over the block, ``<=``), then swept."""
    d_out, d_in = weight.shape
    H = hessian.double().clone()
    damp = percdamp * H.diagonal().mean().item()
    H += damp * torch.eye(d_in, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H)).t().tolist()
    W = weight.double().tolist()
    mask = [[False] * d_in for _ in range(d_out)]
    for b0 in range(0, d_in, blocksize):
        cols = range(b0, min(b0 + blocksize, d_in))
        values = sorted(abs(W[r][c]) for r in range(d_out) for c in cols)
        threshold = values[int(len(values) * ratio)]
        for r in range(d_out):
            for c in cols:
                mask[r][c] = abs(W[r][c]) <= threshold
        for c in cols:
            for r in range(d_out):
                if mask[r][c]:
                    err = W[r][c] / U[c][c]
                    for c2 in range(c + 1, d_in):
                        W[r][c2] -= err * U[c][c2]
                    W[r][c] = 0.0
    return torch.tensor(W, dtype=torch.float64), torch.tensor(mask)


def test_iterative_form_matches_the_naive_sweep():
    weight, x = correlated_problem(D_OUT, D_IN, N, T, 9)
    hessian = hessian_of(x)
    updated, mask = obs_iterative(weight, hessian, 0.5, lambda cols, a, b: cols.abs(), blocksize=8)
    expected, expected_mask = _naive_iterative(weight, hessian, 0.5, 8)
    assert torch.equal(mask, expected_mask)
    assert torch.allclose(updated.double(), expected, rtol=1e-4, atol=1e-4)
    # the mask differs from the one chosen on the dense weights: later blocks see updated values
    dense_mask = torch.zeros_like(mask)
    for b0 in range(0, D_IN, 8):
        block = weight[:, b0 : b0 + 8].abs()
        dense_mask[:, b0 : b0 + 8] = block <= block.flatten().sort()[0][int(block.numel() * 0.5)]
    assert torch.equal(mask[:, :8], dense_mask[:, :8]) and not torch.equal(mask, dense_mask)


def test_iterative_n_m_groups():
    weight, x = correlated_problem(D_OUT, D_IN, N, T, 10)
    _, mask = obs_iterative(weight, hessian_of(x), 0.5, lambda c, a, b: c.abs(), n=2, m=4)
    assert mask.reshape(-1, 4).sum(dim=1).tolist() == [2] * (weight.numel() // 4)
