"""Mask statistics: how much was pruned, where, and how structured the pattern is.

A mask is a boolean ``(d_out, d_in)`` tensor, True = pruned (the convention of
:mod:`gblm.pruning.masks`). Per Linear we record the sparsity, the distribution of the share
pruned per output row and per input column, the share of rows and of columns pruned entirely,
N:M validity, and two structure measures:

``column_structure = std(column sparsity) / sqrt(p (1 - p) / d_out)``

where ``p`` is the Linear's sparsity. If every entry were pruned independently with probability
``p``, each column's share pruned would be a binomial proportion over ``d_out`` rows, whose
standard deviation is the denominator; so a random mask scores about 1 and a mask that prunes
whole input channels together scores far above 1. The GBLM-Pruner paper observes that its
gradient-informed unstructured masks show such channel structure; this number measures it. A
per-row selection (Wanda, GBLM-Pruner, N:M) keeps exactly the same count in every row, so its
column sparsities are still binomial-like and a score of 1 means "no structure beyond chance".

``row_structure`` is the same over rows (``sqrt(p (1 - p) / d_in)``). Per-row and N:M selection
prune the same count in every row, so their ``row_structure`` is 0 by construction; it is
informative for layer-wise selection (magnitude). Both are 0 when ``p`` is 0 or 1 (there is no
variation to measure).

N:M validity (``m > 0``): each row is cut into groups of ``m`` consecutive input columns.
``nm_valid`` is True when every group has *at least* ``n`` pruned entries, which is what a
semi-structured kernel needs (at most ``m - n`` non-zeros per group; extra zeros are harmless);
``nm_exact`` is True when every group has exactly ``n``, which is what gblm's N:M selection
produces. Both are False when ``d_in`` is not a multiple of ``m``.

This module is pure torch (plus matplotlib, imported lazily, for the mask images).
"""

from __future__ import annotations

import csv
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from gblm.models.layers import module_type

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

MAX_IMAGE_PIXELS = 512  # mask images are block-averaged down to at most this many pixels a side


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


