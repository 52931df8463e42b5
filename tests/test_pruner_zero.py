"""Pruner-Zero: the known answer, a naive loop, N:M and per-row sparsity, the published quirks,
an end-to-end run on the tiny llama and the gradient cache shared with GBLM-Pruner."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import gblm.methods.gradient_score as gradient_score
from gblm.calibration.gradients import GradientSettings
from gblm.calibration.sequential import prune_model
from gblm.calibration.stats import LinearStats
from gblm.errors import ConfigError
from gblm.methods.base import RunContext
from gblm.methods.pruner_zero import PrunerZeroPruner, min_max_scale, pruner_zero_score
from gblm.methods.registry import build_method
from gblm.models.tiny import build_tiny_model, tiny_config
from gblm.pruning.sparsity import Sparsity
from gblm.run import run
from tests.conftest import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "model.layers.0.mlp.up_proj"


def _pruner(grad_norm: Tensor, **options) -> PrunerZeroPruner:
    pruner = PrunerZeroPruner(**options)
    pruner.set_gradient_norms({NAME: grad_norm})
    return pruner


def _prune(weight: Tensor, grad_norm: Tensor, target: Sparsity, **options) -> Tensor:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    mask = _pruner(grad_norm, **options).prune_linear(NAME, linear, LinearStats(), target)
    assert torch.equal(linear.weight == 0, mask | (weight == 0))
    return mask


def _random(seed: int, d_out: int = 6, d_in: int = 16) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen)
    grad_norm = (torch.rand(d_out, d_in, generator=gen) * 50).half()  # stored as published: fp16
    return weight, grad_norm


def test_known_answer() -> None:
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    grad_norm = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    assert min_max_scale(grad_norm).tolist() == [[0.0, 0.25], [0.5, 1.0]]
    assert pruner_zero_score(weight, grad_norm).tolist() == [[0.0, 1.0], [4.5, 0.25]]
    mask = _prune(weight, grad_norm, Sparsity(0.5))
    assert mask.tolist() == [[True, False], [False, True]]


def _naive_score(weight: Tensor, grad_norm: Tensor) -> list[list[float]]:
    W, G = weight.tolist(), grad_norm.float().tolist()
    low = min(min(row) for row in G)
    high = max(max(row) for row in G)
    return [
        [abs(w) * abs(w) * (g - low) / (high - low) for w, g in zip(wr, gr)] for wr, gr in zip(W, G)
    ]


def _naive_row_mask(score: list[list[float]], ratio: float) -> list[list[bool]]:
    mask = []
    for row in score:
        k = int(len(row) * ratio)
        order = sorted(range(len(row)), key=lambda j: (row[j], j))  # stable: lower column first
        mask.append([j in order[:k] for j in range(len(row))])
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_and_mask_match_a_naive_loop(seed: int) -> None:
    weight, grad_norm = _random(seed)
    score = pruner_zero_score(weight, grad_norm)
    naive = _naive_score(weight, grad_norm)
    for i, j in itertools.product(range(weight.shape[0]), range(weight.shape[1])):
        assert score[i, j].item() == pytest.approx(naive[i][j], rel=1e-6, abs=1e-12)
    for ratio in (0.3, 0.5, 0.7):
        assert _prune(weight, grad_norm, Sparsity(ratio)).tolist() == _naive_row_mask(naive, ratio)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.55, 0.8])
def test_exact_sparsity_per_row(ratio: float) -> None:
    weight, grad_norm = _random(3, d_out=8, d_in=40)
    mask = _prune(weight, grad_norm, Sparsity(ratio))
    assert (mask.sum(dim=1) == int(40 * ratio)).all()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_nm_masks_are_valid_and_prune_the_lowest_of_each_group(n: int, m: int) -> None:
    weight, grad_norm = _random(4, d_out=8, d_in=32)
    mask = _prune(weight, grad_norm, Sparsity(n / m, n, m))
    groups = mask.reshape(8, -1, m)
    assert (groups.sum(dim=-1) == n).all()
    score = pruner_zero_score(weight, grad_norm).reshape(8, -1, m)
    kept_min = score.masked_fill(groups, float("inf")).amin(dim=-1)
    pruned_max = score.masked_fill(~groups, -float("inf")).amax(dim=-1)
    assert (pruned_max <= kept_min).all()


def test_published_dtypes_fp16_factors_widened_before_any_arithmetic() -> None:
    weight, grad_norm = _random(5)
    score = pruner_zero_score(weight.half(), grad_norm)
    assert score.dtype == torch.float32
    wide = weight.half().float().abs()
    g = grad_norm.float()
    expected = (wide * wide) * ((g - g.min()) / (g.max() - g.min()))
    assert torch.equal(score, expected)


def test_equal_norms_give_nan_and_prune_the_first_columns_as_published() -> None:
    weight, _ = _random(6, d_out=4, d_in=10)
    grad_norm = torch.zeros(4, 10, dtype=torch.float16)  # max == min: 0 / 0
    assert pruner_zero_score(weight, grad_norm).isnan().all()
    mask = _prune(weight, grad_norm, Sparsity(0.5))
    assert mask[:, :5].all() and not mask[:, 5:].any()


def test_the_activation_statistic_is_not_used_and_options_are_checked() -> None:
    pruner = build_method("pruner_zero")
    assert pruner.stats == frozenset() and pruner.dense_pass == "gradients"
    assert pruner.gradients == GradientSettings("l2", 100.0, "float16", False, 8)
    assert pruner.comparison_group == "row"
    with pytest.raises(ConfigError, match="method.norm"):
        build_method("pruner_zero", norm="l3")
    with pytest.raises(ConfigError, match="method.comparison_group"):
        build_method("pruner_zero", comparison_group="column")
    with pytest.raises(ValueError, match="no gradient norm"):
        PrunerZeroPruner().score(NAME, torch.ones(2, 2), LinearStats())
    with pytest.raises(ValueError, match="does not match"):
        _pruner(torch.ones(3, 2)).score(NAME, torch.ones(2, 3), LinearStats())


def test_end_to_end_on_the_tiny_llama_reads_gblms_cached_norms(
    cache, tmp_path, monkeypatch, tokenizer
) -> None:
    computed = []

    def counting(*args, **kwargs):
        computed.append(1)
        return gradient_norms(*args, **kwargs)

    gradient_norms = gradient_score.gradient_norms
    monkeypatch.setattr(gradient_score, "gradient_norms", counting)
    small = ("model=tiny_llama", "calibration.nsamples=4", "calibration.seqlen=32",
             "eval.perplexity.max_windows=2", "progress=false", "mask_images=[]")  # fmt: skip
    run(compose_config(*small, "method=gblm", "method.norm=l2"), run_dir=tmp_path / "gblm")
    assert len(computed) == 1
    metrics = run(compose_config(*small, "method=pruner_zero"), run_dir=tmp_path / "pz")
    assert len(computed) == 1  # the same cache entry: not computed again
    assert metrics["status"] == "finished" and metrics["ppl"]["pruned"] > 1
    assert metrics["sparsity_check"]["overall"] == pytest.approx(0.5, abs=1e-3)
    [entry] = (cache / "gradients").glob("grad_*.safetensors")

    # The masks depend on the dense weights and the norms only: recompute them from both.
    from omegaconf import OmegaConf

    from gblm.models.loading import ModelSpec, load_model

    norms = load_file(entry)
    spec = ModelSpec(kind="tiny", tiny=OmegaConf.to_container(compose_config(*small).model.tiny))
    model = load_model(spec, torch.device("cpu"), torch.float32, tokenizer)
    dense = {name: module.weight.detach().clone() for name, module in model.named_modules()
             if name in norms}  # fmt: skip
    method = build_method("pruner_zero")
    method.set_gradient_norms(norms)
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    masks = prune_model(model, method, Sparsity(0.5), windows, device="cpu", progress=False)
    assert set(masks) == set(norms) == set(dense)
    for name, mask in masks.items():
        naive = _naive_row_mask(_naive_score(dense[name], norms[name]), 0.5)
        assert mask.tolist() == naive, name


def test_dsnot_refines_pruner_zeros_mask() -> None:
    model = build_tiny_model(tiny_config("llama", vocab_size=256), seed=0)
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    context = RunContext(device=torch.device("cpu"), model_dtype=torch.float32, progress=False)
    method = build_method("dsnot", initial="pruner_zero", max_cycle=4, layers="all")
    method.prepare(model, windows, context)
    masks = prune_model(model, method, Sparsity(0.5, 2, 4), windows, device="cpu", progress=False)
    for name, mask in masks.items():
        assert (mask.reshape(mask.shape[0], -1, 4).sum(dim=-1) == 2).all(), name
