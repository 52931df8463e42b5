"""The method interface: a method declares the calibration work it needs and owns it.

The run and the layer walk call a method's stages, in this order:

1. :meth:`Pruner.check_target` before the model loads;
2. :meth:`Pruner.prepare`, the method's own pass over the dense model (GBLM-Pruner's gradient
   stage), named by :attr:`Pruner.dense_pass`;
3. the walk: per decoder block it gathers :attr:`Pruner.stats` (names from
   :data:`gblm.calibration.stats.STATISTICS`) and calls :meth:`Pruner.prune_linear` for every
   Linear with its own target (:mod:`gblm.methods.plans`);
4. inside a score method's step, :meth:`Pruner.refine` may change the mask (DSnoT);
5. the weight update (:attr:`Pruner.update`, a :class:`WeightUpdate` of ``conf/reconstruct/``),
   if any, changes the Linear's kept weights, its mask held fixed;
6. :meth:`Pruner.release` frees what :meth:`prepare` kept.

A new score method is one subclass of :class:`ScorePruner` with its ``score`` (or, for a score
of single weights, its ``column_score``), one ``conf/method/<name>.yaml`` and one test file.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from torch import Tensor, nn

from gblm import devices
from gblm.calibration.stats import LinearStats
from gblm.options import OneOf
from gblm.pruning.masks import COMPARISON_GROUPS, select_mask, zero_masked_
from gblm.pruning.sparsity import Sparsity

#: The option ``comparison_group`` of the score methods: where a mask's pruned share is counted.
ComparisonGroup = Annotated[str, OneOf(COMPARISON_GROUPS)]


@dataclass(frozen=True)
class RunContext:
    """What a method's dense-model pass may need to know about the run."""

    device: torch.device  # the compute device
    model_dtype: torch.dtype
    model_id: str | None = None  # names the model in cache keys; None: no cache
    cache_dir: Path | None = None  # where passes may cache their results; None: no cache
    progress: bool = True
    onload: bool = False  # weights live on the CPU: dense passes move one block at a time
    batch_size: int | str = "auto"  # windows per forward call of the walk (auto: one)
    # with onload: where file-backed host tensors go (GBLM's accumulators); None: the temp folder
    scratch_dir: Path | None = None
    # the content hash of the model's weights files, computed only when a pass asks for it
    fingerprint: Callable[[], str] | None = None
    # whether the method itself calibrates (OWL's published clamp is off for magnitude only)
    method_calibrates: bool = True

    def model_key(self) -> str | None:
        """What identifies the model's weights in cache keys: their content when known."""
        if self.model_id is None:
            return None
        return self.fingerprint() if self.fingerprint is not None else self.model_id


class Pruner(ABC):
    """Prunes one Linear in place and returns its mask (True = pruned)."""

    #: Per-Linear statistics the walk must gather (names from ``STATISTICS``); may be set per
    #: instance when the options decide it.
    stats: frozenset[str] = frozenset()
    #: False: no calibration data and no forward passes at all (magnitude).
    needs_calibration: bool = True
    #: SparseGPT's option: prune a block group by group, recalibrating after each.
    true_sequential: bool = False
    #: Name of the method's dense-model pass (a stage of the run), or None when it has none.
    dense_pass: str | None = None
    #: The method's name in tables where it is not the registry's (DSnoT: ``dsnot(wanda)``).
    label: str | None = None
    #: True: the method updates the kept weights itself (SparseGPT); no weight update composes.
    updates_weights: bool = False
    #: The weight update after each Linear's mask (``reconstruct=...``); None: none.
    update: WeightUpdate | None = None
    #: True: the score is a function of each weight and fixed per-entry statistics, so a weight
    #: update may re-choose the mask on updated columns (:meth:`column_score`).
    elementwise_score: bool = False

    def with_update(self, update: WeightUpdate | None) -> Pruner:
        """This method with ``update`` after every mask; ValueError where it cannot compose."""
        if update is not None and self.updates_weights:
            raise ValueError(
                f"it updates the kept weights itself; reconstruct={update.name} cannot follow "
                "it (allowed: reconstruct=none)."
            )
        if update is not None and update.rechooses_mask and not self.elementwise_score:
            raise ValueError(
                f"reconstruct={update.name} with iterative=true re-chooses the mask with the "
                "method's score of single weights, which this method has not (allowed: "
                "reconstruct.iterative=false, or method=magnitude, wanda or gblm)."
            )
        self.update = update
        return self

    @property
    def walk_stats(self) -> frozenset[str]:
        """The statistics the walk gathers: the method's and its update's."""
        return frozenset(self.stats) | (self.update.stats if self.update else frozenset())

    @property
    def walk_calibrates(self) -> bool:
        """Whether the walk runs the calibration windows (a weight update needs them too)."""
        return self.needs_calibration or self.update is not None

    def check_target(self, target: Sparsity) -> None:
        """Raise ``ValueError`` when the method, or an option, cannot apply to the run's ``target``
        (before the model loads; every target is fine by default)."""

    def prepare(self, model: nn.Module, windows: Tensor | None, context: RunContext) -> None:
        """The method's pass over the dense model, before the walk (none by default)."""

    def dense_pass_cached(self, windows: Tensor | None, context: RunContext) -> bool:
        """Whether :meth:`prepare` will find its result in the cache (no pass: the run's time
        estimate weighs it as nothing). False by default."""
        return False

    def release(self) -> None:
        """Free what :meth:`prepare` kept, after the walk."""

    @abstractmethod
    def prune_linear(
        self, name: str, linear: nn.Linear, stats: LinearStats, target: Sparsity
    ) -> Tensor:
        """Prune ``linear`` (full name ``name``) in place to ``target``; return its mask."""

    def refine(
        self, name: str, linear: nn.Linear, stats: LinearStats, mask: Tensor, target: Sparsity
    ) -> Tensor:
        """Change a chosen mask before it is applied (no refinement by default)."""
        return mask

    def column_score(
        self, name: str, stats: LinearStats, weight_cols: Tensor, start: int, end: int | None
    ) -> Tensor:
        """The score of columns ``start:end`` (None: to the last) of ``name`` from their current
        values ``weight_cols`` (d_out, end - start); only where :attr:`elementwise_score`."""
        raise NotImplementedError(f"{type(self).__name__} has no score of single weights.")


