"""The linear-with-depth allocator: a plug-in of three files (class, yaml, this test)."""

from __future__ import annotations

import pytest
import torch

from gblm.config import ConfigError, build_plan, to_plain, validate
from gblm.methods.linear import LinearPlan, linear_ratios
from gblm.methods.registry import build_method
from gblm.pruning.sparsity import Sparsity
from tests.conftest import compose_config


def test_ratios_rise_evenly_and_average_to_the_target():
    ratios = linear_ratios(0.5, 0.2, 5)
    assert ratios == pytest.approx([0.4, 0.45, 0.5, 0.55, 0.6])
    steps = [b - a for a, b in zip(ratios, ratios[1:], strict=False)]
    assert all(s == pytest.approx(0.05) for s in steps)
    for blocks in (1, 2, 7, 30):
        assert sum(linear_ratios(0.7, 0.1, blocks)) / blocks == pytest.approx(0.7)


def test_the_config_builds_it_with_its_option():
    conf = validate(to_plain(compose_config("sparsity=linear", "sparsity.spread=0.2")))
    plan = build_plan(conf)
    assert isinstance(plan, LinearPlan) and plan.spread == 0.2 and plan.label == "linear"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["sparsity.spread=-0.1"], "sparsity.spread=-0.1: allowed values are a finite number >= 0"),
        (["sparsity.spread=nan"], "sparsity.spread=nan"),
        (["sparsity.ratio=0.95", "sparsity.spread=0.2"], "both ends in [0, 1)"),
        (["sparsity=nm_2_4", "sparsity.allocator=linear"], "unstructured sparsity only"),
    ],
)
def test_bad_options_are_refused_before_the_model(overrides, needle):
    with pytest.raises(ConfigError) as err:
        build_plan(validate(to_plain(compose_config("sparsity=linear", *overrides))))
    assert needle in str(err.value)


def test_each_block_of_a_tiny_model_is_pruned_to_its_own_ratio(tiny_llama):
    from gblm import prune

    model = tiny_llama  # 2 blocks: ratios 0.4 and 0.6
    plan = LinearPlan(Sparsity(0.5), spread=0.2)
    result = prune(model, method=build_method("magnitude"), sparsity=plan, progress=False)
    by_block = {row["block"]: row["sparsity"] for row in result.per_block}
    assert by_block == pytest.approx({0: 0.4, 1: 0.6}, abs=1e-3)
    weights = [p for n, p in model.named_parameters() if "layers" in n and p.ndim == 2]
    assert sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) == (
        pytest.approx(0.5, abs=1e-3)
    )
    assert plan.record()["per_block_target"] == pytest.approx([0.4, 0.6])
    assert torch.isfinite(model(torch.ones(1, 4, dtype=torch.long)).logits).all()
