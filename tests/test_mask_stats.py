"""Mask statistics: known answers on hand-built masks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gblm.analysis.plots import downsample_mask, save_mask_images
from gblm.analysis.records import read_mask_stats_csv, write_mask_stats_csv
from gblm.analysis.stats import (
    LINEAR_FIELDS,
    linear_mask_stats,
    model_mask_stats,
    nm_validity,
)
from gblm.models.zeros import weight_zero_share
from gblm.pruning.masks import nm_mask, unstructured_row_mask


def test_one_full_row_and_column():
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[1, :] = True  # one fully pruned row
    mask[:, 3] = True  # one fully pruned column
    stats = linear_mask_stats("model.layers.2.self_attn.q_proj", mask)
    assert stats["block"] == 2 and stats["type"] == "q"
    assert (stats["d_out"], stats["d_in"]) == (4, 5)
    assert stats["pruned"] == 8 and stats["total"] == 20
    assert stats["sparsity"] == pytest.approx(0.4)
    assert stats["full_rows_share"] == pytest.approx(1 / 4)
    assert stats["full_cols_share"] == pytest.approx(1 / 5)
    # Rows: 1 row at 5/5, three at 1/5. Columns: one at 4/4, four at 1/4.
    assert stats["row_sparsity_min"] == pytest.approx(0.2)
    assert stats["row_sparsity_max"] == pytest.approx(1.0)
    assert stats["row_sparsity_mean"] == pytest.approx(0.4)
    assert stats["col_sparsity_min"] == pytest.approx(0.25)
    assert stats["col_sparsity_max"] == pytest.approx(1.0)
    col_std = torch.tensor([0.25, 0.25, 0.25, 1.0, 0.25]).std(unbiased=False).item()
    assert stats["col_sparsity_std"] == pytest.approx(col_std)
    assert stats["column_structure"] == pytest.approx(col_std / math.sqrt(0.4 * 0.6 / 4))
    assert stats["nm_valid"] is None and stats["nm_exact"] is None
    assert set(LINEAR_FIELDS) <= set(stats)


def test_empty_and_full_masks_have_zero_structure():
    empty = linear_mask_stats("model.layers.0.mlp.up_proj", torch.zeros(3, 4, dtype=torch.bool))
    full = linear_mask_stats("model.layers.0.mlp.up_proj", torch.ones(3, 4, dtype=torch.bool))
    assert empty["sparsity"] == 0.0 and empty["column_structure"] == 0.0
    assert full["sparsity"] == 1.0 and full["column_structure"] == 0.0
    assert full["full_rows_share"] == 1.0 and full["full_cols_share"] == 1.0


def test_nm_validity():
    score = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    mask = nm_mask(score, 2, 4)
    assert nm_validity(mask, 2, 4) == (True, True)
    stats = linear_mask_stats("model.layers.0.mlp.down_proj", mask, n=2, m=4)
    assert stats["nm_valid"] is True and stats["nm_exact"] is True
    assert stats["row_structure"] == 0.0  # the same count in every row

    more = mask.clone()
    more[0, :4] = True  # 4 of 4 pruned in one group: still valid for the kernel, not exact
    assert nm_validity(more, 2, 4) == (True, False)

    fewer = mask.clone()
    fewer[0, :4] = False  # 0 of 4 pruned in one group: invalid
    assert nm_validity(fewer, 2, 4) == (False, False)
    assert linear_mask_stats("x.0.o_proj", fewer, n=2, m=4)["nm_valid"] is False

    assert nm_validity(torch.ones(2, 6, dtype=torch.bool), 2, 4) == (False, False)  # 6 % 4


def test_structure_is_about_one_for_random_and_large_for_column_masks():
    gen = torch.Generator().manual_seed(0)
    random_mask = unstructured_row_mask(torch.rand(512, 1024, generator=gen), 0.5)
    random_stats = linear_mask_stats("model.layers.0.mlp.gate_proj", random_mask)
    assert random_stats["sparsity"] == pytest.approx(0.5)
    assert 0.85 < random_stats["column_structure"] < 1.15

    # Whole input channels matter more than others: prune the same half of the columns in most
    # rows (the structure GBLM-Pruner's paper reports), with some row-level noise.
    channel = torch.rand(1024, generator=gen)  # (d_in,)
    score = channel + 0.1 * torch.rand(512, 1024, generator=gen)  # (d_out, d_in)
    column_mask = unstructured_row_mask(score, 0.5)
    column_stats = linear_mask_stats("model.layers.0.mlp.gate_proj", column_mask)
    assert column_stats["sparsity"] == pytest.approx(0.5)
    assert column_stats["column_structure"] > 10 * random_stats["column_structure"]
    assert column_stats["full_cols_share"] > 0.2


def test_model_stats_aggregate_by_block_and_type(tmp_path):
    masks = {
        "model.layers.0.self_attn.q_proj": torch.ones(4, 4, dtype=torch.bool),
        "model.layers.0.mlp.down_proj": torch.zeros(4, 8, dtype=torch.bool),
        "model.layers.1.self_attn.q_proj": torch.zeros(4, 4, dtype=torch.bool),
    }
    per_linear, per_block, per_type, overall = model_mask_stats(masks)
    assert [r["name"] for r in per_linear] == list(masks)
    assert [(b["block"], b["pruned"], b["total"]) for b in per_block] == [(0, 16, 48), (1, 0, 16)]
    assert per_block[0]["sparsity"] == pytest.approx(1 / 3)
    types = {t["type"]: t for t in per_type}
    assert types["q"]["pruned"] == 16 and types["q"]["total"] == 32 and types["q"]["linears"] == 2
    assert types["down"]["sparsity"] == 0.0
    assert overall["pruned"] == 16 and overall["total"] == 64 and overall["sparsity"] == 0.25
    assert overall["nm_valid"] is None

    path = write_mask_stats_csv(per_linear, tmp_path / "mask_stats.csv")
    back = read_mask_stats_csv(path)
    assert [r["name"] for r in back] == list(masks)
    assert back[0]["pruned"] == 16 and back[0]["sparsity"] == 1.0 and back[0]["nm_valid"] is None
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_downsample_averages_blocks():
    mask = torch.zeros(1030, 8, dtype=torch.bool)
    mask[:, 0] = True
    small = downsample_mask(mask, max_pixels=512)
    assert small.shape == (344, 8)  # blocks of 3 rows, the last one covering 1 row
    assert torch.allclose(small[:, 0], torch.ones(344)) and small[:, 1:].sum() == 0
    half = torch.zeros(4, 4, dtype=torch.bool)
    half[:, :1] = True
    assert downsample_mask(half, max_pixels=2).tolist() == [[0.5, 0.0], [0.5, 0.0]]


def test_mask_images(tmp_path):
    masks = {
        "model.layers.0.mlp.down_proj": torch.rand(600, 1100) < 0.5,
        "model.layers.0.self_attn.q_proj": torch.rand(16, 16) < 0.3,
    }
    paths = save_mask_images(masks, list(masks), tmp_path / "masks")
    assert [p.name for p in paths] == [
        "model.layers.0.mlp.down_proj.png",
        "model.layers.0.self_attn.q_proj.png",
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zero_share_reads_the_weights():
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4, bias=False)) for _ in range(2))
    with torch.no_grad():
        model.layers[0][0].weight.fill_(1.0)
        model.layers[0][0].weight[:2] = 0.0  # half of block 0
        model.layers[1][0].weight.fill_(0.0)  # all of block 1
    check = weight_zero_share(model, ["layers.0.0", "layers.1.0"])
    assert check["overall"] == pytest.approx(0.75)
    assert check["zeros"] == 24 and check["total"] == 32
    assert [(b["block"], b["zero_share"]) for b in check["per_block"]] == [(0, 0.5), (1, 1.0)]
