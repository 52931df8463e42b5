"""GBLM-Pruner's score and masks, against naive loops and an independent Wanda selection."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from gblm.calibration.gradients import GradientSettings, gradient_norms
from gblm.calibration.stats import LinearStats
from gblm.methods.gblm import GBLMPruner, gblm_score
from gblm.models.tiny import build_tiny_model, tiny_config
from gblm.pruning.masks import unstructured_row_mask
from gblm.pruning.sparsity import Sparsity

D_OUT, D_IN = 8, 16
NAME = "model.layers.0.mlp.up_proj"


@dataclass
class _Stats(LinearStats):
    """The walk's statistics plus the gradient norm the method's own stage would hold."""

    grad_norm: Tensor | None = None


def _with_norms(pruner: GBLMPruner, stats: _Stats, name: str = NAME) -> GBLMPruner:
    if stats.grad_norm is not None:
        pruner.set_gradient_norms({name: stats.grad_norm})
    return pruner


def scored(pruner: GBLMPruner, weight: Tensor, stats: _Stats) -> Tensor:
    return _with_norms(pruner, stats).score(NAME, weight, stats)


def pruned(pruner: GBLMPruner, linear: nn.Linear, stats: _Stats, target: Sparsity, name=NAME):
    return _with_norms(pruner, stats, name).prune_linear(name, linear, stats, target)


def layer_stats(seed: int = 0, grad_dtype: torch.dtype = torch.float16) -> tuple[Tensor, _Stats]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(D_OUT, D_IN, generator=gen)  # (d_out, d_in)
    row_sq = torch.rand(D_IN, generator=gen) * 4.0  # (d_in,)
    grad = (torch.rand(D_OUT, D_IN, generator=gen) * 10.0).to(grad_dtype)  # (d_out, d_in)
    return weight, _Stats(row_sq_norms=row_sq, grad_norm=grad, nsamples=4)


def linear_with(weight: Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def naive_score(weight: Tensor, stats: _Stats, score: str = "combined") -> Tensor:
    """Entry by entry: fp32 activation term + (|W| * G in the promoted dtype) cast to fp32; the
    gradient-only score (the published ``prune_gradient``) widens both factors first."""
    G = stats.grad_norm
    out = torch.zeros(weight.shape, dtype=torch.float32)
    product_dtype = torch.promote_types(weight.dtype, G.dtype) if G is not None else None
    for i in range(weight.shape[0]):
        for j in range(weight.shape[1]):
            w = weight[i, j].abs()
            act = w.float() * stats.row_sq_norms[j].float().sqrt()
            grad = None
            if G is not None:
                grad = (w.to(product_dtype) * G[i, j].to(product_dtype)).float()
            if score == "gradient":
                grad = w.float() * G[i, j].float()
            out[i, j] = {"combined": act + grad, "activation": act, "gradient": grad}[score]
    return out


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_combined_score_matches_naive_loop(
    grad_dtype: torch.dtype, weight_dtype: torch.dtype
) -> None:
    weight, stats = layer_stats(grad_dtype=grad_dtype)
    weight = weight.to(weight_dtype)
    score = scored(GBLMPruner(), weight, stats)
    assert score.dtype == torch.float32
    assert torch.equal(score, naive_score(weight, stats))


def test_fp16_model_with_fp16_accumulators_keeps_the_fp16_product() -> None:
    """Both factors fp16 (the published fp16 model): ``|W| * G`` of the combined score is rounded
    to fp16 (published ``prune_gblm``), then widened for the sum."""
    weight, stats = layer_stats(grad_dtype=torch.float16)
    weight = weight.half()
    stats.row_sq_norms = torch.zeros(D_IN)  # the activation term adds 0: the product is seen
    score = scored(GBLMPruner(), weight, stats)
    fp16_product = (weight.abs() * stats.grad_norm).float()
    assert torch.equal(score, fp16_product)
    assert not torch.equal(score, weight.abs().float() * stats.grad_norm.float())


def _published_gradient_mask(weight: Tensor, grad: Tensor, ratio: float) -> Tensor:
    """The published gradient-only ablation (GBLM-Pruner's ``prune_gradient``), written out:
    ``W_metric = |W|.to(fp32) * |G|.to(fp32)``, per row the ``int(d_in * ratio)`` lowest of a
    stable sort pruned."""
    metric = torch.abs(weight).to(torch.float32) * torch.abs(grad).to(torch.float32)
    order = torch.sort(metric, dim=-1, stable=True)[1]
    mask = torch.zeros_like(metric, dtype=torch.bool)
    mask.scatter_(1, order[:, : int(metric.shape[1] * ratio)], True)
    return mask


def test_gradient_only_score_of_an_fp16_model_is_the_published_fp32_product() -> None:
    """``score=gradient`` on an fp16 model with fp16 norms (the published protocol): the
    published ``prune_gradient`` widens both factors to fp32 before the product, so products that
    fp16 rounds to one value keep their order."""
    gen = torch.Generator().manual_seed(2)  # here fp16 products flip 2 entries of the mask
    d_out, d_in = 64, 128
    weight = torch.randn(d_out, d_in, generator=gen).half()
    grad = (torch.rand(d_out, d_in, generator=gen) * 10.0).half()
    stats = _Stats(grad_norm=grad, nsamples=4)
    expected = _published_gradient_mask(weight, grad, 0.5)
    linear = linear_with(weight).half()
    mask = pruned(GBLMPruner(score="gradient"), linear, stats, Sparsity(0.5))
    assert torch.equal(mask, expected)


def _published_mask(weight: Tensor, row_sq: Tensor, grad: Tensor, ratio: float) -> Tensor:
    """The published GBLM-Pruner selection, written out independently of gblm.pruning.

    ``W_metric = |W| * sqrt(scaler_row) + |W| * grad`` with torch's type promotion, then per row
    the ``int(d_in * ratio)`` lowest entries of a stable sort are pruned (True = pruned).
    """
    metric = torch.abs(weight) * torch.sqrt(row_sq.reshape((1, -1)))
    metric = metric + torch.abs(weight) * grad
    order = torch.sort(metric, dim=-1, stable=True)[1]
    mask = torch.zeros_like(metric, dtype=torch.bool)
    mask.scatter_(1, order[:, : int(metric.shape[1] * ratio)], True)
    return mask


def test_fp32_model_with_fp16_accumulators_gives_the_published_mask() -> None:
    """The fp32 weight is not rounded to fp16 before ``|W| * G``: near-ties keep their order."""
    gen = torch.Generator().manual_seed(3)
    d_out, d_in = 64, 128
    weight = torch.randn(d_out, d_in, generator=gen)  # fp32 model
    row_sq = torch.full((d_in,), 1e-12)  # a negligible activation term: the gradient term decides
    grad = (torch.rand(d_out, d_in, generator=gen) * 10.0).half()  # fp16 accumulators
    expected = _published_mask(weight, row_sq, grad, 0.5)
    stats = _Stats(row_sq_norms=row_sq, grad_norm=grad, nsamples=4)
    linear = linear_with(weight)
    mask = pruned(GBLMPruner(), linear, stats, Sparsity(0.5))
    assert torch.equal(mask, expected)
    # The old rounding of |W| to fp16 before the product flips near-tie entries here.
    rounded = (weight.abs().half() * grad).float() + weight.abs() * row_sq.sqrt()
    old_order = torch.sort(rounded, dim=-1, stable=True)[1]
    old = torch.zeros_like(mask).scatter_(1, old_order[:, : d_in // 2], True)
    assert not torch.equal(old, expected)


@pytest.mark.parametrize("kind", ["gradient", "activation"])
def test_single_term_scores(kind: str) -> None:
    weight, stats = layer_stats(seed=1)
    pruner = GBLMPruner(score=kind)
    assert torch.equal(scored(pruner, weight, stats), naive_score(weight, stats, kind))
    # The unused statistic is not needed.
    if kind == "gradient":
        stats.row_sq_norms = None
    else:
        stats.grad_norm = None
    scored(GBLMPruner(score=kind), weight, stats)


def test_declared_work_follows_the_score() -> None:
    combined = GBLMPruner()
    assert combined.stats == {"row_sq"} and combined.dense_pass == "gradients"
    gradient_only = GBLMPruner(score="gradient")
    assert gradient_only.stats == frozenset() and gradient_only.dense_pass == "gradients"
    activation_only = GBLMPruner(score="activation")
    assert activation_only.stats == {"row_sq"} and activation_only.dense_pass is None


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_exact_pruned_count_per_row(ratio: float) -> None:
    weight, stats = layer_stats(seed=2)
    linear = linear_with(weight)
    mask = pruned(GBLMPruner(), linear, stats, Sparsity(ratio))
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert (mask.sum(dim=1) == int(D_IN * ratio)).all()
    assert (linear.weight[mask] == 0).all()
    assert torch.equal(linear.weight[~mask], weight[~mask])
    # The pruned entries are the lowest scores of each row.
    score = naive_score(weight, stats)
    for i in range(D_OUT):
        assert score[i][mask[i]].max() <= score[i][~mask[i]].min()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_nm_masks_are_valid(n: int, m: int) -> None:
    weight, stats = layer_stats(seed=3)
    linear = linear_with(weight)
    mask = pruned(GBLMPruner(), linear, stats, Sparsity(n / m, n, m))
    groups = mask.reshape(D_OUT, D_IN // m, m)
    assert (groups.sum(dim=-1) == n).all()
    score = naive_score(weight, stats).reshape(D_OUT, D_IN // m, m)
    assert (
        score.masked_fill(~groups, -math.inf).amax(-1)
        <= score.masked_fill(groups, math.inf).amin(-1)
    ).all()
    assert (linear.weight[mask] == 0).all()


def test_layer_comparison_group() -> None:
    weight, stats = layer_stats(seed=4)
    mask = pruned(GBLMPruner(comparison_group="layer"), linear_with(weight), stats, Sparsity(0.5))
    assert mask.sum() >= int(weight.numel() * 0.5)
    assert mask.sum(dim=1).unique().numel() > 1  # one threshold for the matrix, not per row


@pytest.fixture(scope="module")
def tiny_model_norms() -> tuple[nn.Module, dict[str, dict[str, Tensor]]]:
    model = build_tiny_model(tiny_config("llama", vocab_size=256), seed=0)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))  # (N, T)
    norms = {
        "l1": gradient_norms(model, ids, GradientSettings(norm="l1"), progress=False),
        "l2": gradient_norms(model, ids, GradientSettings(norm="l2"), progress=False),
        "zero": gradient_norms(model, ids, GradientSettings(scale=0.0), progress=False),
    }
    return model, norms


def row_sq_for(weight: Tensor, name: str) -> Tensor:
    """A made-up activation statistic (d_in,), fixed per Linear name."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.rand(weight.shape[1], generator=gen)


def masks_for(model: nn.Module, norms: dict[str, Tensor], pruner: GBLMPruner) -> dict[str, Tensor]:
    modules = dict(model.named_modules())
    masks = {}
    for name, grad_norm in norms.items():
        weight = modules[name].weight.detach()
        stats = _Stats(row_sq_norms=row_sq_for(weight, name), grad_norm=grad_norm, nsamples=3)
        masks[name] = pruned(pruner, linear_with(weight), stats, Sparsity(0.5), name)
    return masks


def test_zero_scale_gives_exactly_wandas_mask(tiny_model_norms) -> None:
    model, norms = tiny_model_norms
    assert not any(g.any() for g in norms["zero"].values())
    gblm = masks_for(model, norms["zero"], GBLMPruner(scale=0.0))
    modules = dict(model.named_modules())
    for name in norms["zero"]:
        weight = modules[name].weight.detach()
        row_sq = row_sq_for(weight, name)
        wanda = unstructured_row_mask(weight.abs() * torch.sqrt(row_sq).reshape(1, -1), 0.5)
        assert torch.equal(gblm[name], wanda), name
    with_grads = masks_for(model, norms["l1"], GBLMPruner())
    assert any(not torch.equal(with_grads[n], gblm[n]) for n in gblm)


def test_l1_and_l2_give_different_masks(tiny_model_norms) -> None:
    model, norms = tiny_model_norms
    l1 = masks_for(model, norms["l1"], GBLMPruner(norm="l1"))
    l2 = masks_for(model, norms["l2"], GBLMPruner(norm="l2"))
    assert set(l1) == set(l2) and len(l1) == 14
    assert any(not torch.equal(l1[n], l2[n]) for n in l1)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"norm": "l3"}, "method.norm"),
        ({"score": "taylor"}, "method.score"),
        ({"accumulator_dtype": "int8"}, "method.accumulator_dtype"),
        ({"comparison_group": "column"}, "method.comparison_group"),
        ({"scale": -1.0}, "method.scale"),
        ({"scale": float("nan")}, "method.scale"),
        ({"scale": "100"}, "method.scale"),
        ({"gradient_group_size": 0}, "method.gradient_group_size"),
        ({"gradient_group_size": 1.5}, "method.gradient_group_size"),
        ({"gradient_group_size": True}, "method.gradient_group_size"),
        ({"gradient_blockwise": "yes"}, "method.gradient_blockwise"),
    ],
)
def test_invalid_options_raise(kwargs: dict, key: str) -> None:
    from gblm.errors import ConfigError
    from gblm.methods.registry import build_method

    with pytest.raises(ConfigError, match=key):
        build_method("gblm", **kwargs)


def test_missing_or_mismatched_statistics_raise() -> None:
    weight, stats = layer_stats()
    with pytest.raises(ValueError, match="gradient"):
        scored(GBLMPruner(), weight, _Stats(row_sq_norms=stats.row_sq_norms))
    with pytest.raises(ValueError, match="row_sq_norms"):
        scored(GBLMPruner(), weight, _Stats(grad_norm=stats.grad_norm))
    with pytest.raises(ValueError, match="does not match"):
        scored(
            GBLMPruner(),
            weight,
            _Stats(row_sq_norms=stats.row_sq_norms, grad_norm=stats.grad_norm.T),
        )
    with pytest.raises(ValueError, match="method.score"):
        gblm_score(weight, stats.row_sq_norms, stats.grad_norm, "both")


def test_gradient_stage_settings_are_held_once() -> None:
    pruner = GBLMPruner(norm="l2", scale=10, accumulator_dtype="float32", gradient_group_size=4)
    assert pruner.gradients == GradientSettings("l2", 10.0, "float32", False, 4)
    assert pruner.gradients.torch_accumulator_dtype == torch.float32
