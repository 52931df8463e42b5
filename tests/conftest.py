"""Shared fixtures: composed configs, the SmolLM2 tokenizer, tiny models."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Every cache the tests write (the converted SmolLM2, corpora, windows, gradients) goes to a
    folder of this test session, never to the checkout's ``outputs/`` (``GBLM_CACHE_DIR``, which
    the runs started in subprocesses inherit too)."""
    root = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("GBLM_CACHE_DIR")
    os.environ["GBLM_CACHE_DIR"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("GBLM_CACHE_DIR", None)
    else:
        os.environ["GBLM_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (converting the embedded model once if needed)."""
    from gblm.models.loading import ModelSpec, load_tokenizer

    return load_tokenizer(ModelSpec())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder of this test's own, sharing only the converted tokenizer/model."""
    from gblm.models.loading import smollm2_checkpoint

    models = smollm2_checkpoint().parent  # converted once, in the session's cache
    root = tmp_path / "cache"
    root.mkdir()
    (root / "models").symlink_to(models, target_is_directory=True)
    monkeypatch.setenv("GBLM_CACHE_DIR", str(root))
    return root


@pytest.fixture
def tiny_llama():
    from gblm.models.tiny import build_tiny_model, tiny_config

    return build_tiny_model(tiny_config("llama", vocab_size=256), seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models gain nothing from more, and on a busy 2-core
    machine extra threads thrash (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def save_tiny_model(path: Path, seed: int = 0, edit=None) -> Path:
    """A tiny llama with SmolLM2's tokenizer saved as a Hugging Face folder (``model=hf``).

    ``edit(model)`` may change the weights first (a NaN, an overflow).
    """
    from gblm.models.loading import ModelSpec, load_tokenizer
    from gblm.models.tiny import build_tiny_model, tiny_config

    tokenizer = load_tokenizer(ModelSpec(kind="tiny"))
    model = build_tiny_model(tiny_config("llama", vocab_size=len(tokenizer)), seed=seed)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def correlated_problem(
    d_out: int, d_in: int, n: int, t: int, seed: int = 0, dead: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (d_out, d_in) and calibration inputs (n, t, d_in) with correlated channels; the
    ``dead`` input channels are zero."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen)
    mixing = torch.eye(d_in) + 0.3 * torch.randn(d_in, d_in, generator=gen)
    x = torch.randn(n, t, d_in, generator=gen) @ mixing  # (n, t, d_in)
    x[..., list(dead)] = 0
    return weight, x


def naive_obs_start(
    weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01
) -> tuple[list[list[float]], list[list[float]]]:
    """The start of SparseGPT's OBS sweep, one entry at a time in float64, for the naive
    references: a dead column (zero diagonal) gets H_jj = 1 and zero weights; H is damped by
    ``percdamp`` times its mean diagonal. Returns W and the upper Cholesky factor U of the damped
    inverse (H^-1 = U^T U), as nested lists."""
    d_out, d_in = weight.shape
    H = hessian.double().clone()
    W = weight.double().tolist()
    for j in range(d_in):
        if H[j, j] == 0:
            H[j, j] = 1
            for r in range(d_out):
                W[r][j] = 0.0
    damp = percdamp * sum(H[j, j].item() for j in range(d_in)) / d_in
    for j in range(d_in):
        H[j, j] += damp
    return W, torch.linalg.cholesky(torch.linalg.inv(H)).t().tolist()


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    """SparseGPT's Hessian (2/N-scaled X^T X, fp32) of inputs (N, T, d_in), one sample at a time."""
    from gblm.calibration.stats import LinearStats

    stats = LinearStats.empty(frozenset({"hessian"}), x.shape[-1])
    for sample in x.split(1):
        stats.fold(sample)
    return stats.hessian
