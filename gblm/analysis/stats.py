"""Mask statistics: how much was pruned, where, and how structured the pattern is.

A mask is a boolean ``(d_out, d_in)`` tensor, True = pruned (:mod:`gblm.pruning.masks`). Per
Linear: the sparsity ``p``, the distribution of the share pruned per output row and per input
column, the share of rows and of columns pruned entirely, N:M validity, and two structure measures:

``column_structure = std(column sparsity) / sqrt(p (1 - p) / d_out)``

the spread of the columns' shares relative to that of a mask whose entries are pruned
independently with probability ``p`` (a binomial proportion over ``d_out`` rows). A random mask
scores about 1; a mask that prunes whole input channels together (the channel structure of
gradient-informed masks) scores far above 1. ``row_structure`` is the same over rows; per-row and
N:M selection prune the same count in every row, so theirs is 0. Both are 0 when ``p`` is 0 or 1.

N:M validity (``m > 0``), over groups of ``m`` consecutive input columns of a row: ``nm_valid``
when every group has at least ``n`` pruned (what a semi-structured kernel needs), ``nm_exact``
when every group has exactly ``n`` (what gblm's N:M selection produces); both False when ``d_in``
is not a multiple of ``m``. Pure tensor math: no files, no plots, no model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gblm.names import block_index, module_type

#: The per-Linear fields, in the order of the columns of ``mask_stats.csv``.
LINEAR_FIELDS = (
    "name", "block", "type", "d_out", "d_in", "pruned", "total", "sparsity",
    "row_sparsity_mean", "row_sparsity_std", "row_sparsity_min", "row_sparsity_max",
    "col_sparsity_mean", "col_sparsity_std", "col_sparsity_min", "col_sparsity_max",
    "full_rows_share", "full_cols_share", "row_structure", "column_structure", "nm_valid",
    "nm_exact",
)  # fmt: skip


def _distribution(prefix: str, values: Tensor) -> dict[str, float]:
    """Mean, population std, min and max of a 1-D float tensor, as plain floats."""
    return {
        f"{prefix}_mean": values.mean().item(),
        f"{prefix}_std": values.std(unbiased=False).item(),
        f"{prefix}_min": values.min().item(),
        f"{prefix}_max": values.max().item(),
    }


def _structure(std: float, p: float, count: int) -> float:
    """``std`` relative to the std of a binomial proportion over ``count`` draws at rate ``p``."""
    return 0.0 if p <= 0.0 or p >= 1.0 else std / math.sqrt(p * (1.0 - p) / count)


def nm_validity(mask: Tensor, n: int, m: int) -> tuple[bool, bool]:
    """``(at least n pruned in every group of m, exactly n in every group)``; see the module doc."""
    d_out, d_in = mask.shape
    if m <= 0 or d_in % m:
        return False, False
    per_group = mask.reshape(d_out, d_in // m, m).sum(dim=-1, dtype=torch.int32)  # (d_out, d_in/m)
    return bool((per_group >= n).all()), bool((per_group == n).all())


@torch.no_grad()
def linear_mask_stats(name: str, mask: Tensor, n: int = 0, m: int = 0) -> dict:
    """Statistics of one Linear's mask (True = pruned); the fields are :data:`LINEAR_FIELDS`.

    Args:
        name: full module name, e.g. ``model.layers.3.mlp.down_proj``.
        mask: boolean ``(d_out, d_in)``; it may live on any device and is not copied to float.
        n, m: the N:M pattern; ``m = 0`` for unstructured (then ``nm_valid``/``nm_exact`` are None).
    """
    if mask.dim() != 2:
        raise ValueError(
            f"{name}: a mask must be 2-D (d_out, d_in), got shape {tuple(mask.shape)}."
        )
    mask = mask.bool()
    d_out, d_in = mask.shape
    total = d_out * d_in
    row_pruned = mask.sum(dim=1, dtype=torch.int32)  # (d_out,)
    col_pruned = mask.sum(dim=0, dtype=torch.int32)  # (d_in,)
    pruned = int(row_pruned.sum().item())
    p = pruned / total if total else 0.0
    row_sparsity = row_pruned.double() / d_in  # (d_out,)
    col_sparsity = col_pruned.double() / d_out  # (d_in,)
    stats: dict = {
        "name": name,
        "block": block_index(name),
        "type": module_type(name),
        "d_out": d_out,
        "d_in": d_in,
        "pruned": pruned,
        "total": total,
        "sparsity": p,
        **_distribution("row_sparsity", row_sparsity),
        **_distribution("col_sparsity", col_sparsity),
        "full_rows_share": (row_pruned == d_in).double().mean().item(),
        "full_cols_share": (col_pruned == d_out).double().mean().item(),
    }
    stats["row_structure"] = _structure(stats["row_sparsity_std"], p, d_in)
    stats["column_structure"] = _structure(stats["col_sparsity_std"], p, d_out)
    if m > 0:
        stats["nm_valid"], stats["nm_exact"] = nm_validity(mask, n, m)
    else:
        stats["nm_valid"] = stats["nm_exact"] = None
    return stats


def _aggregate(rows: Sequence[dict]) -> dict:
    """Pooled counts and sparsity, and the size-weighted structure measures, over Linears."""

    def weighted(key: str, weight: str) -> float:  # a big MLP matrix counts more than a k_proj
        size = sum(r[weight] for r in rows)
        return sum(r[key] * r[weight] for r in rows) / size if size else 0.0

    pruned, total = sum(r["pruned"] for r in rows), sum(r["total"] for r in rows)
    checks = [r["nm_valid"] for r in rows if r.get("nm_valid") is not None]
    return {
        "linears": len(rows),
        "pruned": pruned,
        "total": total,
        "sparsity": pruned / total if total else 0.0,
        "column_structure": weighted("column_structure", "total"),
        "row_structure": weighted("row_structure", "total"),
        "full_rows_share": weighted("full_rows_share", "d_out"),
        "full_cols_share": weighted("full_cols_share", "d_in"),
        "nm_valid": all(checks) if checks else None,
    }


def model_mask_stats(
    masks: Mapping[str, Tensor], n: int = 0, m: int = 0, n_of: Mapping[str, int] | None = None
) -> tuple[list[dict], list[dict], list[dict], dict]:
    """``(per_linear, per_block, per_type, overall)`` of every mask, by full Linear name;
    ``n_of`` gives a Linear its own N where a plan varies it per block (OWL's N:M). A Linear
    without a block index is left out of the per-block list only."""
    n_of = n_of or {}
    per_linear = [
        linear_mask_stats(name, mask, n_of.get(name, n), m) for name, mask in masks.items()
    ]
    by_block: dict[int, list[dict]] = {}
    by_type: dict[str, list[dict]] = {}
    for row in per_linear:
        if row["block"] is not None:
            by_block.setdefault(row["block"], []).append(row)
        by_type.setdefault(row["type"], []).append(row)
    per_block = [{"block": b, **_aggregate(rows)} for b, rows in sorted(by_block.items())]
    per_type = [{"type": t, **_aggregate(rows)} for t, rows in by_type.items()]
    return per_linear, per_block, per_type, _aggregate(per_linear)
