"""Golden masks: every method's masks on the tiny models, bit for bit as recorded.

``tests/data/golden_masks.json`` holds a hash of every mask of every method setting below at 50%
unstructured and 2:4 on the seeded tiny llama / opt / qwen2 / mistral models, recorded before the
methods became plug-ins. A change that is not meant to change results keeps every hash; a change
of a mask on purpose updates the file in the same commit and says why.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gblm.calibration.sequential import prune_model
from gblm.methods.base import RunContext
from gblm.methods.registry import build_method
from gblm.models.tiny import ARCHITECTURES, build_tiny_model, tiny_config
from gblm.pruning.sparsity import Sparsity

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_masks.json").read_text())
SETTINGS = {
    "magnitude": ("magnitude", {}),
    "wanda": ("wanda", {}),
    "sparsegpt": ("sparsegpt", {}),
    "gblm": ("gblm", {}),
    "gblm_l2": ("gblm", {"norm": "l2"}),
    "wanda_layer": ("wanda", {"comparison_group": "layer"}),
    "sparsegpt_seq": ("sparsegpt", {"true_sequential": True}),
}
SPARSITIES = {"0.5": Sparsity(0.5), "2:4": Sparsity(0.5, 2, 4)}


def masks_digest(masks) -> str:
    """sha256 over the names, shapes and packed bits of every mask, in name order."""
    digest = hashlib.sha256()
    for name in sorted(masks):
        mask = masks[name]
        digest.update(name.encode())
        digest.update(repr(tuple(mask.shape)).encode())
        digest.update(np.packbits(mask.numpy().reshape(-1)).tobytes())
    return digest.hexdigest()[:32]


def test_every_setting_has_a_golden_hash() -> None:
    expected = {f"{a}/{s}/{p}" for a in ARCHITECTURES for s in SETTINGS for p in SPARSITIES}
    assert set(GOLDEN) == expected


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_masks_equal_the_golden_ones(arch: str, setting: str) -> None:
    name, options = SETTINGS[setting]
    for label, sparsity in SPARSITIES.items():
        model = build_tiny_model(tiny_config(arch, vocab_size=256), seed=0)
        windows = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
        method = build_method(name, **options)
        context = RunContext(device=torch.device("cpu"), model_dtype=torch.float32, progress=False)
        method.prepare(model, windows, context)
        masks = prune_model(model, method, sparsity, windows, device="cpu", progress=False)
        assert masks_digest(masks) == GOLDEN[f"{arch}/{setting}/{label}"], label
