"""The post-pruning sparsity check: the share of exact zeros in a model's pruned Linears."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gblm.names import block_index


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
