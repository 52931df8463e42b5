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


def test_model_card_carries_the_hub_metadata_and_the_run(tmp_path):
    """README.md of a saved model: the Hub's YAML header (base model, library, pipeline, tags,
    model-index results) and the record's method, settings, sparsity, scores and command."""
    from huggingface_hub import ModelCard

    from gblm.models.card import model_card, portable_command
    from gblm.models.loading import SMOLLM2_HUB_ID, ModelSpec

    command = portable_command(["method=gblm", "sparsity=nm_2_4", f"calibration.paths=[{tmp_path}/a.txt]"])  # fmt: skip
    metrics = {
        "method": "gblm", "method_label": "gblm+owl", "method_settings": {"norm": "l1", "scale": 100.0},
        "model": "smollm2_135m", "sparsity": {"ratio": 0.5, "n": 2, "m": 4, "label": "2:4"},
        "calibration": {"source": "austen", "nsamples": 32, "seqlen": 256, "seed": 0},
        "ppl": {"dense": 50.67, "pruned": 88.18}, "command": command,
        "zeroshot": {"austen_cloze": {"acc": 0.45, "acc_stderr": 0.08, "samples": 40}, "mean_acc": 0.45},
    }  # fmt: skip
    evaluation = {"dataset": "austen", "split": "test", "seqlen": 256, "max_windows": 32}
    path = tmp_path / "README.md"
    path.write_text(model_card(metrics, 0.5, base_model=SMOLLM2_HUB_ID, evaluation=evaluation))
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"pruning", "gblm", "owl", "2-4-sparsity"} <= set(data["tags"])
    assert (
        data["pruning"]["achieved_sparsity"] == 0.5 and data["pruning"]["settings"]["norm"] == "l1"
    )
    results = {(r.metric_type, r.dataset_type): r.metric_value for r in card.data.eval_results}
    assert results == {("perplexity", "austen"): 88.18, ("accuracy", "austen_cloze"): 0.45}
    for text in (
        "gblm+owl",
        'norm="l1"',
        "2:4 semi-structured",
        "0.5000",
        "88.1800",
        "0.4500 ± 0.0800",
        command,
    ):
        assert text in card.text, text
    assert str(tmp_path) not in card.content and "<path>/a.txt" in command
    # the base model is a Hub id only where there is one
    assert ModelSpec(kind="smollm2").hub_id == SMOLLM2_HUB_ID
    assert ModelSpec(kind="hf", name_or_path="meta-llama/Llama-2-7b-hf").hub_id == "meta-llama/Llama-2-7b-hf"  # fmt: skip
    assert ModelSpec(kind="hf", name_or_path=str(tmp_path)).hub_id is None
    assert ModelSpec(kind="tiny").hub_id is None


def test_a_diverged_perplexity_is_shown_in_the_card_but_is_no_hub_result(tmp_path):
    """The Hub's model-index feeds leaderboards: an infinite perplexity is no score there."""
    from huggingface_hub import ModelCard

    from gblm.models.card import model_card

    metrics = {"method": "wanda", "model": "m", "sparsity": {"ratio": 0.9, "label": "0.9"},
               "ppl": {"dense": 50.0, "pruned": float("inf")}}  # fmt: skip
    evaluation = {"dataset": "austen", "split": "test", "seqlen": 256}
    path = tmp_path / "README.md"
    path.write_text(model_card(metrics, 0.9, evaluation=evaluation))
    card = ModelCard.load(path)
    assert not card.data.eval_results and "| perplexity, pruned model | inf |" in card.text


def test_a_new_run_in_the_folder_never_shows_an_earlier_runs_saved_model(tmp_path):
    run(compose_config("model=tiny_llama", *SMALL), run_dir=tmp_path)
    assert (tmp_path / "model" / "pruning.json").exists()
    other = ("method=magnitude", "save_model=false", "overwrite=true")
    metrics = run(compose_config("model=tiny_llama", *SMALL, *other), run_dir=tmp_path)
    assert metrics["status"] == "finished" and "saved_model" not in metrics
    assert not (tmp_path / "model").exists()  # wanda's model beside magnitude's record: removed


def test_a_run_that_loads_its_own_folders_saved_model_is_refused_before_it_is_removed(tmp_path):
    from gblm.errors import ConfigError

    run(compose_config("model=tiny_llama", *SMALL), run_dir=tmp_path)
    saved = sorted(p.name for p in (tmp_path / "model").iterdir())
    again = ("model=saved", f"model.run_dir={tmp_path}", "method=dense", "overwrite=true")
    with pytest.raises(ConfigError, match="model.name_or_path=.* is this run folder's saved model"):
        run(compose_config(*again), run_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == saved  # nothing lost


def test_model_card_of_a_local_model_names_it_without_its_folder(tmp_path):
    from huggingface_hub import ModelCard

    from gblm.models.card import model_card

    local = str(tmp_path / "checkpoints" / "llama-2-7b-hf")  # model=hf name: its name_or_path
    metrics = {"method": "wanda", "model": local, "sparsity": {"ratio": 0.5, "label": "0.5"}}
    path = tmp_path / "README.md"
    path.write_text(model_card(metrics, 0.5, evaluation={"dataset": "austen"}))
    card = ModelCard.load(path)
    assert str(tmp_path) not in card.content
    assert card.text.lstrip().startswith("# llama-2-7b-hf-wanda-0.5")


def _strings(value) -> list[str]:
    """Every string (keys included) in a JSON value."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [str(k), *_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_a_saved_model_holds_nothing_of_the_machine_that_made_it(tmp_path, tokenizer):
    """What push_to_hub publishes: no host name, process id or absolute path of this machine
    (pruning.json held the record's host, the model's folder and the mask pictures' paths)."""
    import socket

    checkpoint = tmp_path / "ckpt"
    tokenizer.save_pretrained(checkpoint)
    build_tiny_model(tiny_config("llama", vocab_size=49152), seed=0).save_pretrained(checkpoint)
    overrides = ("model=hf", f"model.name_or_path={checkpoint}", *SMALL)
    cfg = compose_config(*overrides, "mask_images=[model.layers.0.mlp.down_proj]")
    local = run(cfg, run_dir=tmp_path / "run")
    assert local["process"]["host"] == socket.gethostname()  # the local record keeps it
    saved = tmp_path / "run" / "model"
    for path in saved.glob("*"):
        if path.suffix != ".safetensors":
            assert str(tmp_path) not in path.read_text(), path.name
    published = json.loads((saved / "pruning.json").read_text())["metrics"]
    assert socket.gethostname() not in _strings(published) and "process" not in published
    assert published["model"] == "<path>/ckpt" and published["run_name"] == "wanda_0.5_<path>/ckpt"
    assert published["method"] == "wanda" and published["calibration"]["seed"] == 0
    assert published["provenance"]["gblm"] and published["ppl"]["pruned"] > 0


@pytest.mark.parametrize(
    "override",
    [
        "calibration.paths=['/home/alice/a.txt']",  # Hydra's quoted strings
        'model.name_or_path="/home/alice/llama"',
        "calibration.paths=[/data/b.txt, /home/alice/a.txt]",  # a space after the comma
        "model.name_or_path=~alice/llama",
    ],
)
def test_the_published_command_cuts_every_absolute_path_however_written(override):
    from gblm.models.card import portable_command

    assert "alice" not in portable_command(["method=wanda", override])
