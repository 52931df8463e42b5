"""Save a pruned model with its tokenizer, masks and run record, atomically.

Layout of the directory (``<run dir>/model`` when a run has ``save_model=true``)::

    config.json, model*.safetensors, ...   save_pretrained: the pruned weights (zeros included)
    tokenizer files                        tokenizer.save_pretrained
    pruning_masks.safetensors              one uint8 tensor per pruned Linear: its boolean mask
                                           (True = pruned) packed 8 entries per byte, first entry
                                           in the high bit; shapes in the file's metadata
    pruning.json                           the run's metrics and per-Linear mask statistics
    README.md                              the model card (Hub metadata, how it was pruned, scores)

It loads like any Hugging Face checkpoint, so a saved model is evaluated without pruning again:
``python -m gblm model=hf model.name_or_path=<run dir>/model method=dense`` (or ``model=saved
model.run_dir=<run dir>``). Everything is written into a temporary sibling directory that is then
renamed into place (:func:`gblm.utils.atomic_write` with ``directory=True``), so a reader never
sees a half-written model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gblm.pruning.storage import pack_mask, unpack_mask
from gblm.utils import atomic_write, atomic_write_json

MASKS_FILE = "pruning_masks.safetensors"
RECORD_FILE = "pruning.json"
CARD_FILE = "README.md"
MASK_FORMAT = "gblm-packbits-v1"


def save_masks(masks: Mapping[str, Tensor], path: Path) -> Path:
    """Write ``masks`` (Linear name -> bool mask) bit-packed into one safetensors file."""
    from safetensors.torch import save_file

    packed = {name: pack_mask(mask) for name, mask in masks.items()}
    shapes = {name: list(mask.shape) for name, mask in masks.items()}
    save_file(packed, str(path), metadata={"format": MASK_FORMAT, "shapes": json.dumps(shapes)})
    return Path(path)


def load_masks(path: str | Path) -> dict[str, Tensor]:
    """The boolean masks (True = pruned) of a ``pruning_masks.safetensors`` file or its directory."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / MASKS_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != MASK_FORMAT:
            raise ValueError(f"{path}: not a gblm mask file (format {metadata.get('format')!r}).")
        shapes = json.loads(metadata["shapes"])
        return {name: unpack_mask(f.get_tensor(name), shapes[name]) for name in f.keys()}  # noqa: SIM118


def mask_summary(masks: Mapping[str, Tensor]) -> dict[str, Any]:
    """Pruned share per Linear and overall (True = pruned)."""
    per_linear = {}
    pruned_total = numel_total = 0
    for name, mask in masks.items():
        pruned = int(mask.sum().item())
        per_linear[name] = {
            "shape": list(mask.shape),
            "pruned": pruned,
            "ratio": pruned / max(mask.numel(), 1),
        }
        pruned_total += pruned
        numel_total += mask.numel()
    return {
        "linears": len(per_linear),
        "pruned": pruned_total,
        "total": numel_total,
        "ratio": pruned_total / numel_total if numel_total else 0.0,
        "per_linear": per_linear,
    }


def recipe(metrics: Mapping[str, Any], masks: Mapping[str, Tensor]) -> dict[str, Any]:
    """How the model was pruned, for config.json: method, its settings, target and achieved."""
    from gblm import __version__

    summary = mask_summary(masks)
    return {
        "tool": f"gblm {__version__}",
        "method": metrics.get("method"),
        "method_settings": metrics.get("method_settings"),
        "sparsity": metrics.get("sparsity"),
        "calibration": metrics.get("calibration"),
        "achieved_sparsity": summary["ratio"],
        "pruned_linears": summary["linears"],
        "masks_file": MASKS_FILE if masks else None,
    }


def _default_permissions(directory: Path) -> None:
    """Give the files under ``directory`` the mode its plain ``mkdir`` got under the umask.

    Atomic writes go through temporary files, which are created 0600; a saved model should be
    readable by whoever can read the run directory.
    """
    dir_mode = directory.stat().st_mode & 0o777
    for path in directory.rglob("*"):
        path.chmod(dir_mode if path.is_dir() else dir_mode & 0o666)


#: The config.json key that records how a saved model was pruned.
RECIPE_KEY = "gblm_pruning"


