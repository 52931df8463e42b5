"""Calibration windows in batches only where a batch computes each window's numbers exactly.

A forward or backward pass over b windows at once fills the matmuls better than b passes of one
window (on a 2-core CPU a (256 x 576) @ (576 x 576) product runs at half the rate of a
(2048 x 576) one), and every operation of a decoder acts on each window's rows alone. But a BLAS
library chooses its kernels, its blocking and how it splits a product between threads by the
product's shape, and for some shapes the split changes the order in which a row's dot products
are summed: the same rows then come out different in the last bits (seen on this project's CPU
for 8-128 rows of width 576 -> 1536 with two threads, never at 256 rows or more).

:func:`batch_is_exact` asks the machine: for every distinct Linear shape of the pass it runs the
products a batch needs, once batched and once window by window (the weight gradient through
autograd, as a batch of one gets it), on seeded random numbers, and compares the bits. The
kernel path depends on the shapes, the dtype, the device and the thread count, not on the
values, and random operands make any difference in summation order show in almost every entry,
so bit-equal results on them mean the same kernels. ``batch_size=auto`` batches only when the
probe says so; with it the walk's masks and GBLM-Pruner's gradient norms are those of a batch of
one, bit for bit (tests/test_batching.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gblm.devices import calibration_batch

logger = logging.getLogger("gblm.batching")


def _one_by_one(x: Tensor, op: Callable[[Tensor], Tensor]) -> Tensor:
    return torch.cat([op(x[i : i + 1]) for i in range(x.shape[0])])


def _linear_is_exact(
    d_in: int, d_out: int, dtype: torch.dtype, device: torch.device, batch: int, seqlen: int,
    backward: bool,
) -> bool:  # fmt: skip
    gen = torch.Generator().manual_seed(d_in * 131 + d_out)
    x = torch.randn(batch, seqlen, d_in, generator=gen).to(device, dtype)  # (b, T, d_in)
    w = torch.randn(d_out, d_in, generator=gen).to(device, dtype)  # (d_out, d_in)
    if not torch.equal(F.linear(x, w), _one_by_one(x, lambda xi: F.linear(xi, w))):
        return False
    if not backward:
        return True
    g = torch.randn(batch, seqlen, d_out, generator=gen).to(device, dtype)  # (b, T, d_out)
    if not torch.equal(g @ w, _one_by_one(g, lambda gi: gi @ w)):  # the input gradient
        return False
    batched = torch.bmm(g.transpose(1, 2), x)  # (b, d_out, d_in): the per-sample fold's product
    leaf = w.detach().requires_grad_()
    with torch.enable_grad():
        for i in range(batch):  # autograd's weight gradient for a batch of one
            leaf.grad = None
            F.linear(x[i : i + 1], leaf).backward(g[i : i + 1])
            if not torch.equal(leaf.grad, batched[i]):
                return False
    return True


@torch.no_grad()
def batch_is_exact(
    linears: Iterable[nn.Linear],
    batch: int,
    seqlen: int,
    device: torch.device,
    *,
    backward: bool = False,
) -> bool:
    """Whether ``batch`` windows of ``seqlen`` tokens per call on ``device`` give, for every
    Linear shape in ``linears``, the bits that windows one at a time give: the forward product,
    and with ``backward`` the input gradient and the per-sample weight gradient too.

    Costs the products of one batch per distinct shape (with ``backward``, three times that).
    """
    if batch <= 1:
        return True
    shapes = {(lin.in_features, lin.out_features, lin.weight.dtype) for lin in linears}
    for d_in, d_out, dtype in sorted(shapes, key=str):
        if not _linear_is_exact(d_in, d_out, dtype, device, batch, seqlen, backward):
            logger.info(
                "a batch of %d windows of %d tokens changes the bits of a %d -> %d %s product "
                "here: windows go one at a time",
                batch, seqlen, d_in, d_out, str(dtype).removeprefix("torch."),
            )  # fmt: skip
            return False
    return True


def exact_batch(
    batch_size: int | str,
    nsamples: int,
    seqlen: int,
    device: torch.device,
    linears: Iterable[nn.Linear],
    *,
    backward: bool = False,
    limit: int | None = None,
) -> int:
    """Windows per call for a pass over ``nsamples`` windows: an integer ``batch_size`` as given;
    ``auto`` (:func:`gblm.devices.calibration_batch`, at most ``limit``) only where
    :func:`batch_is_exact` holds for the full batches and for the last, shorter one; else 1."""
    batch = min(calibration_batch(batch_size, device, seqlen), nsamples)
    if batch_size != "auto" or batch <= 1:
        return batch
    batch = min(batch, limit or batch)
    linears = list(linears)
    sizes = {batch, nsamples % batch} - {0, 1}
    if all(batch_is_exact(linears, size, seqlen, device, backward=backward) for size in sizes):
        return batch
    return 1
