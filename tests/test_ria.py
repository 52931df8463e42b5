"""RIA: the published known answers, a naive loop, N:M validity, the channel reallocation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gblm.calibration.stats import LinearStats
from gblm.methods.registry import build_method
from gblm.methods.ria import RIAPruner, lsa_refine, reallocation_order, ria_score
from gblm.pruning.sparsity import Sparsity


def _known() -> tuple[torch.Tensor, LinearStats]:
    return torch.tensor([[1.0, 2.0], [3.0, 4.0]]), LinearStats(
        row_sq_norms=torch.tensor([1.0, 4.0])
    )


def test_known_score() -> None:
    weight, stats = _known()
    score = RIAPruner().score("x", weight, stats)
    expected = torch.tensor([[0.5833, 1.4142], [1.1786, 1.7509]])
    assert torch.allclose(score, expected, atol=1e-4)


def test_known_masks_per_layer_and_per_row() -> None:
    weight, stats = _known()
    layer = RIAPruner()  # published default: one threshold per layer, score <= sorted[k]
    mask = layer.select(layer.score("x", weight, stats), Sparsity(0.5))
    assert mask.tolist() == [[True, True], [True, False]]  # 3 of 4, S <= 1.4142
    row = RIAPruner(comparison_group="row")
    mask = row.select(row.score("x", weight, stats), Sparsity(0.5))
    assert mask.tolist() == [[True, False], [True, False]]


def test_score_matches_a_naive_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 10, generator=gen)
    row_sq = torch.rand(10, generator=gen) * 5
    for a in (0.5, 1.0, 0.0):
        score = ria_score(weight, row_sq, a)
        W = weight.tolist()
        for i, j in itertools.product(range(6), range(10)):
            column = sum(abs(W[r][j]) for r in range(6))
            row = sum(abs(W[i][c]) for c in range(10))
            expected = (abs(W[i][j]) / column + abs(W[i][j]) / row) * math.sqrt(row_sq[j]) ** a
            assert score[i, j].item() == pytest.approx(expected, rel=1e-5)


def test_fp16_weight_relative_part_in_fp16_product_in_fp32() -> None:
    weight, stats = _known()
    score = ria_score(weight.half(), stats.row_sq_norms)
    assert score.dtype == torch.float32
    assert torch.allclose(score, ria_score(weight, stats.row_sq_norms), atol=1e-3)


def test_reallocation_order_known_answer() -> None:
    score = torch.arange(8.0).repeat(3, 1)  # column sums ascending: sigma = 0..7
    assert reallocation_order(score, 4).tolist() == [0, 3, 4, 7, 1, 2, 5, 6]


@pytest.mark.parametrize(
    "options", [{}, {"reallocation": True}, {"reallocation": True, "lsa": True}]
)
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_masks_are_valid(options: dict, nm: tuple[int, int]) -> None:
    n, m = nm
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 32, generator=gen)
    stats = LinearStats(row_sq_norms=torch.rand(32, generator=gen) * 3)
    pruner = RIAPruner(**options)
    score = pruner.score("x", weight, stats)
    mask = pruner.select(score, Sparsity(n / m, n, m))
    order = reallocation_order(score, m) if options else torch.arange(32)
    if options.get("lsa"):
        order = lsa_refine(score, order, n, m)
    assert (mask[:, order].reshape(8, -1, m).sum(dim=-1) == n).all()
    assert mask.sum().item() == 8 * 32 * n // m


def test_lsa_never_lowers_the_kept_score() -> None:
    gen = torch.Generator().manual_seed(2)
    score = torch.rand(4, 16, generator=gen)
    idx = reallocation_order(score, 4)
    better = lsa_refine(score, idx, 2, 4)
    assert sorted(better.tolist()) == list(range(16))

    def kept(order: torch.Tensor) -> float:
        groups = score[:, order].reshape(4, -1, 4)
        return (groups.sum() - torch.topk(groups, 2, dim=-1, largest=False).values.sum()).item()

    assert kept(better) >= kept(idx) - 1e-6


def test_registry_defaults_and_option_checks() -> None:
    pruner = build_method("ria")
    assert isinstance(pruner, RIAPruner)
    assert (pruner.a, pruner.comparison_group, pruner.reallocation, pruner.lsa) == (
        0.5,
        "layer",
        False,
        False,
    )
    with pytest.raises(ValueError, match="reallocation"):
        RIAPruner(lsa=True)
    with pytest.raises(ValueError, match="row_sq_norms"):
        RIAPruner().score("x", torch.ones(2, 2), LinearStats())
