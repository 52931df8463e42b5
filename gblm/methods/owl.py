"""OWL, outlier-weighed layer-wise sparsity (Yin et al., ICML 2024): a ratio per decoder block.

1. On the dense model (the walk with nothing pruned), block b's outlier ratio is
   ``r_b = 100 * #{A > M * mean(A)} / numel`` over the Wanda scores ``A`` of all its Linears,
   whatever method prunes afterwards (published).
2. ``n_b = (r_b - min r) / (max r - min r) * 2 * Lambda``, ``s_b = s - (n_b - mean n)``: blocks
   with more outliers are pruned less. A ratio ``<= 0`` becomes 0.01 where the published code
   does that (not on its magnitude path).
3. N:M: ``n_b`` spans ``Lambda``, block b is pruned ``(N - round(n_b - mean n)):M`` (half to
   even, as NumPy rounds).

Where every block has the same outlier ratio (0 / 0; the published code crashes) every block gets
the target: our choice.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from torch import Tensor, nn

from gblm.calibration.stats import LinearStats
from gblm.methods.base import Pruner, RunContext, require
from gblm.methods.plans import SparsityPlan
from gblm.methods.wanda import activation_term
from gblm.names import block_index
from gblm.options import Range
from gblm.pruning.sparsity import Sparsity

CLAMPED_RATIO = 0.01  #: the published floor of a block ratio driven to zero or below


def outlier_ratio(scores: list[Tensor], outlier_m: float) -> float:
    """Percentage of entries above ``outlier_m`` times the mean, over all ``scores`` together."""
    flat = torch.cat([s.flatten() for s in scores])
    threshold = torch.mean(flat) * outlier_m
    return float((flat > threshold).sum().item()) / flat.numel() * 100


def _spread(ratios: list[float], width: float) -> np.ndarray | None:
    """``(r - min r) / (max r - min r) * width`` minus its mean; None when all r are equal."""
    r = np.asarray(ratios, dtype=np.float64)
    if r.max() == r.min():
        return None
    n = (r - r.min()) * (1 / (r.max() - r.min()) * width)
    return n - np.mean(n)


def owl_block_ratios(
    ratios: list[float], sparsity: float, lmbda: float, clamp: bool = True
) -> list[float]:
    """Unstructured OWL: one sparsity per block from the outlier ratios ``r_b`` (percent)."""
    shift = _spread(ratios, lmbda * 2)
    if shift is None:
        return [sparsity] * len(ratios)
    density = shift + (1 - sparsity)  # the published code works with the kept share
    targets = [float(1 - d) for d in density]
    return [CLAMPED_RATIO if clamp and t <= 0 else t for t in targets]


def owl_block_n(ratios: list[float], n: int, lmbda: float) -> list[int]:
    """N:M OWL: the N of every block, ``N - round(n_b - mean n)`` with ``n_b`` spanning Lambda."""
    shift = _spread(ratios, lmbda)
    if shift is None:
        return [n] * len(ratios)
    return [int(v) for v in n - np.round(shift)]


class _OutlierProbe(Pruner):
    """Prunes nothing: turns each block's Wanda scores into its outlier ratio."""

    stats = frozenset({"row_sq"})

    def __init__(self, outlier_m: float) -> None:
        self.outlier_m = outlier_m
        self.ratios: list[float] = []
        self._block: int | None = None
        self._scores: list[Tensor] = []

    def prune_linear(
        self, name: str, linear: nn.Linear, stats: LinearStats, target: Sparsity
    ) -> Tensor:
        block = block_index(name)
        if block != self._block:
            self.finish_block()
            self._block = block
        score = activation_term(linear.weight.data, require(stats, "row_sq_norms", "OWL"))
        self._scores.append(score.flatten().cpu())
        return torch.zeros(0, dtype=torch.bool)  # nothing pruned; no full-size mask kept

    def finish_block(self) -> None:
        if self._scores:
            self.ratios.append(outlier_ratio(self._scores, self.outlier_m))
        self._scores = []


