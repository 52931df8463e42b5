"""Shared fixtures: composed configs, the SmolLM2 tokenizer, tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_config(*overrides: str) -> DictConfig:
    """The run config as ``python -m gblm <overrides>`` would compose it (without Hydra's own keys)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (converting the embedded model once if needed)."""
    from gblm.models.loading import ModelSpec, load_tokenizer

    return load_tokenizer(ModelSpec())


@pytest.fixture
def tiny_llama():
    from gblm.models.tiny import build_tiny_model, tiny_config

    return build_tiny_model(tiny_config("llama", vocab_size=256), seed=0)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
