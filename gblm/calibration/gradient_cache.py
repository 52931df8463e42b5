"""GBLM's gradient norms on disk (:func:`gblm.utils.cached_tensors`: atomic, locked,
checksummed), keyed by what produced them: the weights by content, the windows, the settings."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from gblm.calibration.fold import GradientSettings
from gblm.devices import dtype_name
from gblm.utils import atomic_write_text, cached_tensors, content_hash

logger = logging.getLogger("gblm.gradients")

CACHE_FORMAT_VERSION = 2  # 2: the model keyed by its weights' content; a checksum per entry


def windows_digest(windows: Tensor) -> str:
    """sha256 of the window ids (as int64, C order) and their shape."""
    ids = windows.detach().to(device="cpu", dtype=torch.int64).contiguous()
    digest = hashlib.sha256(repr(tuple(ids.shape)).encode())
    digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def gradient_cache_key(
    model_id: str, windows: Tensor, settings: GradientSettings, model_dtype: torch.dtype | str
) -> dict:
    """Everything the gradient norms depend on, as a JSON-able dict; ``model_id`` names the
    weights by content (:meth:`gblm.methods.base.RunContext.model_key`), not by their path.

    Not in the key: ``blockwise`` and ``group_size``, which give the same norms bit for bit.
    """
    return {
        "kind": "gblm-gradient-norms",
        "version": CACHE_FORMAT_VERSION,
        "model": model_id,
        "model_dtype": dtype_name(model_dtype)
        if isinstance(model_dtype, torch.dtype)
        else model_dtype,
        "nsamples": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "windows_sha256": windows_digest(windows),
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