def _save_pretrained(
    model: torch.nn.Module,
    directory: Path,
    dtype: torch.dtype | None = None,
    recipe: Mapping[str, Any] | None = None,
) -> None:
    """``model.save_pretrained`` with ``use_cache`` on (the walk turned it off; a saved model
    should generate normally), the weights in ``dtype`` (None: as they are) and the pruning
    recipe under :data:`RECIPE_KEY` in config.json; the model and its config are left as found.

    A cast goes through a cast copy of the state dict (one extra copy of the weights in
    ``dtype``), never through the model itself, which may still be evaluated after saving.
    """
    config = model.config
    saved = {
        "use_cache": getattr(config, "use_cache", None),
        "dtype": getattr(config, "dtype", None),
    }
    state_dict = None
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v
                      for k, v in model.state_dict().items()}  # fmt: skip
    if saved["use_cache"] is not None:
        config.use_cache = True
    if dtype is not None:
        config.dtype = dtype
    if recipe is not None:
        setattr(config, RECIPE_KEY, dict(recipe))
    try:
        model.save_pretrained(directory, state_dict=state_dict)
        if dtype is not None:  # save_pretrained writes the dtype of the model, not of the files
            config_file = directory / "config.json"
            written = json.loads(config_file.read_text())
            written["dtype"] = str(dtype).removeprefix("torch.")
            atomic_write_json(config_file, written)
    finally:
        for key, value in saved.items():
            if value is not None:
                setattr(config, key, value)
        if recipe is not None and hasattr(config, RECIPE_KEY):
            delattr(config, RECIPE_KEY)


def save_pruned_model(
    model: torch.nn.Module,
    tokenizer: Any,
    masks: Mapping[str, Tensor],
    out_dir: str | Path,
    metrics: Mapping[str, Any],
    dtype: torch.dtype | None = None,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Save the pruned ``model``, its ``tokenizer``, ``masks``, ``metrics`` and a model card
    (``README.md``, :func:`gblm.models.card.model_card`) into ``out_dir``.

    Args:
        model: a Hugging Face causal LM whose pruned weights are already zero.
        tokenizer: its tokenizer (saved beside it, so the directory loads on its own).
        masks: Linear name -> boolean mask (True = pruned), as the layer walk returns them; empty
            for a dense model.
        out_dir: the directory to create or replace.
        metrics: the run's metrics so far, stored in ``pruning.json``; its method, sparsity
            and achieved sparsity also go into config.json (:data:`RECIPE_KEY`).
        dtype: the weights' dtype on disk (None: the model's own).
        card: what the card needs beyond ``metrics``: ``base_model`` (a Hub id) and
            ``evaluation`` (the perplexity setting).

    Returns:
        ``out_dir``.
    """

    from gblm.models.card import model_card

    how = recipe(metrics, masks)

    def fill(tmp: Path) -> None:
        _save_pretrained(model, tmp, dtype, how)
        (tmp / CARD_FILE).write_text(model_card(metrics, how["achieved_sparsity"], **(card or {})))
        tokenizer.save_pretrained(tmp)
        if masks:
            save_masks(masks, tmp / MASKS_FILE)
        atomic_write_json(
            tmp / RECORD_FILE,
            {
                "metrics": dict(metrics),
                "masks": mask_summary(masks)
                | {"file": MASKS_FILE if masks else None, "format": MASK_FORMAT},
            },
        )
        _default_permissions(tmp)

    return atomic_write(out_dir, fill, directory=True)


class HubPushError(RuntimeError):
    """The saved model could not be pushed (offline, no token, no permission, ...)."""


def push_saved_model(directory: str | Path, repo_id: str, *, private: bool = True) -> str:
    """Upload a saved model directory to the Hugging Face hub repo ``repo_id``; returns its URL.

    The repo is created (private by default) when it does not exist. Raises
    :class:`HubPushError` with the reason, e.g. when the hub libraries are offline
    (``HF_HUB_OFFLINE=1``, which gblm sets on a machine without network) or the upload fails.
    """
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise HubPushError(
            f"push_to_hub={repo_id!r}: the Hugging Face hub is offline here (HF_HUB_OFFLINE is "
            f"set; gblm sets it when the hub cannot be reached). The model is saved in "
            f"{directory}: upload it later with `hf upload {repo_id} {directory}`."
        )
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model",
                          commit_message="gblm: pruned model")  # fmt: skip
    except Exception as err:  # network, auth, permission: all end the push, never the run
        raise HubPushError(f"push_to_hub={repo_id!r} failed: {type(err).__name__}: {err}") from err
    return f"https://huggingface.co/{repo_id}"
