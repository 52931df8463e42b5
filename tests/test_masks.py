"""Mask selection (gblm.pruning.masks) against naive Python loops."""

from __future__ import annotations

import pytest
import torch

from gblm.pruning.masks import (
    kth_smallest,
    nm_mask,
    select_mask,
    unstructured_layer_mask,
    unstructured_row_mask,
    variant_mask,
)


def _naive_row(score: list[list[float]], ratio: float) -> list[list[bool]]:
    mask = []
    for row in score:
        k = int(len(row) * ratio)
        # stable: equal scores keep column order, so the lower column index goes first
        order = sorted(range(len(row)), key=lambda j: (row[j], j))
        pruned = set(order[:k])
        mask.append([j in pruned for j in range(len(row))])
    return mask


def _naive_layer(score: list[list[float]], ratio: float) -> list[list[bool]]:
    flat = sorted(v for row in score for v in row)
    k = int(len(flat) * ratio)
    if k == 0:
        return [[False] * len(row) for row in score]
    threshold = flat[k]
    return [[v <= threshold for v in row] for row in score]


def _naive_variant(score: list[list[float]], ratio: float) -> list[list[bool]]:
    """Wanda's appendix variant written with loops (same bisection, one row at a time)."""

    def mask_for(alpha: float) -> list[list[bool]]:
        out = []
        for row in score:
            ordered = sorted(row)
            budget, running, count = alpha * sum(row), 0.0, 0
            for value in ordered:
                running += value
                if running <= budget:
                    count += 1
            threshold = ordered[count - 1] if count else float("-inf")
            out.append([v <= threshold for v in row])
        return out

    def sparsity(mask: list[list[bool]]) -> float:
        return sum(map(sum, mask)) / (len(mask) * len(mask[0]))

    alpha, low, high = 0.4, 0.0, 0.8
    mask = mask_for(alpha)
    while abs(sparsity(mask) - ratio) > 0.001 and high - low >= 0.001:
        if sparsity(mask) > ratio:
            alpha, high = (alpha + low) / 2, alpha
        else:
            alpha, low = (alpha + high) / 2, alpha
        mask = mask_for(alpha)
    return mask


def _ties(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Scores with many ties (small integers), to exercise tie-breaking."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, shape, generator=gen).float()


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.77])
@pytest.mark.parametrize("ties", [False, True])
def test_row_mask_matches_stable_sort_loop(ratio: float, ties: bool) -> None:
    score = (
        _ties((7, 24)) if ties else torch.rand(7, 24, generator=torch.Generator().manual_seed(1))
    )
    mask = unstructured_row_mask(score, ratio)
    assert mask.tolist() == _naive_row(score.tolist(), ratio)
    assert (mask.sum(dim=1) == int(24 * ratio)).all()  # exact count in every row


