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
    from gblm.run import build_pruner

    s = _settings(f"method={method}", f"sparsity={sparsity}")
    assert s.method_name == method
    pruner = build_pruner(s)
    assert (pruner is None) == (method == "dense")
    assert s.sparsity.ratio == 0.5


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
        s.perplexity.seqlen == 256 and s.zeroshot.enabled and s.zeroshot.tasks == ["austen_cloze"]
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
        (["calibration=local"], "calibration.paths must be set"),
        (["model=hf"], "model.name_or_path must be set"),
        (["method=wanda", "sparsity.ratio=0"], "method=dense"),
        (["method=gblm", "method.loss_chunk_tokens=-4"], "method.loss_chunk_tokens=-4"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(overrides, needle):
    with pytest.raises(ConfigError) as err:
        _settings(*overrides)
    assert needle in str(err.value)


def test_bad_method_option_is_a_config_error():
    from gblm.run import build_pruner

    s = _settings("method=wanda", "+method.colour=blue")
    with pytest.raises(ConfigError, match="method=wanda"):
        build_pruner(s)


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
