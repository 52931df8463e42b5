"""Score methods that read GBLM-Pruner's gradient stage (:mod:`gblm.calibration.gradients`): per
decoder-block Linear, the norm over the calibration windows of the scaled per-window weight
gradient. :class:`GradientScorePruner` runs the stage as the method's dense-model pass, through a
content-keyed cache on disk, so methods asking for the same settings share one entry
(GBLM-Pruner with ``norm=l2`` and Pruner-Zero).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import torch
from torch import Tensor, nn

from gblm.calibration.fold import ACCUMULATOR_DTYPES, NORMS
from gblm.calibration.gradients import GradientSettings, gradient_norms
from gblm.devices import dtype_name
from gblm.methods.base import RunContext, ScorePruner
from gblm.options import OneOf, Range
from gblm.utils import atomic_write_text, cached_tensors, content_hash, tensors_checksum

#: The gradient stage's options, declared once for every method that reads its norms.
Norm = Annotated[str, OneOf(NORMS)]
Scale = Annotated[float, Range(ge=0)]
AccumulatorDtype = Annotated[str, OneOf(ACCUMULATOR_DTYPES)]
GroupSize = Annotated[int, Range(ge=1)]


def check_shape(grad_norm: Tensor, weight: Tensor) -> None:
    """Refuse a gradient norm whose shape is not the weight's (norms of another model)."""
    if grad_norm.shape != weight.shape:
        raise ValueError(
            f"gradient norm of shape {tuple(grad_norm.shape)} does not match the weight "
            f"{tuple(weight.shape)}: were the gradients computed for another model?"
        )


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
        return gradient_cache_key(
            model_key, windows, self.gradients, context.model_dtype, context.device
        )

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


# The cache: the norms on disk (:func:`gblm.utils.cached_tensors`: atomic, locked, checksummed),
# keyed by what produced them: the weights by content, the windows, the settings.
CACHE_FORMAT_VERSION = 3  # 2: the weights by content, a checksum per entry; 3: the device type


def gradient_cache_key(
    model_id: str,
    windows: Tensor,
    settings: GradientSettings,
    model_dtype: torch.dtype | str,
    device: torch.device | str = "cpu",
) -> dict:
    """Everything the gradient norms depend on, as a JSON-able dict; ``model_id`` names the
    weights by content (:meth:`gblm.methods.base.RunContext.model_key`), not by their path. The
    device type is in the key: a GPU's sums round differently from the CPU's, so a CPU run that
    shares a cache folder with a GPU run computes its own norms (the masks a fresh run gives).

    Not in the key: ``blockwise`` and ``group_size``, which give the same norms bit for bit.
    """
    return {
        "kind": "gblm-gradient-norms",
        "version": CACHE_FORMAT_VERSION,
        "model": model_id,
        "model_dtype": dtype_name(model_dtype),
        "device": torch.device(device).type,
        "nsamples": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "windows_sha256": tensors_checksum({"windows": windows.to(torch.int64)}),
        "norm": settings.norm,
        "scale": settings.scale,
        "accumulator_dtype": settings.accumulator_dtype,
    }


def gradient_cache_path(cache_dir: Path, key: dict) -> Path:
    """``cache_dir / grad_<first 16 hex of content_hash(key)>.safetensors``."""
    return Path(cache_dir) / f"grad_{content_hash(key, length=16)}.safetensors"


def cached_gradient_norms(
    cache_dir: Path, key: dict, compute: Callable[[], dict[str, Tensor]]
) -> dict[str, Tensor]:
    """The gradient norms for ``key`` from ``cache_dir``, or computed and stored there; the key
    is saved beside them as ``grad_<hash>.json``."""
    path = gradient_cache_path(cache_dir, key)
    norms = cached_tensors(path, compute, "gradient norms")
    if path.exists() and not path.with_suffix(".json").exists():
        with contextlib.suppress(OSError):  # a note for readers; the cache is optional
            atomic_write_text(
                path.with_suffix(".json"), json.dumps(key, sort_keys=True, indent=2) + "\n"
            )
    return norms
