"""Sparsity plans: what each Linear must reach. Uniform by default.

The walk asks the plan for every Linear's target (:meth:`SparsityPlan.target`), so sparsity can
differ per block and per Linear. A plan that depends on the dense model (a layer-wise allocator
such as OWL) computes its targets in :meth:`SparsityPlan.prepare`, before the walk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from torch import Tensor, nn

from gblm.methods.base import RunContext
from gblm.models.layers import decoder_layers
from gblm.pruning.sparsity import Sparsity


class SparsityPlan(ABC):
    """The target sparsity of every prunable Linear."""

    #: True when :meth:`prepare` runs the dense model on the calibration windows.
    needs_calibration: bool = False
    #: Name of that pass (a stage of the run), or None when there is none.
    dense_pass: str | None = None

    def prepare(self, model: nn.Module, windows: Tensor | None, context: RunContext) -> None:
        """Compute the targets from the dense model, before the walk (nothing by default)."""

    @abstractmethod
    def target(self, block: int, name: str) -> Sparsity:
        """The target of Linear ``name`` (its name inside the block, e.g. ``self_attn.q_proj``)."""

    def block_targets(self) -> list[float] | None:
        """One target ratio per block when they differ, for the run record; None when uniform."""
        return None


class UniformPlan(SparsityPlan):
    """Every Linear gets the same target."""

    def __init__(self, sparsity: Sparsity) -> None:
        self.sparsity = sparsity

    def target(self, block: int, name: str) -> Sparsity:
        return self.sparsity


class PerBlockPlan(SparsityPlan):
    """A given unstructured ratio per decoder block (``sparsity.per_block=[...]``)."""

    def __init__(self, ratios: Sequence[float]) -> None:
        self.targets = [Sparsity(float(r)) for r in ratios]

    def prepare(self, model: nn.Module, windows: Tensor | None, context: RunContext) -> None:
        self.check_blocks(len(decoder_layers(model)))

    def check_blocks(self, count: int) -> None:
        """Raise ValueError unless there is one ratio per decoder block."""
        if len(self.targets) != count:
            raise ValueError(
                f"sparsity.per_block has {len(self.targets)} ratios, but the model has {count} "
                "decoder blocks: give one ratio per block."
            )

    def target(self, block: int, name: str) -> Sparsity:
        return self.targets[block]

    def block_targets(self) -> list[float]:
        return [t.ratio for t in self.targets]


def as_plan(plan: SparsityPlan | Sparsity) -> SparsityPlan:
    """A plan from a plan or a single target (uniform)."""
    return plan if isinstance(plan, SparsityPlan) else UniformPlan(plan)
