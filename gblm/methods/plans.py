"""Sparsity plans: the target of every Linear, uniform by default.

A plan is a plug-in like a method: one class, one ``conf/sparsity/<name>.yaml`` (``allocator:
<name>`` and ``_target_``), one test; its options are the class's keyword arguments after the
target ``sparsity``. :class:`SparsityPlan` is all the run may ask of a plan.
"""

from __future__ import annotations

from typing import Annotated, Any

from torch import Tensor, nn

from gblm.methods.base import RunContext
from gblm.options import Range
from gblm.pruning.sparsity import Sparsity


class SparsityPlan:
    """``sparsity`` everywhere, unless a subclass fills :attr:`targets` (one per decoder block),
    at construction or in :meth:`prepare`."""

    #: True when :meth:`prepare` runs the dense model on the calibration windows.
    needs_calibration: bool = False
    #: Name of that pass (a stage of the run), or None when there is none.
    dense_pass: str | None = None
    #: Appended to the method's label in tables (``wanda+owl``); None for the uniform plan.
    label: str | None = None

    def __init__(self, sparsity: Sparsity) -> None:
        self.sparsity = sparsity
        self.targets: list[Sparsity] | None = None  # one per block, once known

    def check_config(self, blocks: int | None, method_calibrates: bool) -> None:
        """Raise ``ValueError`` when the plan cannot apply to a model of ``blocks`` decoder
        blocks (None: not known), pruned by a method that calibrates or not."""
        if blocks is not None and self.targets is not None and len(self.targets) != blocks:
            raise ValueError(
                f"sparsity.per_block has {len(self.targets)} ratios, but the model has {blocks} "
                "decoder blocks: give one ratio per block."
            )

    def prepare(self, model: nn.Module, windows: Tensor | None, context: RunContext) -> None:
        """Compute the targets from the dense model, before the walk (nothing by default)."""

    def target(self, block: int, name: str) -> Sparsity:
        """The target of Linear ``name`` (its name inside the block, e.g. ``self_attn.q_proj``)."""
        return self.sparsity if self.targets is None else self.targets[block]

    def block_targets(self) -> list[float] | None:
        """One target ratio per block when they differ, for the run record; None when uniform."""
        return None if self.targets is None else [t.ratio for t in self.targets]

    def record(self) -> dict[str, Any]:
        """What the run record keeps of the plan (``metrics.json`` ``sparsity``)."""
        return {"per_block_target": self.block_targets()}


class UniformPlan(SparsityPlan):
    """Every Linear gets the same target (``sparsity.allocator=uniform``)."""


class PerBlockPlan(SparsityPlan):
    """A given unstructured ratio per decoder block (``sparsity.per_block=[r_0, r_1, ...]``)."""

    def __init__(
        self, sparsity: Sparsity, per_block: list[Annotated[float, Range(ge=0, lt=1)]] | None = None
    ) -> None:
        super().__init__(sparsity)
        if not per_block:
            raise ValueError(
                f"sparsity.per_block={per_block!r}: give one ratio per decoder block, e.g. "
                "sparsity.per_block=[0.4,0.5,0.6]."
            )
        if sparsity.structured:
            raise ValueError(
                f"sparsity.per_block with N:M {sparsity.label}: a per-block schedule is for "
                "unstructured sparsity only; set sparsity=unstructured."
            )
        self.targets = [Sparsity(float(r)) for r in per_block]
