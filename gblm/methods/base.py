"""The method interface: a method declares the calibration work it needs and owns it.

The run and the layer walk call a method's stages, in this order:

1. :meth:`Pruner.check_target` before the model loads (an option that cannot apply to the
   run's target sparsity is refused), :meth:`Pruner.check_model` right after it loads;
2. :meth:`Pruner.prepare`, the method's own pass over the dense model, if it has one
   (GBLM-Pruner's gradient stage), named by :attr:`Pruner.dense_pass` for logs and timings;
3. the walk: per decoder block it gathers the statistics in :attr:`Pruner.stats` (names from
   :data:`gblm.calibration.stats.STATISTICS`) and calls :meth:`Pruner.prune_linear` for every
   Linear with that Linear's own target sparsity (:mod:`gblm.methods.plans`);
4. inside a score method's step, :meth:`Pruner.refine` may change a chosen mask before the
   weights are zeroed (a refinement such as DSnoT);
5. :meth:`Pruner.release` frees what :meth:`prepare` kept.

A new score method is one subclass of :class:`ScorePruner` with its ``score``, one
``conf/method/<name>.yaml`` (its ``_target_`` and options) and one test file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from torch import Tensor, nn

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

    def check_target(self, target: Sparsity) -> None:
        """Raise ``ValueError`` when an option cannot apply to the run's target (before loading)."""

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` when the method cannot prune ``model`` (before any heavy work)."""

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

    def describe(self) -> dict:
        """The method's settings, for logs and run records."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "stats"}


class ScorePruner(Pruner):
    """score -> select the mask in the comparison group -> refine -> zero."""

    def __init__(self, comparison_group: ComparisonGroup = "row") -> None:
        self.comparison_group = comparison_group

    @abstractmethod
    def score(self, name: str, weight: Tensor, stats: LinearStats) -> Tensor:
        """Importance of every entry of ``weight`` (d_out, d_in); low scores are pruned."""

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