def block_index(name: str) -> int | None:
    """The decoder-block index in a full Linear name: the first all-digit component, else None.

    ``model.layers.3.mlp.down_proj`` -> 3; ``model.decoder.layers.11.fc1`` -> 11.
    """
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def linear_type(name: str) -> str:
    """Short module type (``q``, ``down``, ...) from the last two components of a Linear name."""
    return module_type(".".join(name.split(".")[-2:]))


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
    masks: Mapping[str, Tensor], n: int = 0, m: int = 0
) -> tuple[list[dict], list[dict], list[dict], dict]:
    """Statistics of every mask, by full Linear name: ``(per_linear, per_block, per_type, overall)``.

    ``per_linear`` rows follow :data:`LINEAR_FIELDS`; block and type summaries hold pooled counts,
    the pooled sparsity and size-weighted structure measures (see :func:`aggregate_mask_stats`).
    """
    per_linear = [linear_mask_stats(name, mask, n, m) for name, mask in masks.items()]
    per_block, per_type, overall = aggregate_mask_stats(per_linear)
    return per_linear, per_block, per_type, overall


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_mask_stats_csv(per_linear: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write the per-Linear rows as CSV (columns :data:`LINEAR_FIELDS` first), atomically."""
    rows = list(per_linear)
    fields = list(LINEAR_FIELDS) + sorted({k for r in rows for k in r} - set(LINEAR_FIELDS))

    def write(handle) -> None:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in fields})

    path = Path(path)
    _atomic_write(path, write)
    return path


def read_mask_stats_csv(path: str | os.PathLike) -> list[dict]:
    """Read :func:`write_mask_stats_csv` output back, with numbers and booleans restored."""

    def parse(value: str):
        if value == "":
            return None
        if value in ("True", "False"):
            return value == "True"
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return value

    with open(path, newline="") as handle:
        return [
            {k: (v if k in ("name", "type") else parse(v)) for k, v in row.items()}
            for row in csv.DictReader(handle)
        ]


def downsample_mask(mask: Tensor, max_pixels: int = MAX_IMAGE_PIXELS) -> Tensor:
    """Share pruned in blocks of the mask, so that neither side exceeds ``max_pixels``.

    The block shape is ``(ceil(d_out / max_pixels), ceil(d_in / max_pixels))``; edge blocks that
    overhang the matrix average only the entries they cover. Counts are summed straight from the
    boolean mask, so a 70B-model matrix needs no float copy. Returns float ``(rows, cols)``.
    """
    d_out, d_in = mask.shape
    fr, fc = math.ceil(d_out / max_pixels), math.ceil(d_in / max_pixels)
    rows, cols = math.ceil(d_out / fr), math.ceil(d_in / fc)
    padded = mask.new_zeros((rows * fr, cols * fc), dtype=torch.bool)
    padded[:d_out, :d_in] = mask
    pruned = padded.view(rows * fr, cols, fc).sum(dim=2, dtype=torch.int32)  # (rows * fr, cols)
    pruned = pruned.view(rows, fr, cols).sum(dim=1)  # (rows, cols)
    row_cover = torch.full((rows,), fr, dtype=torch.float32)
    row_cover[-1] = d_out - (rows - 1) * fr
    col_cover = torch.full((cols,), fc, dtype=torch.float32)
    col_cover[-1] = d_in - (cols - 1) * fc
    return pruned.float().cpu() / torch.outer(row_cover, col_cover)


def mask_image_name(name: str) -> str:
    """File name of a Linear's mask image: the module name with unsafe characters replaced."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".png"


def save_mask_images(
    masks: Mapping[str, Tensor], names: Iterable[str], out_dir: str | os.PathLike
) -> list[Path]:
    """Save a PNG of each named mask: share pruned per pixel, with a colorbar and its sparsity.

    Masks bigger than :data:`MAX_IMAGE_PIXELS` a side are block-averaged first (see
    :func:`downsample_mask`), so stripes of pruned columns stay visible at any size.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name in names:
        mask = masks[name].detach().bool().cpu()
        d_out, d_in = mask.shape
        image = downsample_mask(mask).numpy()
        sparsity = mask.sum().item() / max(1, mask.numel())
        # Large enough that a 512-pixel image is not resampled down; axes in weight indices.
        fig, ax = plt.subplots(figsize=(8.5, 6.0), dpi=100)
        shown = ax.imshow(
            image,
            cmap="magma",
            vmin=0.0,
            vmax=1.0,
            aspect="auto",
            interpolation="nearest",
            extent=(0, d_in, d_out, 0),
        )
        block = f"; {math.ceil(d_out / image.shape[0])}x{math.ceil(d_in / image.shape[1])} blocks"
        scale = "" if image.shape == (d_out, d_in) else block
        ax.set_title(f"{name}\nsparsity {sparsity:.1%}  ({d_out}x{d_in}{scale})", fontsize=10)
        ax.set_xlabel("input column")
        ax.set_ylabel("output row")
        fig.colorbar(shown, ax=ax, label="share pruned")
        fig.tight_layout()
        path = out_dir / mask_image_name(name)
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


@torch.no_grad()
def weight_zero_share(model: nn.Module, names: Iterable[str]) -> dict:
    """The share of exact zeros in the named Linears' weights, per block and overall.

    This is the post-pruning sparsity check: it reads the weights themselves, not the masks, so
    it also catches a method that returned a mask but failed to zero the weights.

    Returns:
        ``{"overall": float, "zeros": int, "total": int,
        "per_block": [{"block": int, "zero_share": float, "zeros": int, "total": int}, ...]}``
        with blocks in ascending order (names without a block index count only in the overall).
    """
    zeros_by_block: dict[int, list[int]] = {}
    zeros_all = total_all = 0
    for name in names:
        weight = model.get_submodule(name).weight
        zeros, total = int((weight == 0).sum().item()), weight.numel()
        zeros_all += zeros
        total_all += total
        block = block_index(name)
        if block is not None:
            counts = zeros_by_block.setdefault(block, [0, 0])
            counts[0] += zeros
            counts[1] += total
    return {
        "overall": zeros_all / total_all if total_all else 0.0,
        "zeros": zeros_all,
        "total": total_all,
        "per_block": [
            {"block": b, "zero_share": z / t if t else 0.0, "zeros": z, "total": t}
            for b, (z, t) in sorted(zeros_by_block.items())
        ],
    }