class OWLPlan(SparsityPlan):
    """``sparsity=owl``: one target per block from the dense model's outlier ratios; ``clamp``
    (ratios <= 0 become 0.01) is None for the published choice: on unless the method is
    magnitude."""

    needs_calibration = True
    dense_pass = "outlier ratios"
    label = "owl"

    def __init__(
        self,
        sparsity: Sparsity,
        lmbda: Annotated[float, Range(ge=0)] = 0.08,
        outlier_m: Annotated[float, Range(gt=0)] = 5.0,
        clamp: bool | None = None,
    ) -> None:
        super().__init__(sparsity)
        self.lmbda = lmbda
        self.outlier_m = outlier_m
        self.clamp = clamp
        self.outlier_ratios: list[float] | None = None

    def check_config(self, blocks: int | None, method_calibrates: bool) -> None:
        """Refuse, before the load, a Lambda that takes the target +- Lambda (N +- Lambda / 2)
        outside what can be pruned (below zero is fine with the clamp); the exact check is
        :meth:`set_outlier_ratios`'s."""
        super().check_config(blocks, method_calibrates)
        s, lmbda = self.sparsity, self.lmbda
        if s.structured:
            reach = int(np.round(lmbda / 2))
            if s.n - reach > 0 and s.n + reach < s.m:
                return
            raise ValueError(
                f"sparsity.lmbda={lmbda} with N:M {s.label}: OWL's N would span "
                f"{s.n - reach}..{s.n + reach} of {s.m}; allowed: Lambda with every N in "
                f"1..{s.m - 1} (sparsity.lmbda < {2 * min(s.n, s.m - s.n) - 1})."
            )
        clamp = method_calibrates if self.clamp is None else self.clamp
        low, high = s.ratio - lmbda, s.ratio + lmbda
        if high < 1 and (low >= 0 or clamp):
            return
        bound = 1 - s.ratio if clamp else min(s.ratio, 1 - s.ratio)
        raise ValueError(
            f"sparsity.lmbda={lmbda} with sparsity.ratio={s.ratio}: OWL's block ratios span "
            f"2 * Lambda around the target, [{low:g}, {high:g}] here; allowed: sparsity.lmbda < "
            f"{bound:g}" + ("" if clamp else " (or sparsity.clamp=true for ratios below 0)") + "."
        )

    def prepare(self, model: nn.Module, windows: Tensor | None, context: RunContext) -> None:
        """The dense walk: every block's outlier ratio, then every block's target."""
        from gblm.calibration.sequential import prune_model

        if windows is None:
            raise ValueError("OWL's outlier ratios need calibration windows.")
        if self.clamp is None:
            self.clamp = context.method_calibrates
        probe = _OutlierProbe(self.outlier_m)
        prune_model(model, probe, self.sparsity, windows, device=context.device,
                    batch_size=context.batch_size, progress=False)  # fmt: skip
        probe.finish_block()
        self.set_outlier_ratios(probe.ratios)

    def set_outlier_ratios(self, ratios: list[float]) -> None:
        """The targets from the outlier ratios (percent, one per block)."""
        self.outlier_ratios = list(ratios)
        s = self.sparsity
        if s.structured:
            counts = owl_block_n(ratios, s.n, self.lmbda)
            self.targets = [self._target(b, n / s.m, n, s.m) for b, n in enumerate(counts)]
        else:
            clamp = True if self.clamp is None else self.clamp
            ratios_b = owl_block_ratios(ratios, s.ratio, self.lmbda, clamp)
            self.targets = [self._target(b, r) for b, r in enumerate(ratios_b)]

    def _target(self, block: int, ratio: float, n: int = 0, m: int = 0) -> Sparsity:
        try:
            return Sparsity(ratio, n, m)
        except ValueError as err:
            what = f"{n}:{m}" if m else f"the ratio {ratio:.4f}"
            raise ValueError(
                f"OWL gives block {block} {what}, which cannot be pruned ({err}); lower "
                "sparsity.lmbda (or set sparsity.clamp=true for ratios below zero)."
            ) from None

    def target(self, block: int, name: str) -> Sparsity:
        if self.targets is None:
            raise ValueError("OWL's targets come from the dense model: run prepare first.")
        return self.targets[block]

    def record(self) -> dict:
        if self.outlier_ratios is None:
            return super().record()
        return {**super().record(), "outlier_ratios": self.outlier_ratios}
