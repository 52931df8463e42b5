"""NaN and infinite numbers: refused at load naming the tensor, never a "finished" NaN run."""

from __future__ import annotations

import json

import pytest
import torch

from gblm.errors import NonFiniteError
from gblm.models.loading import check_finite_weights
from gblm.run import run
from tests.conftest import compose_config, save_tiny_model

QUICK = (
    "calibration.nsamples=4",
    "calibration.seqlen=32",
    "eval.perplexity.max_windows=2",
    "progress=false",
    "mask_images=[]",
)
BAD = "model.layers.1.mlp.down_proj.weight"


def test_check_names_the_non_finite_tensor(tiny_llama):
    check_finite_weights(tiny_llama)  # a sound model passes
    with torch.no_grad():
        tiny_llama.get_parameter(BAD)[3, 5] = float("nan")
        tiny_llama.get_parameter("model.layers.0.self_attn.q_proj.weight")[0, 0] = float("inf")
    with pytest.raises(NonFiniteError) as err:
        check_finite_weights(tiny_llama, "model 'x'")
    text = str(err.value)
    assert "model.layers.0.self_attn.q_proj.weight holds 0 NaN and 1 infinite" in text
    assert BAD in text and "1 more tensors" in text


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_nan_weight_is_refused_at_load_and_the_run_is_failed(tmp_path, method):
    def poison(model):
        model.get_parameter(BAD)[0, 0] = float("nan")

    model_dir = save_tiny_model(tmp_path / "model", edit=poison)
    cfg = compose_config("model=hf", f"model.name_or_path={model_dir}", f"method={method}", *QUICK)
    with pytest.raises(NonFiniteError, match=BAD):
        run(cfg, run_dir=tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and BAD in metrics["error"]
    assert metrics["ppl"] == {} and "traceback" not in metrics


def test_non_finite_perplexity_fails_the_run_naming_it(tmp_path):
    """Finite weights whose forward pass overflows: the dense perplexity is not recorded as NaN."""

    def overflow(model):
        model.get_parameter("model.layers.0.post_attention_layernorm.weight").fill_(3e38)

    model_dir = save_tiny_model(tmp_path / "model", edit=overflow)
    cfg = compose_config("model=hf", f"model.name_or_path={model_dir}", "method=wanda", *QUICK)
    with pytest.raises(NonFiniteError) as err:
        run(cfg, run_dir=tmp_path / "run")
    text = str(err.value)
    assert "perplexity (dense)" in text and "not a finite number" in text
    assert "model.layers.0" in text  # the first module whose output is not finite
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "dense" not in metrics["ppl"]
