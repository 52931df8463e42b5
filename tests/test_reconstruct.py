"""Weight updates after the masks (``reconstruct=none|obs|admm``) composed with every mask method
and plan on the tiny models: the masks stay, the kept weights change, the layer's error drops."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor

from gblm.calibration.hooks import attached_hooks
from gblm.calibration.sequential import prune_model
from gblm.calibration.stats import LinearStats
from gblm.config import ConfigError, build_method, to_plain, validate
from gblm.methods.base import RunContext
from gblm.methods.plans import PerBlockPlan
from gblm.methods.registry import build_method as registry_method
from gblm.methods.registry import build_reconstruct, compose, reconstruct_names
from gblm.models.layers import decoder_layers, prunable_linears
from gblm.models.tiny import build_tiny_model, tiny_config
from gblm.pruning.sparsity import Sparsity
from gblm.run import run
from tests.conftest import compose_config
from tests.test_run import SMALL

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 256
MASK_METHODS = ("magnitude", "wanda", "gblm", "ria", "dsnot")


def _windows() -> Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


def _model(arch: str = "llama"):
    return build_tiny_model(tiny_config(arch, vocab_size=VOCAB), seed=0)


def _prune(
    method: str, update: str, target=None, arch: str = "llama", onload: bool = False, **options
):
    model, ids = _model(arch), _windows()
    target = target if target is not None else Sparsity(0.5)
    built = build_reconstruct(update, **options)
    pruner = compose(method, registry_method(method), built, Sparsity(0.5))
    pruner.prepare(model, ids, RunContext(device=torch.device("cpu"), model_dtype=torch.float32))
    masks = prune_model(model, pruner, target, ids, device="cpu", progress=False, onload=onload)
    return model, {name: masks[name] for name in masks}


def _block0_inputs(model, ids: Tensor) -> dict[str, Tensor]:
    """Every Linear's input in block 0 of ``model`` on ``ids`` (N * T, d_in)."""
    block, seen = decoder_layers(model)[0], {}
    linears = prunable_linears(block)

    def keep(name):
        def hook(_module, args, _output) -> None:
            seen.setdefault(name, args[0].reshape(-1, args[0].shape[-1]))

        return hook

    with attached_hooks([(lin, keep(name)) for name, lin in linears.items()]), torch.no_grad():
        model(ids)
    return seen


def test_registry_and_none_first():
    assert reconstruct_names() == ("none", "obs", "admm")
    assert build_reconstruct("none") is None


@pytest.mark.parametrize("method", MASK_METHODS)
@pytest.mark.parametrize("update", ["obs", "admm"])
def test_update_keeps_the_masks_and_lowers_the_error(method: str, update: str) -> None:
    plain, plain_masks = _prune(method, "none")
    updated, masks = _prune(method, update)
    assert list(masks) == list(plain_masks)
    for name, mask in plain_masks.items():
        if name.startswith("model.layers.0.") or method == "magnitude":  # the same inputs
            assert torch.equal(masks[name], mask), name  # the method's masks, unchanged
        assert int(masks[name].sum()) == int(mask.sum()), name  # later blocks: the same counts
        weight = updated.get_submodule(name).weight
        assert bool((weight[masks[name]] == 0).all()), name
    # block 0 sees the same inputs in both runs: each Linear's output error on them is lower
    dense = _model()
    inputs = _block0_inputs(dense, _windows())
    prefix = "model.layers.0."
    for name, x in inputs.items():
        w0 = dense.get_submodule(prefix + name).weight
        err_plain = (x @ (plain.get_submodule(prefix + name).weight - w0).T).norm()
        err_update = (x @ (updated.get_submodule(prefix + name).weight - w0).T).norm()
        assert err_update < err_plain, name