class WeightUpdate(ABC):
    """Changes a pruned Linear's kept weights to lower its output error on the calibration
    inputs (a plug-in of ``conf/reconstruct/``); the walk calls :meth:`apply` after each mask."""

    #: The registry's name (``conf/reconstruct/<name>.yaml``), for labels: ``gblm+obs``.
    name: str = ""
    #: Per-Linear statistics the walk must gather for it (names from ``STATISTICS``).
    stats: frozenset[str] = frozenset()
    #: True: the update chooses the mask anew with the method's :meth:`Pruner.column_score`.
    rechooses_mask: bool = False
    #: Seconds spent in :meth:`apply` so far (within the walk's ``prune`` stage).
    seconds: float = 0.0

    @abstractmethod
    def solve(
        self, dense: Tensor, mask: Tensor, stats: LinearStats, target: Sparsity, score: Callable
    ) -> tuple[Tensor, Tensor]:
        """The updated weight (dense's dtype) and the final mask, from the dense weight
        (d_out, d_in) and the method's mask (True = pruned) for ``target``; ``score(W_cols,
        start, end)`` is the method's score of columns (where :attr:`rechooses_mask`)."""

    @torch.no_grad()
    def apply(
        self,
        linear: nn.Linear,
        dense: Tensor,
        mask: Tensor,
        stats: LinearStats,
        target: Sparsity,
        score: Callable,
    ) -> Tensor:
        """Write the updated weights into ``linear`` (pruned from ``dense`` to ``mask``); return
        the mask. The time it takes adds to :attr:`seconds`."""
        began = time.perf_counter()
        weight, mask = self.solve(dense, mask, stats, target, score)
        linear.weight.data.copy_(weight)
        devices.synchronize(weight.device)
        self.seconds += time.perf_counter() - began
        return mask

    def describe(self) -> dict:
        """The update's settings, for the run record."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "seconds"}


class ScorePruner(Pruner):
    """score -> select the mask in the comparison group -> refine -> zero."""

    def __init__(self, comparison_group: ComparisonGroup = "row") -> None:
        self.comparison_group = comparison_group

    def score(self, name: str, weight: Tensor, stats: LinearStats) -> Tensor:
        """Importance of every entry of ``weight`` (d_out, d_in); low scores are pruned."""
        return self.column_score(name, stats, weight, 0, None)

    def select(self, score: Tensor, target: Sparsity) -> Tensor:
        return select_mask(score, target.ratio, target.n, target.m, self.comparison_group)

    @torch.no_grad()
    def prune_linear(
        self, name: str, linear: nn.Linear, stats: LinearStats, target: Sparsity
    ) -> Tensor:
        weight = linear.weight.data
        mask = self.select(self.score(name, weight, stats), target)
        mask = self.refine(name, linear, stats, mask, target)
        zero_masked_(weight, mask)
        return mask


def require(stats: LinearStats, field: str, method: str) -> Tensor:
    """``stats.<field>``, or a ValueError saying the walk did not gather it for ``method``."""
    value = getattr(stats, field)
    if value is None:
        raise ValueError(f"{method} needs the statistic {field} from the layer walk.")
    return value
