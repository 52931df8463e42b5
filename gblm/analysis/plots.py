"""Mask images (the share pruned per pixel of a Linear's mask, as a PNG), and :func:`pyplot`, the
one place matplotlib is imported (lazily, on the Agg backend)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from gblm.errors import ConfigError
from gblm.utils import atomic_write

MAX_IMAGE_PIXELS = 512  # mask images are block-averaged down to at most this many pixels a side


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: plotting is optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def downsample_mask(mask: Tensor, max_pixels: int = MAX_IMAGE_PIXELS) -> Tensor:
    """Share pruned in blocks of ``(ceil(d_out / max_pixels), ceil(d_in / max_pixels))``, float
    ``(rows, cols)``; edge blocks average only the entries they cover. Counted from the boolean
    mask: a 70B-model matrix needs no float copy."""
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


def save_mask_images(
    masks: Mapping[str, Tensor], names: Iterable[str], out_dir: str | os.PathLike
) -> list[Path]:
    """A PNG of each named mask (file: the name, unsafe characters replaced), block-averaged
    (:func:`downsample_mask`) so stripes of pruned columns stay visible at any size."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for name in names:
        path = out_dir / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".png")
        _save_mask_image(plt, name, masks[name].detach().bool().cpu(), path)
        paths.append(path)
    return paths


def _save_mask_image(plt, name: str, mask: Tensor, path: Path) -> None:
    """One mask's image: share pruned per (block-averaged) pixel, axes in weight indices."""
    d_out, d_in = mask.shape
    image = downsample_mask(mask).numpy()
    sparsity = mask.sum().item() / max(1, mask.numel())
    # Large enough that a 512-pixel image is not resampled down.
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
    try:  # never a half-written picture (a full disk): through the atomic writer
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def check_mask_images(names: list[str], spec) -> None:
    """Every name in ``names`` (``mask_images``) is a prunable Linear of the model ``spec`` (a
    ``ModelSpec``), read from its config before any weight loads; else a ConfigError."""
    from gblm.models.layers import linear_names
    from gblm.models.loading import model_config

    linears = linear_names(model_config(spec), spec.trust_remote_code)
    unknown = [n for n in names if n not in linears]
    if unknown:
        raise ConfigError(
            f"mask_images: {unknown[0]!r} is not a prunable Linear of model={spec.name}; "
            f"its Linears are named {', '.join(linears[:2])}, ..., {linears[-1]} (mask_images=[] "
            "draws none)."
        )
