"""Composition of every group option, and clear errors for bad values before any model loads."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from gblm.config import ConfigError, to_plain, validate
from gblm.models.loading import ModelUnavailableError, check_model_available
from tests.conftest import CONF, compose_config


def _settings(*overrides: str):
    return validate(to_plain(compose_config(*overrides)))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("method", _options("method"))
@pytest.mark.parametrize("sparsity", _options("sparsity"))
def test_every_method_and_sparsity_composes_and_instantiates(method, sparsity):
    from gblm.config import build_method

    s = _settings(f"method={method}", f"sparsity={sparsity}")
    assert s.method_name == method
    if (method, sparsity) == ("admm", "nm_4_8"):  # the published ADMM pruner knows 2:4 only
        with pytest.raises(ConfigError, match="nm_2_4"):
            build_method(s)
        return
    pruner = build_method(s)
    assert (pruner is None) == (method == "dense")
    assert s.sparsity.ratio == 0.5


@pytest.mark.parametrize("method", _options("method"))
@pytest.mark.parametrize("update", _options("reconstruct"))
def test_every_method_and_update_composes_or_is_refused(method, update):
    from gblm.config import build_method

    s = _settings(f"method={method}", f"reconstruct={update}")
    refused = update != "none" and method in ("dense", "sparsegpt", "admm")
    if refused:
        with pytest.raises(ConfigError, match="reconstruct=none"):
            build_method(s)
        return
    pruner = build_method(s)
    assert (pruner.update.name if pruner and pruner.update else "none") == update


@pytest.mark.parametrize("group", ["model", "calibration", "eval", "logger"])
def test_every_group_option_validates(group):
    for option in _options(group):
        extra = ["model.name_or_path=some/model"] if option == "hf" else []
        extra += ["model.run_dir=some/run"] if option == "saved" else []
        extra += (
            ["calibration.paths=[a.txt]"] if (group, option) == ("calibration", "local") else []
        )
        _settings(f"{group}={option}", *extra)


def test_experiment_demo_is_small():
    s = _settings("experiment=demo")
    assert (s.method_name, s.calibration.nsamples, s.calibration.seqlen) == ("gblm", 32, 256)
    assert (
        s.eval.perplexity.seqlen == 256
        and s.eval.zeroshot.enabled
        and s.eval.zeroshot.tasks == ["austen_cloze"]
    )


def test_unknown_group_option_lists_the_allowed_ones():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("method=pruneall")
    text = str(err.value)
    assert "method/pruneall" in text


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["sparsity.ratio=1.0"], "sparsity.ratio=1.0"),
        (["sparsity.ratio=-0.1"], "[0, 1)"),
        (["sparsity=nm_2_4", "sparsity.ratio=0.6"], "N/M = 0.5"),
        (["sparsity=nm_2_4", "sparsity.n=4"], "0 < N < M"),
        (["sparsity.n=2"], "set both"),
        (["calibration.source=imagenet"], "calibration.source='imagenet'"),
        (["calibration.nsamples=0"], "calibration.nsamples"),
        (["calibration.sampling=random"], "stream, documents"),
        (["eval.perplexity.dataset=ptb"], "eval.perplexity.dataset"),
        (["dtype=float8"], "model.dtype"),
        (["device=tpu"], "device='tpu'"),
        (["calibration=local"], "needs calibration.paths=["),
        (["model=hf"], "model.name_or_path must be set"),
        (["model=saved"], "model.run_dir must be set"),
        (["method=wanda", "sparsity.ratio=0"], "method=dense"),
        (["method.name=pruneall"], "method.name='pruneall'"),
        (["sparsity=per_block", "sparsity.per_block=[0.5,1.0]"], "sparsity.per_block[1]=1.0"),
        (["sparsity=per_block", "sparsity.per_block=[-0.1]"], "[0, 1)"),
        (["sparsity=per_block", "sparsity.per_block=[]"], "sparsity.per_block=[]"),
        (
            ["sparsity=per_block", "sparsity.n=2", "sparsity.m=4", "sparsity.per_block=[0.5,0.5]"],
            "sparsity.per_block with N:M 2:4",
        ),  # fmt: skip
        (["method=wanda", "sparsity=per_block", "sparsity.per_block=[0,0]"], "method=dense"),
        (["sparsity.allocator=fancy"], "sparsity.allocator='fancy' is not allowed: choose one of"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(overrides, needle):
    from gblm.config import build_method, build_plan

    with pytest.raises(ConfigError) as err:
        s = _settings(*overrides)
        build_method(s), build_plan(s)
    assert needle in str(err.value)


def test_unknown_method_name_lists_the_registry():
    from gblm.methods.registry import method_names

    with pytest.raises(ConfigError) as err:
        _settings("method.name=pruneall")
    assert ", ".join(method_names()) in str(err.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("calibration.nsamples=abc", "calibration.nsamples"),
        ("save_model=maybe", "save_model"),
        ("eval.perplexity.batch_size=1.5", "eval.perplexity.batch_size"),
        ("sparsity.per_block=[0.5,half]", "sparsity.per_block[1]"),
    ],
)
def test_value_of_the_wrong_type_fails_at_composition_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(override)
    assert override in str(err.value) and f"full_key: {key}" in str(err.value.__cause__)


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ({"calibration": {"nsamples": "abc"}}, "calibration.nsamples"),
        ({"save_model": "maybe"}, "save_model"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_plain_dict_of_the_wrong_type_is_a_config_error_naming_the_key(value, key):
    cfg = to_plain(compose_config())
    for name, node in value.items():
        cfg[name] = {**cfg[name], **node} if isinstance(node, dict) else node
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        validate(cfg)


@pytest.mark.parametrize("word", ["no", "off", "false", "0"])
def test_string_booleans_become_real_booleans(word):
    s = _settings(f"save_model={word}", f"eval.perplexity.enabled={word}", f"progress={word}")
    assert (s.save_model, s.eval.perplexity.enabled, s.progress) == (False, False, False)
    s = _settings("save_model=yes", "eval.perplexity.dense=on")
    assert s.save_model is True and s.eval.perplexity.dense is True
    cfg = to_plain(compose_config())
    cfg["save_model"] = word  # a plain dict (not composed) gets the same conversion
    assert validate(cfg).save_model is False


def test_per_block_schedule_reaches_the_plan():
    from gblm.config import build_plan

    s = _settings("method=wanda", "sparsity=per_block", "sparsity.per_block=[0.25,0.5]")
    assert s.sparsity.per_block == [0.25, 0.5] and s.sparsity.ratio == 0.5
    assert build_plan(s).block_targets() == [0.25, 0.5]
    assert (
        _settings().sparsity.per_block is None and build_plan(_settings()).block_targets() is None
    )


def test_method_options_are_the_method_class_keywords():
    from gblm.config import build_method
    from gblm.methods.registry import ENTRY_KEYS

    s = _settings("method=gblm", "method.gradient_group_size=4")
    assert s.method["gradient_group_size"] == 4 and s.method["name"] == "gblm"
    assert set(ENTRY_KEYS) <= set(s.method)
    assert build_method(s).gradients.group_size == 4
    with pytest.raises(ConfigError, match="method.gradient_group_size=-4"):
        _settings("method=gblm", "method.gradient_group_size=-4")


def _differences(own: dict, schema: dict, where: str) -> None:
    """Assert that every key of a group file is in the schema with another value than its default."""
    for key, value in own.items():
        assert key in schema, f"{where}: {key} is not in the schema"
        default = schema[key]
        if isinstance(value, dict) and isinstance(default, dict) and default:
            _differences(value, default, f"{where}: {key}")
        else:
            assert value != default, f"{where} repeats the default {key}={value}"


@pytest.mark.parametrize("group", ["model", "sparsity", "calibration", "eval", "logger"])
def test_group_files_hold_only_what_differs_from_the_schema(group):
    from omegaconf import OmegaConf

    from gblm.config import RunConf

    whole = OmegaConf.to_container(OmegaConf.structured(RunConf))
    for option in _options(group):
        path = CONF / group / f"{option}.yaml"
        own = OmegaConf.to_container(OmegaConf.load(path)) or {}
        own.pop("defaults", None)
        if group == "sparsity":  # an allocator's file names itself, the default one too
            own.pop("allocator", None), own.pop("_target_", None)
        # a file of the global package (a tiny model with its sizes) sets keys of several groups
        is_global = path.read_text().startswith("# @package _global_")
        _differences(own, whole if is_global else whole[group], f"{group}/{option}.yaml")


def test_bad_method_option_is_a_config_error():

    with pytest.raises(ConfigError, match="method.colour is not an option of WandaPruner"):
        _settings("method=wanda", "+method.colour=blue")


def test_missing_model_path_fails_fast(tmp_path):
    s = _settings("model=hf", f"model.name_or_path={tmp_path}/nope")
    with pytest.raises(ModelUnavailableError, match="no such model directory"):
        check_model_available(s.model)


def test_hub_model_offline_says_how_to_supply_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from gblm import paths

    paths.hub_reachable.cache_clear()
    s = _settings("model=llama2_7b")
    with pytest.raises(ModelUnavailableError, match="model.name_or_path=DIR"):
        check_model_available(s.model)
    paths.hub_reachable.cache_clear()


def test_no_location_names_a_run_folder() -> None:
    """A folder, file or hub repo in the overrides would nest the run folder by its slashes (and
    carry a machine's paths into W&B run names): locations are left out of every name."""
    from omegaconf import OmegaConf

    from gblm.sweep import override_dirname

    naming = OmegaConf.load(CONF / "config.yaml").hydra.job.config.override_dirname
    locations = ["model.name_or_path=/m", "model.run_dir=/r/1", "model.offload_folder=/o",
                 "calibration.paths=[/a.txt]", "eval.perplexity.paths=[/b.txt]",
                 "eval.zeroshot.include_path=/tasks", "push_to_hub=me/pruned"]  # fmt: skip
    assert override_dirname(["model=saved", *locations, "method=wanda"], naming) == (
        "method=wanda,model=saved"
    )


def test_a_run_folder_is_named_by_its_overrides_without_a_dangling_separator() -> None:
    """``${gblm.named:...}`` after the time: ``_<overrides>`` (commas and all), or nothing."""
    from omegaconf import OmegaConf

    for overrides, name in (("", "12-00-00"), ("method=gblm,sparsity.ratio=0.6",
                                               "12-00-00_method=gblm,sparsity.ratio=0.6")):  # fmt: skip
        cfg = OmegaConf.create({"o": overrides, "dir": "12-00-00${gblm.named:${o}}"})
        assert cfg.dir == name
    hydra_run = OmegaConf.load(CONF / "config.yaml").hydra.run
    assert OmegaConf.to_container(hydra_run)["dir"].endswith(
        "${gblm.named:${hydra.job.override_dirname}}"
    )