@pytest.mark.parametrize(
    "rows, width",
    [(5, 7), (4, 512), (6, 513), (3, 576), (3, 1300), (2, 1536), (3, 2049), (2, 4096), (1, 3000)]
    + [(2, 4608), (2, 5000), (2, 11008)]
    + [(1, 9000), (1, 70000)],  # single long rows, as SparseGPT's layer threshold asks
)
@pytest.mark.parametrize("kind", ["normal", "ties", "sorted", "inf"])
def test_kth_smallest_matches_sort(rows: int, width: int, kind: str) -> None:
    gen = torch.Generator().manual_seed(rows * width)
    values = {
        "normal": lambda: torch.randn(rows, width, generator=gen),
        "ties": lambda: _ties((rows, width), seed=width),
        "sorted": lambda: torch.rand(rows, width, generator=gen).sort(dim=1).values,
        "inf": lambda: (
            torch.randn(rows, width, generator=gen)
            .clamp(max=1.0)
            .masked_fill(torch.rand(rows, width, generator=gen) < 0.3, float("inf"))
        ),
    }[kind]()
    ordered = values.sort(dim=1).values
    for k in {1, 2, width // 3, width // 2, width - 1, width} - {0}:
        got = kth_smallest(values, k)
        assert got.shape == (rows, 1)
        assert torch.equal(got, ordered[:, k - 1 : k]), k
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        narrow = values.to(dtype)
        k = max(1, width // 2)
        got = kth_smallest(narrow, k)
        assert got.dtype == dtype
        assert torch.equal(got, narrow.sort(dim=1).values[:, k - 1 : k])


@pytest.mark.parametrize("ties", [False, True])
def test_row_mask_wide_rows_match_stable_sort_loop(ties: bool) -> None:
    # rows of the widths of real layers, with and without ties
    score = (
        _ties((3, 1300), seed=7)
        if ties
        else torch.rand(3, 1300, generator=torch.Generator().manual_seed(3))
    )
    mask = unstructured_row_mask(score, 0.5)
    assert mask.tolist() == _naive_row(score.tolist(), 0.5)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("ties", [False, True])
def test_layer_mask_matches_threshold_loop(ratio: float, ties: bool) -> None:
    score = (
        _ties((9, 16)) if ties else torch.rand(9, 16, generator=torch.Generator().manual_seed(2))
    )
    mask = unstructured_layer_mask(score, ratio)
    assert mask.tolist() == _naive_layer(score.tolist(), ratio)
    if not ties:
        assert mask.sum().item() == int(score.numel() * ratio) + (ratio > 0)


def test_layer_mask_ties_overshoot_with_le() -> None:
    score = torch.tensor([[1.0, 1.0, 1.0, 2.0]])
    # sorted()[int(4 * 0.25)] = 1.0, and every entry <= 1.0 is pruned: 3 of 4 (the reference rule)
    assert unstructured_layer_mask(score, 0.25).tolist() == [[True, True, True, False]]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_prunes_n_smallest_per_group(n: int, m: int) -> None:
    score = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    mask = nm_mask(score, n, m)
    rows = score.tolist()
    for i, row in enumerate(rows):
        for g in range(0, 32, m):
            pruned = [row[j] for j in range(g, g + m) if mask[i, j]]
            kept = [row[j] for j in range(g, g + m) if not mask[i, j]]
            assert len(pruned) == n
            assert max(pruned) <= min(kept)
    assert torch.equal(select_mask(score, n / m, n, m, "layer"), mask)  # N:M ignores the group


def test_nm_mask_rejects_width_not_multiple_of_m() -> None:
    with pytest.raises(ValueError, match="multiple of M"):
        nm_mask(torch.rand(2, 10), 2, 4)


def test_select_mask_dispatch_and_bad_group() -> None:
    score = torch.rand(4, 8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(select_mask(score, 0.5, group="row"), unstructured_row_mask(score, 0.5))
    assert torch.equal(select_mask(score, 0.5, group="layer"), unstructured_layer_mask(score, 0.5))
    with pytest.raises(ValueError, match="comparison_group"):
        select_mask(score, 0.5, group="column")


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.6])
def test_variant_mask_matches_loop_and_reaches_target(ratio: float) -> None:
    score = torch.rand(128, 256, generator=torch.Generator().manual_seed(5))
    mask = variant_mask(score, ratio)
    expected = _naive_variant(score.tolist(), ratio)
    differ = (mask != torch.tensor(expected)).sum().item()
    assert differ <= 2  # float32 cumsum vs Python float may flip an entry at the budget edge
    assert abs(mask.float().mean().item() - ratio) <= 0.001 + 2 / score.numel()
    for i in range(score.shape[0]):  # per row, the pruned entries are the lowest ones
        if mask[i].any() and (~mask[i]).any():
            assert score[i][mask[i]].max() <= score[i][~mask[i]].min()


def test_packed_masks_hold_bits_and_give_back_the_masks() -> None:
    from gblm.pruning.storage import PackedMasks

    gen = torch.Generator().manual_seed(9)
    originals = {f"layer{i}": torch.rand(5 + i, 13, generator=gen) < 0.4 for i in range(3)}
    packed = PackedMasks()
    for name, mask in originals.items():
        packed.add(name, mask)
    assert list(packed) == list(originals) and len(packed) == 3
    assert packed.nbytes == sum(-(-m.numel() // 8) for m in originals.values())
    for name, mask in originals.items():
        got = packed[name]
        assert got.dtype == torch.bool
        assert torch.equal(got, mask)
    packed["layer0"][0, 0] ^= True  # a read is a copy: the held bits do not change
    assert torch.equal(packed["layer0"], originals["layer0"])
    assert {k: v.sum().item() for k, v in packed.items()} == {
        k: v.sum().item() for k, v in originals.items()
    }


def test_row_mask_with_nan_is_the_stable_sort() -> None:
    score = torch.rand(3, 700, generator=torch.Generator().manual_seed(8))
    score[1, 5] = float("nan")
    mask = unstructured_row_mask(score, 0.5)
    order = torch.sort(score, dim=-1, stable=True)[1]
    expected = torch.zeros_like(mask).scatter_(1, order[:, :350], True)
    assert torch.equal(mask, expected) and not mask[1, 5]  # NaN sorts last: never pruned


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_mask_of_a_large_layer_matches_the_threshold_rule(ties: bool, dtype) -> None:
    # 12800 entries, in fp32 and bf16 (compared in fp32, which widens bf16 exactly)
    gen = torch.Generator().manual_seed(11)
    score = (_ties((64, 200), seed=11) if ties else torch.rand(64, 200, generator=gen)).to(dtype)
    flat = score.float().reshape(-1).sort().values
    for ratio in (0.1, 0.5, 0.83):
        threshold = flat[int(score.numel() * ratio)]
        mask = unstructured_layer_mask(score, ratio)
        assert mask.dtype == torch.bool and torch.equal(mask, score.float() <= threshold)
    score[3, 7] = float("nan")  # NaN ranks last, as in a sort
    mask = unstructured_layer_mask(score, 0.5)
    assert not mask[3, 7] and mask.sum() >= score.numel() // 2


def _nan_last(value: float) -> tuple[bool, float]:
    """A sort key that orders NaN after every number, +inf included (as torch.sort does)."""
    return (value != value, 0.0 if value != value else value)


def _naive_row_nan_last(score: list[list[float]], ratio: float) -> list[list[bool]]:
    mask = []
    for row in score:
        k = int(len(row) * ratio)
        order = sorted(range(len(row)), key=lambda j: (_nan_last(row[j]), j))
        pruned = set(order[:k])
        mask.append([j in pruned for j in range(len(row))])
    return mask


def _naive_layer_nan_last(score: list[list[float]], ratio: float) -> list[list[bool]]:
    flat = sorted((v for row in score for v in row), key=_nan_last)
    k = int(len(flat) * ratio)
    if k == 0:
        return [[False] * len(row) for row in score]
    threshold = flat[k]  # a NaN threshold compares false with everything: nothing pruned
    return [[v <= threshold for v in row] for row in score]


def _with_nan_and_inf(shape: tuple[int, int], share: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    score = _ties(shape, seed=seed)
    score = score.masked_fill(torch.rand(shape, generator=gen) < 0.1, float("inf"))
    return score.masked_fill(torch.rand(shape, generator=gen) < share, float("nan"))


@pytest.mark.parametrize("share", [0.02, 0.3, 0.7])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9])
def test_row_and_layer_masks_with_nan_match_loops(share: float, ratio: float) -> None:
    score = _with_nan_and_inf((6, 40), share, seed=int(100 * share))
    rows = score.tolist()
    assert unstructured_row_mask(score, ratio).tolist() == _naive_row_nan_last(rows, ratio)
    assert unstructured_layer_mask(score, ratio).tolist() == _naive_layer_nan_last(rows, ratio)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
def test_row_and_layer_masks_in_other_dtypes_match_loops(dtype, ties: bool) -> None:
    gen = torch.Generator().manual_seed(12)
    score = (_ties((5, 48), seed=12) if ties else torch.randn(5, 48, generator=gen)).to(dtype)
    rows = score.tolist()  # every fp16 / bf16 value is exact as a Python float
    for ratio in (0.3, 0.5):
        assert unstructured_row_mask(score, ratio).tolist() == _naive_row(rows, ratio)
        # the layer rule compares in fp32: fp64 scores are rounded to fp32 first
        widened = score.float().tolist()
        assert unstructured_layer_mask(score, ratio).tolist() == _naive_layer(widened, ratio)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_matches_a_group_loop(n: int, m: int) -> None:
    score = torch.randn(5, 24, generator=torch.Generator().manual_seed(13))
    expected = []
    for row in score.tolist():
        pruned: set[int] = set()
        for g in range(0, len(row), m):
            pruned |= set(sorted(range(g, g + m), key=lambda j: row[j])[:n])
        expected.append([j in pruned for j in range(len(row))])
    assert nm_mask(score, n, m).tolist() == expected
