"""The post-pruning sparsity check: the share of exact zeros in a model's pruned Linears."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from gblm.models.offload import offloaded_tensors
from gblm.names import block_index


@torch.no_grad()
def weight_zero_share(model: nn.Module, names: Iterable[str]) -> dict:
    """The share of exact zeros in the named Linears' weights (not their masks, so it also
    catches a method that failed to zero the weights), per block and overall; a weight that
    accelerate offloads (a device map) is read from where its hook keeps it.

    Returns:
        ``{"overall", "zeros", "total", "per_block": [{"block", "zero_share", "zeros",
        "total"}, ...]}``, blocks ascending (names without a block count only in the overall).
    """
    counts: dict[int | None, list[int]] = defaultdict(lambda: [0, 0])
    stored = {id(e.current()): e for e in offloaded_tensors(model)}  # a device map's meta weights
    for name in names:
        weight = model.get_submodule(name).weight
        if id(weight) in stored:
            weight = stored[id(weight)].read()
        zeros = int((weight == 0).sum().item())
        for key in {None, block_index(name)}:
            counts[key][0] += zeros
            counts[key][1] += weight.numel()
    zeros, total = counts[None]
    return {
        "overall": zeros / total if total else 0.0,
        "zeros": zeros,
        "total": total,
        "per_block": [
            {"block": b, "zero_share": z / t if t else 0.0, "zeros": z, "total": t}
            for b, (z, t) in sorted((b, c) for b, c in counts.items() if b is not None)
        ],
    }
