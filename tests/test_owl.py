"""OWL: the published known answers, the dense statistic, and OWL with every method."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gblm.calibration.hooks import attached_hooks
from gblm.calibration.sequential import prune_model
from gblm.methods.base import RunContext
from gblm.methods.owl import OWLPlan, outlier_ratio, owl_block_n, owl_block_ratios
from gblm.methods.registry import build_method
from gblm.methods.wanda import activation_term
from gblm.models.layers import decoder_layers, prunable_linears
from gblm.models.tiny import build_tiny_model, tiny_config
from gblm.pruning.sparsity import Sparsity

VOCAB, N, T, BLOCKS = 256, 4, 16, 4
CPU = RunContext(device=torch.device("cpu"), model_dtype=torch.float32, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    return build_tiny_model(tiny_config("llama", vocab_size=VOCAB, num_layers=BLOCKS), seed=0)


def _windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (N, T), generator=torch.Generator().manual_seed(3))


def test_known_block_ratios() -> None:
    ratios = owl_block_ratios([1, 2, 3, 5], 0.7, 0.08)
    assert ratios == pytest.approx([0.77, 0.73, 0.69, 0.61], abs=1e-12)
    assert sum(ratios) / 4 == pytest.approx(0.7)


def test_known_outlier_ratio_strict() -> None:
    assert outlier_ratio([torch.tensor([1.0] * 9 + [11.0])], 5) == 10.0
    assert outlier_ratio([torch.tensor([0.0] * 4 + [5.0])], 5) == 0.0  # 5 > 5 * 1 is false
    assert outlier_ratio([torch.ones(3), torch.tensor([1.0] * 6 + [11.0])], 5) == 10.0


def test_outlier_ratio_matches_a_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(5, 7, generator=gen) ** 4, torch.rand(3, 7, generator=gen) ** 4]
    values = [v for s in scores for v in s.flatten().tolist()]
    mean = sum(values) / len(values)
    for m in (1.5, 3, 5):
        expected = 100 * sum(v > m * mean for v in values) / len(values)
        assert outlier_ratio(scores, m) == pytest.approx(expected)


def test_known_nm_counts_half_to_even_and_uniform_fallback() -> None:
    assert owl_block_n([0, 1], 4, 2) == [5, 3]
    assert owl_block_n([0, 1, 2], 4, 1) == [4, 4, 4]  # round([-0.5, 0, 0.5]): half to even
    assert owl_block_n([0, 1, 2], 4, 3) == [6, 4, 2]  # round([-1.5, 0, 1.5]) = [-2, 0, 2]
    assert owl_block_n([3, 3], 4, 2) == [4, 4]
    assert owl_block_ratios([2.0, 2.0, 2.0], 0.6, 0.08) == [0.6, 0.6, 0.6]  # our fallback


def test_clamp_as_published_and_without() -> None:
    assert owl_block_ratios([0, 10], 0.05, 0.08) == pytest.approx([0.13, 0.01])
    assert owl_block_ratios([0, 10], 0.05, 0.08, clamp=False) == pytest.approx([0.13, -0.03])
    plan = OWLPlan(Sparsity(0.05), clamp=False)
    with pytest.raises(ValueError, match="block 1"):
        plan.set_outlier_ratios([0, 10])


def _dense_outlier_ratios(model: nn.Module, windows: torch.Tensor, m: float) -> list[float]:
    """Hooks on every Linear of the dense model, one full forward per window: the statistic."""
    sums: dict[nn.Module, torch.Tensor] = {}

    def hook(module, args, _out):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        sums[module] = sums.get(module, 0) + (x**2).sum(dim=0)

    blocks = decoder_layers(model)
    linears = [lin for b in blocks for lin in prunable_linears(b).values()]
    with torch.no_grad(), attached_hooks([(lin, hook) for lin in linears]):
        for window in windows:
            model(window.reshape(1, -1))
    ratios = []
    for block in blocks:
        scores = [
            activation_term(lin.weight.data, sums[lin] / len(windows))
            for lin in prunable_linears(block).values()
        ]
        ratios.append(outlier_ratio(scores, m))
    return ratios


def test_outlier_ratios_come_from_the_dense_model_and_change_nothing() -> None:
    model, windows = _model(), _windows()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = OWLPlan(Sparsity(0.7), lmbda=0.08, outlier_m=3)
    plan.prepare(model, windows, CPU)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert plan.outlier_ratios == pytest.approx(_dense_outlier_ratios(model, windows, 3), rel=1e-4)
    assert len(plan.block_targets()) == BLOCKS
    assert sum(plan.block_targets()) / BLOCKS == pytest.approx(0.7)


METHODS = {
    "magnitude": {},
    "wanda": {},
    "sparsegpt": {},
    "gblm": {},
    "ria": {},
    "magnitude_row": {"comparison_group": "row"},
}


def _prune_with_owl(method_name: str, sparsity: Sparsity, lmbda: float):
    name = method_name.split("_")[0]
    model, windows = _model(), _windows()
    method = build_method(name, **METHODS[method_name])
    plan = OWLPlan(sparsity, lmbda=lmbda, outlier_m=3)
    plan.prepare(model, windows, CPU)
    method.prepare(model, windows, CPU)
    calib = windows if method.needs_calibration else None
    masks = prune_model(model, method, plan, calib, device="cpu", progress=False)
    return plan, masks


@pytest.mark.parametrize("method_name", list(METHODS))
def test_owl_with_every_method_reaches_the_target_mean(method_name: str) -> None:
    plan, masks = _prune_with_owl(method_name, Sparsity(0.6), lmbda=0.08)
    targets = plan.block_targets()
    assert len(set(targets)) > 1  # the blocks really differ
    per_block = [[] for _ in range(BLOCKS)]
    for name in masks:
        per_block[int(name.split(".")[2])].append(masks[name])
    achieved = [torch.cat([m.flatten() for m in ms]).float().mean().item() for ms in per_block]
    for got, want in zip(achieved, targets, strict=True):
        assert got == pytest.approx(want, abs=1.5 / 64 + 1e-3)  # int(d_in * s_b) per row
    assert sum(achieved) / BLOCKS == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("method_name", ["magnitude", "wanda", "sparsegpt", "gblm", "ria"])
def test_owl_nm_gives_valid_per_block_nm(method_name: str) -> None:
    plan, masks = _prune_with_owl(method_name, Sparsity(0.5, 4, 8), lmbda=2.0)
    counts = [t.n for t in plan.targets]
    assert len(set(counts)) > 1 and all(0 < c < 8 for c in counts)
    for name in masks:
        n = counts[int(name.split(".")[2])]
        groups = masks[name].reshape(masks[name].shape[0], -1, 8).sum(dim=-1)
        assert (groups >= n).all() and (groups == n).float().mean() > 0.9, name


def test_run_records_owl_targets(tmp_path) -> None:
    from gblm.run import run
    from tests.conftest import compose_config

    cfg = compose_config(
        "model=tiny_llama",
        "method=wanda",
        "sparsity=owl",
        "sparsity.ratio=0.7",
        "sparsity.outlier_m=3",
        "calibration.nsamples=4",
        "calibration.seqlen=32",
        "eval.perplexity.max_windows=2",
        "progress=false",
        "mask_images=[]",
    )
    metrics = run(cfg, run_dir=tmp_path)
    assert (metrics["method"], metrics["method_label"]) == ("wanda", "wanda+owl")
    targets = metrics["sparsity"]["per_block_target"]
    assert len(targets) == len(metrics["sparsity"]["outlier_ratios"]) >= 2
    assert sum(targets) / len(targets) == pytest.approx(0.7)
    assert metrics["sparsity_check"]["overall"] == pytest.approx(0.7, abs=0.02)


def test_config_checks_the_allocator() -> None:
    from gblm.config import ConfigError, build_plan, to_plain, validate
    from gblm.methods.owl import OWLPlan
    from tests.conftest import compose_config

    s = validate(to_plain(compose_config("sparsity=owl", "sparsity.lmbda=0.1")))
    plan = build_plan(s)
    assert isinstance(plan, OWLPlan) and (plan.lmbda, plan.outlier_m, plan.clamp) == (
        0.1,
        5.0,
        None,
    )
    for bad in ("sparsity.allocator=fancy", "sparsity.lmbda=-1", "sparsity.outlier_m=0"):
        with pytest.raises(ConfigError, match="sparsity"):
            build_plan(validate(to_plain(compose_config("sparsity=owl", bad))))


def test_run_checks_owl_nm_against_each_blocks_n(tmp_path) -> None:
    from gblm.run import run
    from tests.conftest import compose_config

    cfg = compose_config(
        "model=tiny_llama",
        "method=wanda",
        "sparsity=owl",
        "sparsity.n=4",
        "sparsity.m=8",
        "sparsity.lmbda=2",
        "sparsity.outlier_m=3",
        "calibration.nsamples=4",
        "calibration.seqlen=32",
        "eval.perplexity.max_windows=2",
        "progress=false",
        "mask_images=[]",
    )
    metrics = run(cfg, run_dir=tmp_path)
    targets = metrics["sparsity"]["per_block_target"]
    assert len(set(targets)) > 1 and all(t * 8 == int(t * 8) for t in targets)
    assert metrics["mask_stats"]["nm_valid"] is True
