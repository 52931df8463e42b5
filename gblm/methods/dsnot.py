"""DSnoT (Zhang et al., ICLR 2024) as a refinement after any method's initial mask.

``method=dsnot method.initial=<method>`` wraps a registered score method (magnitude, wanda,
gblm, ria, ...; options through ``method.initial_options``): that method scores and selects the
initial mask, per output row by default as DSnoT's published code does for every initial method
(``comparison_group=row``; ``layer``, or null for the method's own group), then
:meth:`DSnoTPruner.refine` (the :meth:`gblm.methods.base.Pruner.refine` hook) swaps pruned and kept weights per row
(:mod:`gblm.pruning.dsnot`) before the weights are zeroed. No weight is updated.

``initial=sparsegpt`` is DSnoT's own SparseGPT variant: the initial score is SparseGPT's
``W^2 / diag(Hinv)^2`` from a properly accumulated Hessian, selected per row (or N:M) with no OBS
update. (The published code allocates that Hessian but never accumulates it, so its "SparseGPT
w. DSnoT" row cannot be reproduced from it.)

The walk gathers the wrapped method's statistics plus ``row_sq``, the input sum ``mean`` and the
token variance ``var``, on inputs from the pruned blocks 0..b-1. By default only the attention
projections (q, k, v, o) are refined and the MLP keeps the initial mask (published:
``skip_layer=mlp``); ``layers=all`` refines every Linear.
"""

from __future__ import annotations

from typing import Annotated, Any

from torch import Tensor, nn

from gblm.calibration.stats import LinearStats
from gblm.methods.base import ComparisonGroup, RunContext, ScorePruner, require
from gblm.names import linear_type
from gblm.options import OneOf, Range
from gblm.pruning.dsnot import dsnot_nm, dsnot_unstructured, obs_saliency
from gblm.pruning.masks import select_mask
from gblm.pruning.sparsity import Sparsity
from gblm.pruning.wanda import activation_term

LAYERS = ("attention", "all")
_ATTENTION = frozenset({"q", "k", "v", "o"})


class DSnoTPruner(ScorePruner):
    """The initial method's mask, refined by DSnoT's grow-and-prune cycles."""

    def __init__(
        self,
        initial: str = "wanda",
        initial_options: dict[str, Any] | None = None,
        comparison_group: ComparisonGroup | None = "row",
        max_cycle: Annotated[int, Range(ge=0)] = 50,
        threshold: Annotated[float, Range(ge=0)] = 0.1,
        var_power: Annotated[float, Range(ge=0)] = 1.0,
        layers: Annotated[str, OneOf(LAYERS)] = "attention",
    ) -> None:
        super().__init__(comparison_group or "row")
        self.initial = initial
        self.initial_options = dict(initial_options or {})
        self.initial_group = comparison_group
        self.max_cycle, self.threshold, self.var_power, self.layers = (
            max_cycle,
            threshold,
            var_power,
            layers,
        )
        self.inner = self._initial_method()
        inner_stats = self.inner.stats if self.inner is not None else frozenset({"hessian"})
        self.stats = frozenset(inner_stats) | {"row_sq", "mean", "var"}
        self.percdamp = float(self.initial_options.get("percdamp", 0.01))
        self.true_sequential = bool(getattr(self.inner, "true_sequential", False))
        self.dense_pass = getattr(self.inner, "dense_pass", None)

    def _initial_method(self) -> ScorePruner | None:
        """The wrapped score method; None for SparseGPT (its score is computed here)."""
        from gblm.methods.registry import build_method, check_options, method_entry, method_names

        if self.initial not in method_names():
            raise ValueError(
                f"method.initial={self.initial!r} is not allowed: choose one of "
                f"{', '.join(method_names())}."
            )
        if self.initial == "dsnot":
            raise ValueError("method.initial=dsnot: choose the method whose mask DSnoT refines.")
        target = method_entry(self.initial).target
        if target is None:
            raise ValueError(
                f"method.initial={self.initial!r}: DSnoT refines the mask of a score method "
                "(or sparsegpt's score)."
            )
        if self.initial == "sparsegpt":
            unknown = sorted(set(self.initial_options) - {"percdamp"})
            if unknown:
                raise ValueError(
                    f"method.initial_options.{unknown[0]}: with initial=sparsegpt the only "
                    "option is percdamp (the initial score is SparseGPT's, with no weight update)."
                )
            check_options("method.initial_options", target, self.initial_options)
            return None
        options = check_options("method.initial_options", target, self.initial_options)
        if self.initial_group is not None:
            options.setdefault("comparison_group", self.initial_group)
        inner = build_method(self.initial, **options)
        if not isinstance(inner, ScorePruner):
            raise ValueError(
                f"method.initial={self.initial!r}: DSnoT refines the mask of a score method "
                "(or sparsegpt's score)."
            )
        return inner

    @property
    def label(self) -> str:
        """The name of this run's method in the report's tables."""
        return f"dsnot({self.initial})"

    def check_target(self, target: Sparsity) -> None:
        if self.inner is not None:
            self.inner.check_target(target)

    def check_model(self, model: nn.Module) -> None:
        if self.inner is not None:
            self.inner.check_model(model)

    def prepare(self, model: nn.Module, windows: Tensor | None, context: RunContext) -> None:
        if self.inner is not None:
            self.inner.prepare(model, windows, context)

    def dense_pass_cached(self, windows: Tensor | None, context: RunContext) -> bool:
        return self.inner is not None and self.inner.dense_pass_cached(windows, context)

    def release(self) -> None:
        if self.inner is not None:
            self.inner.release()

    def score(self, name: str, weight: Tensor, stats: LinearStats) -> Tensor:
        if self.inner is None:
            return obs_saliency(weight, require(stats, "hessian", "DSnoT"), self.percdamp)
        return self.inner.score(name, weight, stats)

    def select(self, score: Tensor, target: Sparsity) -> Tensor:
        if self.inner is None:  # DSnoT's protocol for SparseGPT's score: per row, or N:M
            group = self.initial_group or "row"
            return select_mask(score, target.ratio, target.n, target.m, group)
        return self.inner.select(score, target)

    def refine(
        self, name: str, linear: nn.Linear, stats: LinearStats, mask: Tensor, target: Sparsity
    ) -> Tensor:
        if self.layers == "attention" and linear_type(name) not in _ATTENTION:
            return mask
        weight = linear.weight.data
        mean = require(stats, "mean", "DSnoT").to(weight.device)
        var = require(stats, "var", "DSnoT").to(weight.device)
        D = weight * mean.reshape(1, -1)  # fp32 from an fp16 weight, as published
        options = dict(max_cycle=self.max_cycle, threshold=self.threshold, var_power=self.var_power)
        if target.structured:
            initial = self.score(name, weight, stats)
            return dsnot_nm(mask, D.float(), initial, var, target.m, **options)
        wanda = activation_term(weight, require(stats, "row_sq_norms", "DSnoT"))
        return dsnot_unstructured(mask, D.float(), wanda, var, **options)

    def describe(self) -> dict:
        return {
            "initial": self.initial,
            "initial_options": self.initial_options,
            "comparison_group": self.initial_group,
            "max_cycle": self.max_cycle,
            "threshold": self.threshold,
            "var_power": self.var_power,
            "layers": self.layers,
        }
