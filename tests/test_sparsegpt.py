"""SparseGPT: the kernel against a naive per-column re-implementation, and its guarantees."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gblm.calibration.stats import LinearStats
from gblm.methods.sparsegpt import SparseGPTPruner
from gblm.pruning.sparsegpt import sparsegpt_prune
from gblm.pruning.sparsity import Sparsity
from tests.conftest import correlated_problem, hessian_of, naive_obs_start

D_OUT, D_IN, N, T = 8, 32, 4, 16


def _naive_sparsegpt(
    weight: torch.Tensor, hessian: torch.Tensor, ratio: float, n: int, m: int, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The algorithm written out one entry at a time, in float64, with the full (non-lazy) update."""
    d_out, d_in = weight.shape
    W, U = naive_obs_start(weight, hessian)
    mask = [[False] * d_in for _ in range(d_out)]
    for b0 in range(0, d_in, blocksize):
        cols = range(b0, min(b0 + blocksize, d_in))
        if m == 0:
            saliency = {(r, c): W[r][c] ** 2 / U[c][c] ** 2 for r in range(d_out) for c in cols}
            k = int(len(saliency) * ratio)
            threshold = sorted(saliency.values())[k]
            for (r, c), s in saliency.items():
                mask[r][c] = s <= threshold
        for c in cols:
            if m and (c - b0) % m == 0:
                for r in range(d_out):
                    group = sorted(range(c, c + m), key=lambda j: W[r][j] ** 2 / U[j][j] ** 2)
                    for j in group[:n]:
                        mask[r][j] = True
            for r in range(d_out):
                w = W[r][c]
                q = 0.0 if mask[r][c] else w
                err = (w - q) / U[c][c]
                for j in range(c, d_in):
                    W[r][j] -= err * U[c][j]
                W[r][c] = q
    return torch.tensor(W, dtype=torch.float64), torch.tensor(mask)


@pytest.mark.parametrize(
    ("ratio", "n", "m", "blocksize"),
    [(0.5, 0, 0, 8), (0.5, 0, 0, 128), (0.7, 0, 0, 16), (0.5, 2, 4, 8), (0.5, 4, 8, 16)],
)
def test_kernel_matches_naive_loops(ratio: float, n: int, m: int, blocksize: int) -> None:
    weight, x = correlated_problem(D_OUT, D_IN, N, T, dead=(5,))
    hessian = hessian_of(x)
    new_weight, mask = sparsegpt_prune(weight, hessian, ratio, n, m, blocksize=blocksize)
    ref_weight, ref_mask = _naive_sparsegpt(weight, hessian, ratio, n, m, blocksize)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new_weight.double(), ref_weight, rtol=1e-4, atol=1e-4)


def test_update_beats_the_same_mask_without_update() -> None:
    weight, x = correlated_problem(D_OUT, D_IN, N, T, seed=1)
    new_weight, mask = sparsegpt_prune(weight, hessian_of(x), 0.5)
    masked_only = weight.masked_fill(mask, 0)

    def error(w: torch.Tensor) -> float:
        return torch.linalg.norm(x @ weight.t() - x @ w.t()).item()  # ||WX - W'X||

    assert error(new_weight) < 0.9 * error(masked_only)
    assert not torch.equal(new_weight[~mask], weight[~mask])  # the survivors were updated


def test_pruned_entries_exactly_zero_and_counts() -> None:
    weight, x = correlated_problem(D_OUT, D_IN, N, T, seed=2)
    hessian = hessian_of(x)
    new_weight, mask = sparsegpt_prune(weight, hessian, 0.5, blocksize=8)
    assert (new_weight[mask] == 0).all()  # exactly zero, not a rounding residue
    assert (new_weight[~mask] != 0).all()
    per_block = mask.reshape(D_OUT, D_IN // 8, 8).sum(dim=(0, 2))
    assert (per_block == D_OUT * 8 // 2 + 1).all()  # `<=` the int(numel * ratio)-th smallest
    _, nm = sparsegpt_prune(weight, hessian, 0.5, 2, 4)
    assert (nm.reshape(D_OUT, -1, 4).sum(dim=-1) == 2).all()


def test_dead_inputs_are_zeroed_and_finite() -> None:
    weight, x = correlated_problem(D_OUT, D_IN, N, T, seed=3, dead=(0, 7, 31))
    hessian = hessian_of(x)
    assert (torch.diag(hessian)[[0, 7, 31]] == 0).all()
    before = hessian.clone()
    new_weight, mask = sparsegpt_prune(weight, hessian, 0.25)
    assert torch.isfinite(new_weight).all()
    assert (new_weight[:, [0, 7, 31]] == 0).all() and mask[:, [0, 7, 31]].all()
    assert torch.equal(hessian, before)  # the kernel does not modify its inputs


def test_half_precision_weight_round_trips_dtype() -> None:
    weight, x = correlated_problem(D_OUT, D_IN, N, T, seed=4)
    new_weight, mask = sparsegpt_prune(weight.half(), hessian_of(x), 0.5)
    assert new_weight.dtype == torch.float16
    assert (new_weight[mask] == 0).all()


def test_nm_needs_divisible_width() -> None:
    weight, x = correlated_problem(D_OUT, D_IN, N, T)
    with pytest.raises(ValueError, match="divisible by M"):
        sparsegpt_prune(weight, hessian_of(x), 0.5, 2, 4, blocksize=6)


def test_pruner_writes_the_weight() -> None:
    weight, x = correlated_problem(D_OUT, D_IN, N, T, seed=5)
    linear = nn.Linear(D_IN, D_OUT, bias=False)
    linear.weight.data = weight.clone()
    hessian = hessian_of(x)
    mask = SparseGPTPruner().prune_linear("x", linear, LinearStats(hessian=hessian), Sparsity(0.5))
    expected, expected_mask = sparsegpt_prune(weight, hessian, 0.5)
    assert torch.equal(mask, expected_mask)
    assert torch.equal(linear.weight.data, expected)
    assert SparseGPTPruner.stats == {"hessian"}
    with pytest.raises(ValueError, match="hessian"):
        SparseGPTPruner().prune_linear("x", linear, LinearStats(), Sparsity(0.5))
