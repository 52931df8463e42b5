"""Score methods that read GBLM-Pruner's gradient stage (:mod:`gblm.calibration.gradients`): per
decoder-block Linear, the norm over the calibration windows of the scaled per-window weight
gradient. :class:`GradientScorePruner` runs the stage as the method's dense-model pass, through
the content-keyed cache of :mod:`gblm.calibration.gradient_cache`, so methods asking for the same
settings share one entry (GBLM-Pruner with ``norm=l2`` and Pruner-Zero).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated

from torch import Tensor, nn

from gblm.calibration.fold import ACCUMULATOR_DTYPES, NORMS
from gblm.calibration.gradient_cache import (
    cached_gradient_norms,
    gradient_cache_key,
    gradient_cache_path,
)
from gblm.calibration.gradients import GradientSettings, gradient_norms
from gblm.methods.base import RunContext, ScorePruner
from gblm.options import OneOf, Range

#: The gradient stage's options, declared once for every method that reads its norms.
Norm = Annotated[str, OneOf(NORMS)]
Scale = Annotated[float, Range(ge=0)]
AccumulatorDtype = Annotated[str, OneOf(ACCUMULATOR_DTYPES)]
GroupSize = Annotated[int, Range(ge=1)]


class GradientScorePruner(ScorePruner):
    """A score method whose score reads the gradient stage's norms (by full Linear name)."""

    def __init__(
        self, comparison_group: str, norm: str, scale: float, accumulator_dtype: str,
        gradient_blockwise: bool, gradient_group_size: int, uses_gradients: bool = True,
    ) -> None:  # fmt: skip
        """The stage's options (declared by the subclass); ``uses_gradients=False`` skips it."""
        super().__init__(comparison_group)
        self.gradients = GradientSettings(
            norm=norm, scale=scale, accumulator_dtype=accumulator_dtype,
            blockwise=gradient_blockwise, group_size=gradient_group_size,
        )  # fmt: skip
        self.uses_gradients = uses_gradients
        self.dense_pass = "gradients" if uses_gradients else None
        self._grad_norms: dict[str, Tensor] | None = None

    def prepare(self, model: nn.Module, windows: Tensor | None, context: RunContext) -> None:
        """The gradient stage on the dense model, or its cached result."""
        if not self.uses_gradients:
            return
        if windows is None:
            raise ValueError("The gradient stage needs calibration windows.")

        # An onloaded model goes block by block: the same norms, the accumulators file-backed.
        settings = replace(self.gradients, blockwise=self.gradients.blockwise or context.onload)

        def compute() -> dict[str, Tensor]:
            return gradient_norms(
                model, windows, settings, device=context.device, progress=context.progress,
                file_backed=context.onload, scratch_dir=context.scratch_dir,
            )  # fmt: skip

        key = self._cache_key(windows, context)
        if key is None:
            self._grad_norms = compute()
        else:
            self._grad_norms = cached_gradient_norms(context.cache_dir / "gradients", key, compute)

    def _cache_key(self, windows: Tensor, context: RunContext) -> dict | None:
        model_key = context.model_key()
        if context.cache_dir is None or model_key is None:
            return None
        return gradient_cache_key(model_key, windows, self.gradients, context.model_dtype)

    def dense_pass_cached(self, windows: Tensor | None, context: RunContext) -> bool:
        """Whether :meth:`prepare` will read the gradient norms from the cache."""
        if not self.uses_gradients or windows is None:
            return False
        key = self._cache_key(windows, context)
        return (
            key is not None and gradient_cache_path(context.cache_dir / "gradients", key).exists()
        )

    def set_gradient_norms(self, grad_norms: dict[str, Tensor]) -> None:
        """Use gradient norms computed elsewhere (by full Linear name) instead of :meth:`prepare`."""
        self._grad_norms = grad_norms

    def release(self) -> None:
        self._grad_norms = None

    def gradient_norm(self, name: str, method: str) -> Tensor:
        """The gradient norm (d_out, d_in) of the Linear ``name`` (``method``: for the error)."""
        if self._grad_norms is None or name not in self._grad_norms:
            raise ValueError(
                f"{method} has no gradient norm for {name!r}: run its gradient stage "
                "(prepare) on the dense model first."
            )
        return self._grad_norms[name]
