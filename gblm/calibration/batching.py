"""The layer walk's calibration windows in batches, only where a batch computes each window's
numbers exactly.

A forward or backward pass over b windows at once fills the matmuls better than b passes of one
window (on a 2-core CPU a (256 x 576) @ (576 x 576) product runs at half the rate of a
(2048 x 576) one), and every operation of a decoder acts on each window's rows alone. But a BLAS
library chooses its kernels, its blocking and how it splits a product between threads by the
product's shape, and for some shapes the split changes the order in which a row's dot products
are summed: the same rows then come out different in the last bits (seen on this project's CPU
for 8-128 rows of width 576 -> 1536 with two threads, never at 256 rows or more).

:func:`batch_is_exact` asks the machine: for every distinct Linear shape of the pass it runs the
forward product once batched and once window by window, on seeded random numbers, and compares
the bits. The kernel path depends on the shapes, the dtype, the device and the thread count, not
on the values, and random operands make any difference in summation order show in almost every
entry, so bit-equal results on them mean the same kernels. ``batch_size=auto`` batches only when
the probe says so; with it the walk's masks are those of a batch of one, bit for bit
(tests/test_batching.py). GBLM's gradient stage always takes one window at a time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import platform
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gblm.devices import calibration_batch, dtype_name
from gblm.paths import cache_dir
from gblm.utils import atomic_write_text, content_hash

logger = logging.getLogger("gblm.batching")


def _windows_alone(x: Tensor, op: Callable[[Tensor], Tensor], batched: Tensor) -> bool:
    """Whether ``op`` on the first and on the last window alone gives their rows of ``batched``.

    Two windows suffice: the kernel path is chosen once for the batched product, so a summation
    order that differs from a window's own shows in every window's rows.
    """
    last = x.shape[0] - 1
    return all(torch.equal(op(x[i : i + 1]), batched[i : i + 1]) for i in (0, last))


def _linear_is_exact(
    d_in: int, d_out: int, dtype: torch.dtype, device: torch.device, batch: int, seqlen: int
) -> bool:
    gen = torch.Generator().manual_seed(d_in * 131 + d_out)
    x = torch.randn(batch, seqlen, d_in, generator=gen).to(device, dtype)  # (b, T, d_in)
    w = torch.randn(d_out, d_in, generator=gen).to(device, dtype)  # (d_out, d_in)
    return _windows_alone(x, lambda xi: F.linear(xi, w), F.linear(x, w))


_verdicts: dict[str, bool] = {}  # this process's probes, by key


@functools.cache
def _software_and_cpu() -> dict:
    """The torch build and the CPU, read once per process."""
    cpu = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((ln for ln in info.splitlines() if ln.startswith("model name")), "")
        cpu += next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    except OSError:
        cpu = platform.processor()
    return {
        "torch": torch.__version__,
        "config": content_hash(torch.__config__.show()),
        "cpu": content_hash(cpu + platform.machine()),
    }


def _machine() -> dict:
    """What the kernel choice depends on besides the shapes: software, threads, CPU."""
    return {**_software_and_cpu(), "threads": torch.get_num_threads()}


def _probe(shape: tuple[int, int, torch.dtype], batch: int, seqlen: int,
           device: torch.device) -> bool:  # fmt: skip
    """One shape's verdict, remembered in this process and, for the CPU, on disk (the cache
    dir's ``batch_probes/``), keyed by everything the kernel choice depends on."""
    d_in, d_out, dtype = shape
    key_fields = {"shape": [d_in, d_out, dtype_name(dtype)], "check": "forward", "batch": batch,
                  "seqlen": seqlen, "device": str(device), **_machine()}  # fmt: skip
    key = content_hash(key_fields, length=24)
    if key in _verdicts:
        return _verdicts[key]
    path = cache_dir() / "batch_probes" / f"{key}.json"
    verdict = None
    if device.type == "cpu" and path.exists():
        with contextlib.suppress(OSError, ValueError, KeyError):
            verdict = bool(json.loads(path.read_text())["exact"])
    if verdict is None:
        verdict = _linear_is_exact(d_in, d_out, dtype, device, batch, seqlen)
        if device.type == "cpu":
            with contextlib.suppress(OSError):  # a cache that cannot be written costs a probe
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps({**key_fields, "exact": verdict}) + "\n")
    _verdicts[key] = verdict
    return verdict


@torch.no_grad()
def batch_is_exact(
    linears: Iterable[nn.Linear], batch: int, seqlen: int, device: torch.device
) -> bool:
    """Whether ``batch`` windows of ``seqlen`` tokens per call on ``device`` give, for every
    Linear shape in ``linears``, the forward products that windows one at a time give.

    Costs the products of one batch per distinct shape, and two windows alone; verdicts are
    remembered (:func:`_probe`).
    """
    if batch <= 1:
        return True  # one window's products are its own
    shapes = {(lin.in_features, lin.out_features, lin.weight.dtype) for lin in linears}
    for shape in sorted(shapes, key=str):
        if not _probe(shape, batch, seqlen, torch.device(device)):
            d_in, d_out, dtype = shape
            logger.info(
                "a batch of %d windows of %d tokens changes the bits of a %d -> %d %s product "
                "here: windows go one at a time",
                batch, seqlen, d_in, d_out, dtype_name(dtype),
            )  # fmt: skip
            return False
    return True


def exact_batch(
    batch_size: int | str,
    nsamples: int,
    seqlen: int,
    device: torch.device,
    linears: Iterable[nn.Linear],
) -> int:
    """Windows per call for a pass over ``nsamples`` windows: an integer ``batch_size`` as given;
    ``auto`` (:func:`gblm.devices.calibration_batch`) only where :func:`batch_is_exact` holds for
    the full batches and for the last, shorter one; else 1."""
    batch = min(calibration_batch(batch_size, device, seqlen), nsamples)
    if batch_size != "auto" or batch <= 1:
        return batch
    linears = list(linears)
    sizes = {batch, nsamples % batch} - {0, 1}
    if all(batch_is_exact(linears, size, seqlen, device) for size in sizes):
        return batch
    return 1
