"""Wanda and magnitude: scores against loops, reconstruction error on uneven input channels."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gblm.calibration.stats import LinearStats
from gblm.methods.magnitude import MagnitudePruner
from gblm.methods.wanda import WandaPruner
from gblm.pruning.sparsity import Sparsity

D_OUT, D_IN, N, T = 16, 32, 4, 8


def _layer_and_inputs(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(D_IN, D_OUT, bias=False)
    linear.weight.data = torch.randn(D_OUT, D_IN, generator=gen)
    scales = torch.exp(2.0 * torch.randn(D_IN, generator=gen))  # very uneven channel scales
    x = torch.randn(N, T, D_IN, generator=gen) * scales  # (N, T, d_in)
    return linear, x


def _stats(x: torch.Tensor) -> LinearStats:
    stats = LinearStats.empty(frozenset({"row_sq"}), D_IN)
    for sample in x.split(1):
        stats.fold(sample)
    return stats


def test_wanda_score_matches_loop() -> None:
    linear, x = _layer_and_inputs()
    score = WandaPruner().score("x", linear.weight.data, _stats(x))
    W, X = linear.weight.data.tolist(), x.tolist()
    for i in range(D_OUT):
        for j in range(D_IN):
            sq = sum(X[n][t][j] ** 2 for n in range(N) for t in range(T)) / N
            expected = abs(W[i][j]) * math.sqrt(sq)
            assert score[i, j].item() == pytest.approx(expected, rel=1e-5)


def test_wanda_fp16_weight_scores_in_fp32() -> None:
    linear, x = _layer_and_inputs()
    score = WandaPruner().score("x", linear.weight.data.half(), _stats(x))
    assert score.dtype == torch.float32


def _error(dense: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return torch.linalg.norm(x @ dense.t() - x @ pruned.t()).item()  # ||WX - W'X||


def test_wanda_reconstructs_better_than_magnitude_on_uneven_channels() -> None:
    linear, x = _layer_and_inputs()
    dense = linear.weight.data.clone()
    stats, sparsity = _stats(x), Sparsity(0.5)
    errors = {}
    for pruner in (WandaPruner(), MagnitudePruner(), MagnitudePruner("row")):
        linear.weight.data = dense.clone()
        mask = pruner.prune_linear("x", linear, stats, sparsity)
        assert (linear.weight.data[mask] == 0).all()
        assert torch.equal(linear.weight.data[~mask], dense[~mask])
        errors[f"{type(pruner).__name__[:-6].lower()}-{pruner.comparison_group}"] = _error(
            dense, linear.weight.data, x
        )
    assert errors["wanda-row"] < 0.7 * errors["magnitude-layer"]
    assert errors["wanda-row"] < 0.7 * errors["magnitude-row"]


def test_wanda_masks_per_row_and_nm() -> None:
    linear, x = _layer_and_inputs()
    dense = linear.weight.data.clone()
    mask = WandaPruner().prune_linear("x", linear, _stats(x), Sparsity(0.5))
    assert (mask.sum(dim=1) == D_IN // 2).all()
    linear.weight.data = dense.clone()
    mask = WandaPruner().prune_linear("x", linear, _stats(x), Sparsity(0.5, 2, 4))
    assert (mask.reshape(D_OUT, -1, 4).sum(dim=-1) == 2).all()


def test_wanda_variant_is_unstructured_only() -> None:
    linear, x = _layer_and_inputs()
    pruner = WandaPruner(use_variant=True)
    score = pruner.score("x", linear.weight.data, _stats(x))
    mask = pruner.select(score, Sparsity(0.5))
    assert not (mask.sum(dim=1) == D_IN // 2).all()  # per-row budgets, not a fixed count
    nm = pruner.select(score, Sparsity(0.5, 2, 4))
    assert (nm.reshape(D_OUT, -1, 4).sum(dim=-1) == 2).all()
    with pytest.raises(ValueError, match="use_variant"):
        WandaPruner(comparison_group="layer", use_variant=True)


def test_wanda_without_activations_fails_clearly() -> None:
    with pytest.raises(ValueError, match="row_sq_norms"):
        WandaPruner().score("x", torch.ones(2, 2), LinearStats())


def test_magnitude_flags_and_per_layer_default() -> None:
    pruner = MagnitudePruner()
    assert pruner.comparison_group == "layer" and not pruner.needs_calibration
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pruner.score("x", weight, LinearStats()), weight.abs())
    assert pruner.select(weight.abs(), Sparsity(0.25)).sum().item() == 8 * 16 // 4 + 1
