"""Wanda's score (Sun et al. 2023, arXiv 2306.11695, Eq. 1): ``|W[i, j]| * ||X_j||_2 / sqrt(N)``.

``sqrt(row_sq)`` is the input-channel activation norm gathered by the layer walk
(:mod:`gblm.calibration.stats`). The same product is GBLM-Pruner's first term.
"""

from __future__ import annotations

import torch
from torch import Tensor


def activation_term(weight: Tensor, row_sq_norms: Tensor) -> Tensor:
    """``|W| * sqrt(row_sq)`` in fp32, shape (d_out, d_in): Wanda's score, GBLM-Pruner's first term.

    An fp16 or bf16 weight is widened (exactly) before the product, as type promotion would.
    """
    norms = row_sq_norms.to(device=weight.device, dtype=torch.float32).sqrt()  # (d_in,)
    # abs() makes a fresh tensor (so does float() of a narrower one): the in-place product is safe
    return weight.abs().float().mul_(norms.reshape(1, -1))  # (d_out, d_in) * (1, d_in)
