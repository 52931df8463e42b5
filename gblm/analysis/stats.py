"""Mask statistics: how much was pruned, where, and how structured the pattern is.

A mask is a boolean ``(d_out, d_in)`` tensor, True = pruned (the convention of
:mod:`gblm.pruning.masks`). Per Linear we record the sparsity, the distribution of the share
pruned per output row and per input column, the share of rows and of columns pruned entirely,
N:M validity, and two structure measures:

``column_structure = std(column sparsity) / sqrt(p (1 - p) / d_out)``

where ``p`` is the Linear's sparsity. If every entry were pruned independently with probability
``p``, each column's share pruned would be a binomial proportion over ``d_out`` rows, whose
standard deviation is the denominator; so a random mask scores about 1 and a mask that prunes
whole input channels together scores far above 1: this is the channel structure that
gradient-informed unstructured masks tend to show, measured. A per-row selection (Wanda,
GBLM-Pruner, N:M) keeps exactly the same count in every row, so its column sparsities are still binomial-like and a score of 1 means "no structure beyond chance".

``row_structure`` is the same over rows (``sqrt(p (1 - p) / d_in)``). Per-row and N:M selection
prune the same count in every row, so their ``row_structure`` is 0 by construction; it is
informative for layer-wise selection (magnitude). Both are 0 when ``p`` is 0 or 1 (there is no
variation to measure).

N:M validity (``m > 0``): each row is cut into groups of ``m`` consecutive input columns.
``nm_valid`` is True when every group has *at least* ``n`` pruned entries, which is what a
semi-structured kernel needs (at most ``m - n`` non-zeros per group; extra zeros are harmless);
``nm_exact`` is True when every group has exactly ``n``, which is what gblm's N:M selection
produces. Both are False when ``d_in`` is not a multiple of ``m``.

This module is pure tensor math: no files, no plots, no model. The per-block summaries hold the
achieved (pooled) sparsity of each block, whatever the target of each block was. The CSV and
JSON records are in :mod:`gblm.analysis.records`, the mask images in :mod:`gblm.analysis.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from gblm.names import block_index, linear_type

# Columns of mask_stats.csv, in order.
LINEAR_FIELDS = (
    "name",
    "block",
    "type",
    "d_out",
    "d_in",
    "pruned",
    "total",
    "sparsity",
    "row_sparsity_mean",
    "row_sparsity_std",
    "row_sparsity_min",
    "row_sparsity_max",
    "col_sparsity_mean",
    "col_sparsity_std",
    "col_sparsity_min",
    "col_sparsity_max",
    "full_rows_share",
    "full_cols_share",
    "row_structure",
    "column_structure",
    "nm_valid",
    "nm_exact",
)


def _distribution(prefix: str, values: Tensor) -> dict[str, float]:
    """Mean, population std, min and max of a 1-D float tensor, as plain floats."""
    return {
        f"{prefix}_mean": values.mean().item(),
        f"{prefix}_std": values.std(unbiased=False).item() if values.numel() > 1 else 0.0,
        f"{prefix}_min": values.min().item(),
        f"{prefix}_max": values.max().item(),
    }


def _structure(std: float, p: float, count: int) -> float:
    """``std`` relative to the std of a binomial proportion over ``count`` draws at rate ``p``."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return std / math.sqrt(p * (1.0 - p) / count)


def nm_validity(mask: Tensor, n: int, m: int) -> tuple[bool, bool]:
    """``(at least n pruned in every group of m, exactly n in every group)``; see the module doc."""
    d_out, d_in = mask.shape
    if m <= 0 or d_in % m:
        return False, False
    per_group = mask.reshape(d_out, d_in // m, m).sum(
        dim=-1, dtype=torch.int32
    )  # (d_out, d_in / m)
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
        "type": linear_type(name),
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
    """Pooled counts and sparsity, and the weight-averaged structure measures, over Linears."""
    pruned = sum(r["pruned"] for r in rows)
    total = sum(r["total"] for r in rows)
    out = {
        "linears": len(rows),
        "pruned": pruned,
        "total": total,
        "sparsity": pruned / total if total else 0.0,
        # Weighted by size so a big MLP matrix counts more than a small k_proj.
        "column_structure": sum(r["column_structure"] * r["total"] for r in rows) / total
        if total
        else 0.0,
        "row_structure": sum(r["row_structure"] * r["total"] for r in rows) / total
        if total
        else 0.0,
        "full_rows_share": sum(r["full_rows_share"] * r["d_out"] for r in rows)
        / max(1, sum(r["d_out"] for r in rows)),
        "full_cols_share": sum(r["full_cols_share"] * r["d_in"] for r in rows)
        / max(1, sum(r["d_in"] for r in rows)),
    }
    checks = [r["nm_valid"] for r in rows if r.get("nm_valid") is not None]
    out["nm_valid"] = all(checks) if checks else None
    return out


def aggregate_mask_stats(per_linear: Sequence[dict]) -> tuple[list[dict], list[dict], dict]:
    """Per-block, per-type and overall summaries of :func:`linear_mask_stats` rows.

    Lets the layer walk compute the per-Linear rows as it goes (and drop the masks), then
    summarise at the end. Rows without a block index are left out of the per-block list only.
    """
    by_block: dict[int, list[dict]] = {}
    by_type: dict[str, list[dict]] = {}
    for row in per_linear:
        if row["block"] is not None:
            by_block.setdefault(row["block"], []).append(row)
        by_type.setdefault(row["type"], []).append(row)
    per_block = [{"block": b, **_aggregate(rows)} for b, rows in sorted(by_block.items())]
    per_type = [{"type": t, **_aggregate(rows)} for t, rows in by_type.items()]
    return per_block, per_type, _aggregate(list(per_linear))


def model_mask_stats(
    masks: Mapping[str, Tensor], n: int = 0, m: int = 0, n_of: Mapping[str, int] | None = None
) -> tuple[list[dict], list[dict], list[dict], dict]:
    """Statistics of every mask, by full Linear name: ``(per_linear, per_block, per_type, overall)``.

    ``n_of`` gives a Linear its own N where a plan varies it per block (OWL's N:M).

    ``per_linear`` rows follow :data:`LINEAR_FIELDS`; block and type summaries hold pooled counts,
    the pooled sparsity and size-weighted structure measures (see :func:`aggregate_mask_stats`).
    """
    n_of = n_of or {}
    per_linear = [
        linear_mask_stats(name, mask, n_of.get(name, n), m) for name, mask in masks.items()
    ]
    per_block, per_type, overall = aggregate_mask_stats(per_linear)
    return per_linear, per_block, per_type, overall
