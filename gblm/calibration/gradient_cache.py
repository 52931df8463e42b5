"""GBLM's gradient norms on disk: keyed by what produced them, checked on every load.

:func:`cached_gradient_norms` keeps the result of :func:`gblm.calibration.gradients.gradient_norms`
as safetensors, keyed by a hash of what produced it (:func:`gradient_cache_key`: the weights by
content, the windows, the settings), written atomically under a file lock, with a checksum of the
tensors verified on every load.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from gblm.calibration.fold import GradientSettings
from gblm.devices import dtype_name
from gblm.utils import (
    atomic_write,
    atomic_write_text,
    canonical_json,
    content_hash,
    file_lock,
    tensors_checksum,
)

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
    """Everything the gradient norms depend on, as a JSON-able dict for :func:`cached_gradient_norms`.

    ``model_id`` identifies the weights by content (:func:`gblm.models.loading.weights_fingerprint`,
    through :meth:`gblm.methods.base.RunContext.model_key`), not by their path.
    """
    key = {
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
    # Not in the key: blockwise and group_size, which give the same norms bit for bit
    # (tests/test_gradients.py), so one cache entry serves them all.
    return key


def gradient_cache_path(cache_dir: Path, key: dict) -> Path:
    """``cache_dir / grad_<first 16 hex of content_hash(key)>.safetensors``."""
    return Path(cache_dir) / f"grad_{content_hash(key, length=16)}.safetensors"


def load_verified(path: Path) -> dict[str, Tensor] | None:
    """The norms stored at ``path`` if the file is whole and its checksum holds, else None.

    The checksum (:func:`gblm.utils.tensors_checksum`, in the file's metadata) covers every byte
    of tensor data, so bytes damaged behind an intact header are caught too.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            expected = (handle.metadata() or {}).get("checksum")
        norms = load_file(path)
        ok = expected is not None and expected == tensors_checksum(norms)
    except Exception as err:  # truncated or garbled: any reader error means recompute
        logger.warning("damaged gradient cache %s (%s): recomputing it", path, err)
        return None
    if not ok:
        logger.warning("damaged gradient cache %s (checksum mismatch): recomputing it", path)
        return None
    logger.info("gradient norms loaded from %s", path)
    return norms


def cached_gradient_norms(
    cache_dir: Path, key: dict, compute: Callable[[], dict[str, Tensor]]
) -> dict[str, Tensor]:
    """Load the gradient norms for ``key`` from ``cache_dir``, or compute and store them.

    The file is written atomically (:func:`gblm.utils.atomic_write`) under a file lock, so
    concurrent sweep jobs with the same key compute once: the others wait for the lock and then
    load. Its metadata holds the key and a checksum of the tensors, verified on every load: a
    damaged or truncated entry is recomputed with a warning naming the file. The key is saved
    beside it as ``grad_<hash>.json``. Loaded tensors are on CPU.
    """
    path = gradient_cache_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path):
        if path.exists():
            norms = load_verified(path)
            if norms is not None:
                return norms
        norms = compute()
        tensors = {name: g.contiguous() for name, g in norms.items()}
        metadata = {"key": canonical_json(key), "checksum": tensors_checksum(tensors)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        atomic_write_text(
            path.with_suffix(".json"), json.dumps(key, sort_keys=True, indent=2) + "\n"
        )
        logger.info("gradient norms cached at %s", path)
    return norms
