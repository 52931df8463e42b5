"""Save a pruned model with its tokenizer, masks, run record and model card, atomically.

The directory (``<run dir>/model``) is a plain Hugging Face checkpoint (the pruned weights hold
their zeros; config.json carries the recipe under :data:`RECIPE_KEY`) plus
``pruning_masks.safetensors`` (per Linear its mask, True = pruned, packed 8 entries a byte, first
entry in the high bit; shapes in the metadata), ``pruning.json`` (the run's record less the
machine's fields, :func:`published_record`, and mask statistics) and ``README.md``
(:mod:`gblm.models.card`). It is filled in a temporary sibling and renamed into place, so a
reader never sees half of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gblm import __version__
from gblm.devices import dtype_name
from gblm.models.card import model_card, portable_path
from gblm.pruning.storage import pack_mask, unpack_mask
from gblm.utils import atomic_write, atomic_write_json

MASKS_FILE = "pruning_masks.safetensors"
RECORD_FILE = "pruning.json"
CARD_FILE = "README.md"
MASK_FORMAT = "gblm-packbits-v1"


def save_masks(masks: Mapping[str, Tensor], path: Path) -> None:
    """Write ``masks`` (Linear name -> bool mask) bit-packed into one safetensors file."""
    from safetensors.torch import save_file

    packed = {name: pack_mask(mask) for name, mask in masks.items()}
    shapes = {name: list(mask.shape) for name, mask in masks.items()}
    save_file(packed, str(path), metadata={"format": MASK_FORMAT, "shapes": json.dumps(shapes)})


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
    for name, mask in masks.items():
        pruned = int(mask.sum().item())
        per_linear[name] = {"shape": list(mask.shape), "pruned": pruned,
                            "ratio": pruned / max(mask.numel(), 1)}  # fmt: skip
    pruned = sum(row["pruned"] for row in per_linear.values())
    total = sum(mask.numel() for mask in masks.values())
    return {
        "linears": len(per_linear),
        "pruned": pruned,
        "total": total,
        "ratio": pruned / total if total else 0.0,
        "per_linear": per_linear,
    }


def _default_permissions(directory: Path) -> None:
    """Give everything under ``directory`` the mode its ``mkdir`` got under the umask (safetensors
    writes its files 0600, which would make the saved weights unreadable to others)."""
    dir_mode = directory.stat().st_mode & 0o777
    for path in directory.rglob("*"):
        path.chmod(dir_mode if path.is_dir() else dir_mode & 0o666)


RECIPE_KEY = "gblm_pruning"  # the config.json key that records how a saved model was pruned


def _save_pretrained(
    model: torch.nn.Module, directory: Path, dtype: torch.dtype | None, recipe: Mapping[str, Any]
) -> None:
    """``model.save_pretrained`` with ``use_cache`` on (the walk turned it off), the weights in
    ``dtype`` (None: as they are; cast in a copy of the state dict, never in the model) and
    ``recipe`` under :data:`RECIPE_KEY`; the model and its config are left as found."""
    config = model.config
    saved = {key: getattr(config, key, None) for key in ("use_cache", "dtype")}
    state_dict = None
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v
                      for k, v in model.state_dict().items()}  # fmt: skip
    if saved["use_cache"] is not None:
        config.use_cache = True
    setattr(config, RECIPE_KEY, dict(recipe))
    try:
        model.save_pretrained(directory, state_dict=state_dict)
        if dtype is not None:  # save_pretrained writes the dtype of the model, not of the files
            config_file = directory / "config.json"
            written = json.loads(config_file.read_text())
            written["dtype"] = dtype_name(dtype)
            atomic_write_json(config_file, written)
    finally:
        for key, value in saved.items():
            if value is not None:
                setattr(config, key, value)
        if hasattr(config, RECIPE_KEY):
            delattr(config, RECIPE_KEY)


#: The run record's fields about the machine that ran it (its host and process id; its run dir's
#: mask pictures and the warnings about such local outputs): metrics.json keeps them, a saved
#: model, which push_to_hub publishes, leaves them out.
MACHINE_FIELDS = ("process", "mask_images", "warnings")


def published_record(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` as a saved model carries it: without :data:`MACHINE_FIELDS`, and a local
    model's folder (the model's name and the run's) cut to its name (:func:`portable_path`)."""
    record = {key: value for key, value in metrics.items() if key not in MACHINE_FIELDS}
    model = str(metrics.get("model"))
    if (shown := portable_path(model)) != model:
        record["model"] = shown
        record["run_name"] = str(metrics.get("run_name")).replace(model, shown)
    return record


def save_pruned_model(
    model: torch.nn.Module,
    tokenizer: Any,
    masks: Mapping[str, Tensor],
    out_dir: str | Path,
    metrics: Mapping[str, Any],
    dtype: torch.dtype | None = None,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Save the pruned ``model`` (its pruned weights already zero), its ``tokenizer``, ``masks``
    (Linear name -> bool mask, True = pruned; empty for a dense model), the run's ``metrics`` and
    a model card into ``out_dir`` (created or replaced); returns ``out_dir``.

    ``dtype`` is the weights' dtype on disk (None: the model's own); ``card`` holds what
    :func:`gblm.models.card.model_card` needs beyond ``metrics`` (``base_model``, ``evaluation``).
    """
    summary = mask_summary(masks)
    masks_file = MASKS_FILE if masks else None
    recipe = {
        "tool": f"gblm {__version__}",
        **{
            key: metrics.get(key)
            for key in ("method", "method_settings", "sparsity", "calibration")
        },
        "achieved_sparsity": summary["ratio"],
        "pruned_linears": summary["linears"],
        "masks_file": masks_file,
    }

    def fill(tmp: Path) -> None:
        _save_pretrained(model, tmp, dtype, recipe)
        (tmp / CARD_FILE).write_text(model_card(metrics, summary["ratio"], **(card or {})))
        tokenizer.save_pretrained(tmp)
        if masks:
            save_masks(masks, tmp / MASKS_FILE)
        record = {"metrics": published_record(metrics),
                  "masks": summary | {"file": masks_file, "format": MASK_FORMAT}}  # fmt: skip
        atomic_write_json(tmp / RECORD_FILE, record)
        _default_permissions(tmp)

    return atomic_write(out_dir, fill, directory=True)


class HubPushError(RuntimeError):
    """The saved model could not be pushed (offline, no token, no permission, ...)."""


def push_saved_model(directory: str | Path, repo_id: str) -> str:
    """Upload a saved model directory to the hub repo ``repo_id`` (created private when missing);
    returns its URL. Offline or on a failed upload: :class:`HubPushError`."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise HubPushError(
            f"push_to_hub={repo_id!r}: the Hugging Face hub is offline here (HF_HUB_OFFLINE is "
            f"set; gblm sets it when the hub cannot be reached). The model is saved in "
            f"{directory}: upload it later with `hf upload {repo_id} {directory}`."
        )
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=True, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model",
                          commit_message="gblm: pruned model")  # fmt: skip
    except Exception as err:  # network, auth, permission: all end the push, never the run
        raise HubPushError(f"push_to_hub={repo_id!r} failed: {type(err).__name__}: {err}") from err
    return f"https://huggingface.co/{repo_id}"
