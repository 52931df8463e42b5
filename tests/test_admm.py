"""The ADMM pruner (``method=admm``): its gradual schedule, its published quirks, its masks."""

from __future__ import annotations

import pytest
import torch

from gblm.pruning.admm import admm_prune, admm_update, gradual_keep

D_OUT, D_IN = 12, 32


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(D_OUT, D_IN, generator=gen)
    x = torch.randn(64, D_IN, generator=gen) @ (torch.eye(D_IN) + 0.3 * torch.randn(D_IN, D_IN))
    return weight, x.T @ x


def _schedule(ratio: float, step: int, gradual: int = 15) -> float:
    return ratio - ratio * (1 - (step + 1) / gradual) ** 3


def test_schedule_known_values():
    assert _schedule(0.5, 14) == 0.5
    assert _schedule(0.5, 0) == pytest.approx(0.5 * (1 - (14 / 15) ** 3))


def test_per_output_mask_follows_the_cubic_schedule():
    values = torch.randn(D_IN, D_OUT)  # (d_in, d_out): the normalised layout
    for step in (0, 4, 14):
        keep = gradual_keep(values, 0.5, step, 15, two_of_four=False, per_output=True)
        pruned = (~keep).sum(dim=0)  # per output
        assert pruned.tolist() == [int(D_IN * _schedule(0.5, step))] * D_OUT


def test_per_layer_mask_is_at_the_target_from_the_first_step():
    """The published quirk: per layer, the re-chosen mask uses s, not the schedule's s_t."""
    values = torch.randn(D_IN, D_OUT)
    keep = gradual_keep(values, 0.6, 0, 15, two_of_four=False, per_output=False)
    assert int((~keep).sum()) == int(values.numel() * 0.6)


def test_two_of_four_gradual_keeps_each_groups_top_two():
    values = torch.randn(D_IN, D_OUT)
    keep = gradual_keep(values, 0.7, 0, 15, two_of_four=True, per_output=False)  # s forced to 0.5
    assert int((~keep).sum()) == int(values.numel() * _schedule(0.5, 0))
    groups = values.abs().T.reshape(-1, 4)
    top2 = groups.topk(2, dim=1).indices
    assert bool(keep.T.reshape(-1, 4).gather(1, top2).all())
    final = gradual_keep(values, 0.7, 14, 15, two_of_four=True, per_output=False)
    assert (~final).T.reshape(-1, 4).sum(dim=1).tolist() == [2] * (values.numel() // 4)


@pytest.mark.parametrize(
    ("ratio", "kwargs"),
    [(0.5, {}), (0.7, {}), (0.6, {"per_output": True}), (0.5, {"two_of_four": True})],
)
def test_pruner_reaches_its_target(ratio, kwargs):
    weight, gram = _problem(1)
    updated, mask = admm_prune(weight, gram, ratio, **kwargs)
    assert mask.shape == weight.shape
    assert torch.equal(updated == 0, mask)  # no kept weight is exactly 0 here
    if kwargs.get("two_of_four"):
        assert mask.reshape(-1, 4).sum(dim=1).tolist() == [2] * (weight.numel() // 4)
    elif kwargs.get("per_output"):
        assert mask.sum(dim=1).tolist() == [int(D_IN * ratio)] * D_OUT
    else:
        assert int(mask.sum()) == int(weight.numel() * ratio)


def test_without_the_schedule_it_is_the_update_of_its_first_mask():
    weight, gram = _problem(2)
    updated, mask = admm_prune(weight, gram, 0.5, per_output=True, gradual=0)
    assert torch.equal(updated, admm_update(weight, gram, mask))
    # its first mask is Wanda's: |W| * ||X_j|| per output row
    score = weight.abs() * (gram.diagonal().sqrt() + 1e-8)
    assert torch.equal(
        mask, score <= score.sort(dim=1)[0][:, int(D_IN * 0.5) - 1 : int(D_IN * 0.5)]
    )


# method=admm ----------------------------------------------------------------------------------
def test_method_prunes_the_tiny_model_and_refuses_other_n_m(tmp_path):
    import json

    from gblm.config import ConfigError, build_method, to_plain, validate
    from gblm.run import run
    from tests.conftest import compose_config
    from tests.test_run import SMALL

    cfg = compose_config("model=tiny_llama", "method=admm", "sparsity=nm_2_4", *SMALL)
    metrics = run(cfg, run_dir=tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["status"] == metrics["status"] == "finished"
    assert on_disk["mask_stats"]["nm_valid"] is True
    assert on_disk["sparsity_check"]["overall"] == 0.5
    for overrides, needle in (
        (["method=admm", "sparsity=nm_4_8"], "sparsity=nm_2_4"),
        (["method=admm", "reconstruct=obs"], "reconstruct=none"),
        (["method=admm", "method.comparison_group=row_wise"], "row, layer"),
    ):
        with pytest.raises(ConfigError, match=needle):  # in the validation, or the build
            build_method(validate(to_plain(compose_config("model=tiny_llama", *overrides))))


@pytest.mark.parametrize("group", ["layer", "row"])
def test_method_reaches_the_target_per_layer_and_per_row(group):
    from gblm.calibration.sequential import prune_model
    from gblm.methods.admm import AdmmPruner
    from gblm.models.tiny import build_tiny_model, tiny_config
    from gblm.pruning.sparsity import Sparsity

    model = build_tiny_model(tiny_config("llama", vocab_size=256), seed=0)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    masks = prune_model(model, AdmmPruner(group), Sparsity(0.6), ids, device="cpu", progress=False)
    for name in masks:
        mask = masks[name]
        if group == "row":
            assert mask.sum(dim=1).tolist() == [int(mask.shape[1] * 0.6)] * mask.shape[0]
        else:
            assert int(mask.sum()) == int(mask.numel() * 0.6)
        assert bool((model.get_submodule(name).weight[mask] == 0).all())
