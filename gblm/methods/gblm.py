"""GBLM-Pruner (Das et al., arXiv 2311.04902): ``|W| * sqrt(row_sq) + |W| * G_p``, per output row.

The method owns two stages: its dense-model pass (:meth:`GBLMPruner.prepare`, the gradient stage
of :mod:`gblm.calibration.gradients`, cached on disk by :mod:`gblm.calibration.gradient_cache`)
and the per-Linear score (:func:`gblm.pruning.gblm.gblm_score`). Every option of the gradient
stage is checked once, by :class:`gblm.calibration.fold.GradientSettings`.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor, nn

from gblm.calibration.gradient_cache import cached_gradient_norms, gradient_cache_key
from gblm.calibration.gradients import GradientSettings, gradient_norms
from gblm.calibration.stats import LinearStats
from gblm.methods.base import RunContext, ScorePruner
from gblm.pruning.gblm import SCORES, gblm_score


class GBLMPruner(ScorePruner):
    """Gradient-informed pruning: activation term plus ``|W|`` times the gradient norm."""

    def __init__(
        self,
        norm: str = "l1",
        scale: float = 100.0,
        score: str = "combined",
        comparison_group: str = "row",
        accumulator_dtype: str = "float16",
        gradient_blockwise: bool = False,
        gradient_group_size: int = 8,
    ) -> None:
        super().__init__(comparison_group)
        if score not in SCORES:
            raise ValueError(f"method.score={score!r}: allowed values are {', '.join(SCORES)}.")
        self.score_kind = score
        self.gradients = GradientSettings(
            norm=norm,
            scale=scale,
            accumulator_dtype=accumulator_dtype,
            blockwise=gradient_blockwise,
            group_size=gradient_group_size,
        )
        # A gradient-only score needs no activation statistic; an activation-only one (Wanda)
        # no gradient stage.
        self.stats = frozenset() if score == "gradient" else frozenset({"row_sq"})
        self.uses_gradients = score != "activation"
        self.dense_pass = "gradients" if self.uses_gradients else None
        self._grad_norms: dict[str, Tensor] | None = None

    def prepare(self, model: nn.Module, windows: Tensor | None, context: RunContext) -> None:
        """The gradient stage on the dense model, or its cached result."""
        if not self.uses_gradients:
            return
        if windows is None:
            raise ValueError("GBLM-Pruner's gradient stage needs calibration windows.")

        # An onloaded model (weights on the CPU) goes block by block (so does one whose weights
        # accelerate offloads): the same norms, the accumulators in file-backed mappings.
        settings = replace(self.gradients, blockwise=self.gradients.blockwise or context.onload)

        def compute() -> dict[str, Tensor]:
            return gradient_norms(
                model, windows, settings, device=context.device, progress=context.progress,
                file_backed=context.onload, scratch_dir=context.scratch_dir,
            )  # fmt: skip

        model_key = context.model_key()
        if context.cache_dir is None or model_key is None:
            self._grad_norms = compute()
            return
        key = gradient_cache_key(model_key, windows, self.gradients, context.model_dtype)
        self._grad_norms = cached_gradient_norms(context.cache_dir / "gradients", key, compute)

    def set_gradient_norms(self, grad_norms: dict[str, Tensor]) -> None:
        """Use gradient norms computed elsewhere (by full Linear name) instead of :meth:`prepare`."""
        self._grad_norms = grad_norms

    def release(self) -> None:
        self._grad_norms = None

    elementwise_score = True

    def column_score(
        self, name: str, stats: LinearStats, weight_cols: Tensor, start: int, end: int
    ) -> Tensor:
        row_sq, grad = stats.row_sq_norms, self._gradient_norm(name)
        return gblm_score(
            weight_cols,
            row_sq[start:end] if row_sq is not None else None,
            grad[:, start:end] if grad is not None else None,
            self.score_kind,
        )

    def _gradient_norm(self, name: str) -> Tensor | None:
        if not self.uses_gradients:
            return None
        if self._grad_norms is None or name not in self._grad_norms:
            raise ValueError(
                f"GBLM-Pruner has no gradient norm for {name!r}: run its gradient stage "
                "(prepare) on the dense model first."
            )
        return self._grad_norms[name]

    def score(self, name: str, weight: Tensor, stats: LinearStats) -> Tensor:
        return gblm_score(weight, stats.row_sq_norms, self._gradient_norm(name), self.score_kind)

    def describe(self) -> dict:
        return {
            "norm": self.gradients.norm,
            "scale": self.gradients.scale,
            "score": self.score_kind,
            "comparison_group": self.comparison_group,
            "accumulator_dtype": self.gradients.accumulator_dtype,
            "gradient_blockwise": self.gradients.blockwise,
            "gradient_group_size": self.gradients.group_size,
        }