def test_none_changes_nothing():
    first, masks = _prune("wanda", "none")
    pruner = registry_method("wanda")
    model, ids = _model(), _windows()
    reference = prune_model(model, pruner, Sparsity(0.5), ids, device="cpu", progress=False)
    for name in masks:
        assert torch.equal(masks[name], reference[name])
    for (name, a), b in zip(first.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("update", ["obs", "admm"])
@pytest.mark.parametrize(
    "target", [Sparsity(0.5, 2, 4), PerBlockPlan(Sparsity(0.5), [0.3, 0.5, 0.6, 0.7])]
)
def test_update_with_n_m_and_per_block_plans(update, target):
    model, masks = _prune("wanda", update, target, arch="opt")
    _, plain = _prune("wanda", "none", target, arch="opt")
    for name, mask in plain.items():
        if ".layers.0." in name:
            assert torch.equal(masks[name], mask), name
        assert int(masks[name].sum()) == int(mask.sum()), name
        assert bool((model.get_submodule(name).weight[masks[name]] == 0).all())


@pytest.mark.parametrize("update", ["obs", "admm"])
def test_onloaded_walk_gives_the_in_memory_weights(update):
    memory, memory_masks = _prune("wanda", update)
    onloaded, masks = _prune("wanda", update, onload=True)
    for name, mask in memory_masks.items():
        assert torch.equal(masks[name], mask), name
    weights = memory.state_dict()
    for name, value in onloaded.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_disk_offloaded_model_gets_the_updated_weights(tmp_path):
    from tests.test_offload import _disk_offloaded, _stored_weights

    memory, memory_masks = _prune("magnitude", "admm")
    offloaded = _disk_offloaded("llama", tmp_path)
    ids = _windows()
    pruner = compose(
        "magnitude", registry_method("magnitude"), build_reconstruct("admm"), Sparsity(0.5)
    )
    masks = prune_model(offloaded, pruner, Sparsity(0.5), ids, device="cpu", progress=False)
    for name, mask in memory_masks.items():
        assert torch.equal(masks[name], mask), name
    stored = _stored_weights(offloaded)
    for name, value in memory.named_parameters():
        assert torch.equal(stored[name], value), name


def test_gram_statistic_is_the_plain_sum():
    x = torch.randn(3, 5, 4)
    stats = LinearStats.empty(frozenset({"gram"}), 4)
    for sample in x.split(1):
        stats.fold(sample)
    flat = x.reshape(-1, 4)
    assert torch.allclose(stats.gram, flat.T @ flat, atol=1e-5)


def _conf(*overrides):
    return validate(to_plain(compose_config("model=tiny_llama", *overrides)))


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["method=sparsegpt", "reconstruct=obs"], ["method=sparsegpt", "reconstruct=none"]),
        (["method=dense", "reconstruct=admm"], ["reconstruct=admm", "reconstruct=none"]),
        (["reconstruct=admm", "reconstruct.iters=-1"], ["reconstruct.iters=-1"]),
        (["reconstruct=obs", "+reconstruct.iters=3"], ["reconstruct.iters", "blocksize"]),
        (["method=ria", "reconstruct=obs", "reconstruct.iterative=true"], ["iterative=false"]),
        (["method=dsnot", "reconstruct=obs", "reconstruct.iterative=true"], ["wanda or gblm"]),
    ],
)
def test_bad_combinations_are_refused_when_the_method_is_built(overrides, needles):
    with pytest.raises(ConfigError) as err:
        build_method(_conf(*overrides))
    for needle in needles:
        assert needle in str(err.value)


def test_magnitude_with_an_update_calibrates_and_says_so(tmp_path):
    from gblm import pipeline
    from gblm.config import build_plan

    conf = _conf("method=magnitude", "reconstruct=obs", *SMALL)
    method, plan = build_method(conf), build_plan(conf)
    assert pipeline.needs_calibration(method, plan)
    assert "prune" in pipeline.planned_stages(conf, method, plan)
    plain = _conf("method=magnitude", *SMALL)
    assert not pipeline.needs_calibration(build_method(plain), build_plan(plain))


def test_run_records_the_update(tmp_path):
    cfg = compose_config("model=tiny_llama", "method=magnitude", "reconstruct=admm", *SMALL)
    metrics = run(cfg, run_dir=tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["status"] == metrics["status"] == "finished"
    assert on_disk["method_label"] == "magnitude+admm"
    assert on_disk["reconstruct"] == "admm"
    assert on_disk["reconstruct_settings"] == {"iters": 20, "rho": 1.0, "percdamp": 0.1}
    assert on_disk["run_name"].startswith("magnitude+admm_")
    assert 0 < on_disk["reconstruct_seconds"] < on_disk["timings"]["prune"]
    assert on_disk["sparsity_check"]["overall"] == pytest.approx(0.5, abs=1e-3)


def test_identity_includes_the_update_and_none_is_the_old_identity():
    from gblm.run import config_hash

    plain = to_plain(compose_config("model=tiny_llama", "method=wanda"))
    obs = to_plain(compose_config("model=tiny_llama", "method=wanda", "reconstruct=obs"))
    assert config_hash(plain) != config_hash(obs)
    older = {k: v for k, v in plain.items() if k != "reconstruct"}  # recorded before updates
    assert config_hash(older) == config_hash(plain)


def test_python_api_takes_an_update():
    import gblm

    model, reference = _prune("wanda", "obs")
    fresh = _model()
    result = gblm.prune(fresh, method="wanda", sparsity=0.5, calibration=_windows(),
                        device="cpu", progress=False, reconstruct="obs")  # fmt: skip
    for name in reference:
        assert torch.equal(result.masks[name], reference[name])
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="reconstruct=none"):
        gblm.prune(_model(), method="sparsegpt", calibration=_windows(), reconstruct="admm")


@pytest.mark.parametrize("method", ["magnitude", "wanda", "gblm"])
@pytest.mark.parametrize("target", [Sparsity(0.5), Sparsity(0.5, 2, 4)])
def test_iterative_obs_rechooses_the_mask_on_updated_weights(method, target):
    _, fixed = _prune(method, "obs", target, blocksize=16)
    model, masks = _prune(method, "obs", target, iterative=True, blocksize=16)  # several blocks
    assert any(not torch.equal(masks[name], fixed[name]) for name in fixed)
    for name, mask in masks.items():
        assert bool((model.get_submodule(name).weight[mask] == 0).all()), name
        if target.structured:
            assert mask.reshape(-1, 4).sum(dim=1).eq(2).all(), name
        else:  # one threshold per block of columns (<=): at least the target
            assert float(mask.float().mean()) >= 0.5, name
