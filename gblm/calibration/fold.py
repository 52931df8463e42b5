"""GBLM-Pruner's fold: each sample's weight gradient into its accumulator, as published.

- ``l1``: ``G1 = sum_n |scale * g_n|``, accumulated in ``accumulator_dtype`` (published: fp16);
- ``l2``: ``G2 = sqrt(sum_n (scale * g_n)^2)``, accumulated in fp32, stored in ``accumulator_dtype``.

No division by N. :class:`Folder` folds from a post-accumulate-grad hook the moment autograd
completes a weight's gradient, then frees it: at most one weight gradient exists at a time.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from gblm.devices import dtype_name
from gblm.errors import NonFiniteError
from gblm.models.memory import file_backed_zeros

NORMS = ("l1", "l2")
ACCUMULATOR_DTYPES = {name: getattr(torch, name) for name in ("float16", "float32", "bfloat16")}


@dataclass(frozen=True)
class GradientSettings:
    """Every setting of the gradient stage (keys of ``method.*``, declared by
    :class:`gblm.methods.gblm.GBLMPruner`).

    Attributes:
        norm: ``l1`` (the paper's headline) or ``l2``.
        scale: The paper's alpha, applied to each gradient before the norm (published: 100).
        accumulator_dtype: dtype name of the l1 running sum and of the result (published:
            ``float16``); a ``torch.dtype`` is stored by name.
        blockwise: One decoder block on the compute device at a time, each recomputed in its
            backward (less memory; the same norms bit for bit).
        group_size: With ``blockwise``, the windows that go through the blocks together; no
            effect on the norms.
    """

    norm: str = "l1"
    scale: float = 100.0
    accumulator_dtype: str = "float16"
    blockwise: bool = False
    group_size: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "accumulator_dtype", dtype_name(self.accumulator_dtype))
        object.__setattr__(self, "scale", float(self.scale))  # 100 and 100.0: one cache key

    @property
    def torch_accumulator_dtype(self) -> torch.dtype:
        return ACCUMULATOR_DTYPES[self.accumulator_dtype]


class GradientError(NonFiniteError, RuntimeError):
    """A non-finite loss or gradient in the gradient stage."""


class Folder:
    """Folds each weight's per-sample gradient into its accumulator as backward produces it."""

    def __init__(
        self,
        blocks: list[dict[str, nn.Linear]],
        settings: GradientSettings,
        files: tuple[Path | None] | None,
    ) -> None:
        """Zero (d_out, d_in) accumulators on each weight's device (the CPU for an offloaded
        one); with ``files``, one file-backed mapping per block in ``files[0]``
        (:func:`gblm.models.memory.file_backed_zeros`)."""
        self.norm, self.scale = settings.norm, settings.scale
        # l2 sums squares in fp32 whatever the stored dtype (published: fp32, then sqrt -> fp16).
        dtype = settings.torch_accumulator_dtype if self.norm == "l1" else torch.float32
        self.accumulators: dict[str, Tensor] = {}
        for linears in blocks:
            if files is not None:
                specs = [(lin.weight.shape, dtype) for lin in linears.values()]
                self.accumulators.update(zip(linears, file_backed_zeros(specs, files[0])))
                continue
            for name, lin in linears.items():
                where = lin.weight.device
                if where.type == "meta":  # a weight accelerate offloads: its home is the host
                    where = torch.device("cpu")
                self.accumulators[name] = torch.zeros(lin.weight.shape, dtype=dtype, device=where)
        self.samples_seen = dict.fromkeys(self.accumulators, 0)
        # Per Linear per sample, the sum of the folded term: finite iff every entry was (barring
        # an overflow of the sum). Checked once per sample, so the hooks never synchronize.
        self.checks: list[tuple[str, Tensor]] = []

    @torch.no_grad()
    def fold(self, name: str, grad: Tensor) -> None:
        """Fold one sample's (d_out, d_in) weight gradient into ``name``'s accumulator, as
        published: to fp32, times scale, abs (l1) or square (l2), to the accumulator's dtype,
        add. An fp32 gradient is modified in place (its owner frees it)."""
        acc = self.accumulators[name]  # looked up per call: onloading moves it
        term = grad if grad.dtype == torch.float32 else grad.float()
        term.mul_(self.scale)
        term = term.abs_() if self.norm == "l1" else term.square_()
        self.checks.append((name, term.sum()))
        acc.add_(term.to(device=acc.device, dtype=acc.dtype))
        self.samples_seen[name] += 1

    @contextlib.contextmanager
    def hooks(self, linears: Mapping[str, nn.Linear]) -> Iterator[None]:
        """Each weight's gradient folded by a post-accumulate-grad hook, then freed."""

        def fold_grad(name: str, weight: Tensor) -> None:
            self.fold(name, weight.grad)
            weight.grad = None

        with contextlib.ExitStack() as stack:
            for name, lin in linears.items():
                hook = functools.partial(fold_grad, name)
                stack.callback(lin.weight.register_post_accumulate_grad_hook(hook).remove)
            yield

    @contextlib.contextmanager
    def on(self, names: list[str], device: torch.device) -> Iterator[None]:
        """Within, the accumulators of ``names`` on ``device``; copied back into their home
        tensors afterwards."""
        homes = {name: self.accumulators[name] for name in names}
        self.accumulators.update({name: acc.to(device) for name, acc in homes.items()})
        try:
            yield
        finally:
            for name, home in homes.items():
                if self.accumulators[name] is not home:
                    home.copy_(self.accumulators[name])
                    self.accumulators[name] = home

    def check_sample(self, sample: int) -> None:
        """Raise :class:`GradientError` naming the Linears whose gradient was not finite in
        ``sample`` since the previous check."""
        if not self.checks:
            return
        names = [name for name, _ in self.checks]
        device = self.checks[0][1].device
        finite = torch.isfinite(torch.stack([v.to(device) for _, v in self.checks]))
        self.checks = []
        if bool(finite.all()):
            return
        bad = list(dict.fromkeys(n for n, ok in zip(names, finite.tolist()) if not ok))
        more = f" (and {len(bad) - 1} more Linears)" if len(bad) > 1 else ""
        raise GradientError(
            f"non-finite gradient in {bad[0]} (sample {sample}){more}: the loss was finite, so "
            "the backward pass overflowed or produced NaN. With an fp16 model, load it in "
            "bfloat16 or float32 for the gradient stage."
        )

    def finish(self, dtype: torch.dtype) -> dict[str, Tensor]:
        if self.norm == "l2":
            return {n: acc.sqrt_().to(dtype) for n, acc in self.accumulators.items()}
        return self.accumulators
