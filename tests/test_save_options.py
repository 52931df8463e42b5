"""Saving a pruned model: its dtype on disk, the recipe in config.json, the push to the hub."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from gblm.config import ConfigError
from gblm.models.saving import RECIPE_KEY
from gblm.models.tiny import build_tiny_model, tiny_config
from gblm.run import run
from tests.conftest import compose_config

SMALL = ("calibration.nsamples=2", "calibration.seqlen=32", "eval.perplexity.max_windows=2",
         "progress=false", "mask_images=[]", "method=wanda", "save_model=true")  # fmt: skip


def saved_dtypes(model_dir) -> set[torch.dtype]:
    dtypes = set()
    for path in model_dir.glob("model*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            dtypes |= {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    return dtypes


def test_save_dtype_casts_on_disk_only_and_records_the_recipe(tmp_path):
    metrics = run(
        compose_config("model=tiny_llama", "save_dtype=bfloat16", *SMALL), run_dir=tmp_path
    )
    model_dir = tmp_path / "model"
    assert saved_dtypes(model_dir) == {torch.bfloat16} and metrics["saved_dtype"] == "bfloat16"
    config = json.loads((model_dir / "config.json").read_text())
    recipe = config[RECIPE_KEY]
    assert recipe["method"] == "wanda" and recipe["sparsity"]["ratio"] == 0.5
    assert recipe["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert config["dtype"] == "bfloat16" and config["use_cache"] is True
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        down = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert (down == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)  # zeros stay zeros


def test_original_dtype_is_the_checkpoints(tmp_path, tokenizer):
    checkpoint = tmp_path / "ckpt"
    tokenizer.save_pretrained(checkpoint)
    build_tiny_model(tiny_config("llama", vocab_size=49152), seed=0).to(
        torch.bfloat16
    ).save_pretrained(checkpoint)
    cfg = compose_config("model=hf", f"model.name_or_path={checkpoint}", "dtype=float32", *SMALL)
    metrics = run(cfg, run_dir=tmp_path / "run")
    assert metrics["dtype"] == "float32"  # pruned in fp32 ...
    assert saved_dtypes(tmp_path / "run" / "model") == {torch.bfloat16}  # ... saved as it came


def test_push_to_hub_offline_is_a_warning_not_a_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_config("model=tiny_llama", "+push_to_hub=someone/pruned", *SMALL)
    metrics = run(cfg, run_dir=tmp_path)
    assert metrics["status"] == "finished" and (tmp_path / "model" / "config.json").exists()
    assert "offline" in metrics["push_to_hub_error"] and "hf upload" in metrics["push_to_hub_error"]


def test_push_to_hub_creates_the_repo_and_uploads_the_saved_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs["private"]))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(
                (
                    "upload",
                    repo_id,
                    sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir()),
                )
            )

    monkeypatch.setattr(
        "gblm.pipeline.configure_offline", lambda: None
    )  # as on a networked machine
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    metrics = run(
        compose_config("model=tiny_llama", "+push_to_hub=someone/pruned", *SMALL), run_dir=tmp_path
    )
    assert metrics["pushed_to"] == "https://huggingface.co/someone/pruned"
    assert calls[0] == ("create", "someone/pruned", True)
    assert calls[1][0] == "upload" and {"config.json", "pruning_masks.safetensors"} <= set(
        calls[1][2]
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("save_model=false", "+push_to_hub=a/b"), "needs save_model=true"),
        (("save_model=true", "+push_to_hub=nobody"), "owner/name"),
        (("save_dtype=float8",), "save_dtype"),
    ],
)
def test_bad_save_options_are_refused(overrides, message):
    from gblm.config import to_plain, validate

    with pytest.raises(ConfigError, match=message):
        validate(to_plain(compose_config("model=tiny_llama", *overrides)))
