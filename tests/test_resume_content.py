"""A run's identity covers its inputs' content: a relaunch after the model or a data file changed
in place runs again; an unchanged one, or one whose record predates the fingerprints, is skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gblm.data.corpus import austen_documents
from gblm.run import run
from tests.conftest import compose_config, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    text = austen_documents("train")
    (tmp_path / "cal.txt").write_text("\n\n".join(text[:2]))
    (tmp_path / "eval.txt").write_text(text[2][:20000])
    return {"model": save_tiny_model(tmp_path / "model"), "cal": tmp_path / "cal.txt",
            "eval": tmp_path / "eval.txt", "run": tmp_path / "run"}  # fmt: skip


def _run(paths: dict[str, Path]) -> dict:
    cfg = compose_config(
        "model=hf", f"model.name_or_path={paths['model']}", "method=wanda",
        "calibration.source=local", f"calibration.paths=[{paths['cal']}]",
        "calibration.nsamples=4", "calibration.seqlen=32", "eval.perplexity.dataset=local",
        f"eval.perplexity.paths=[{paths['eval']}]", "eval.perplexity.max_windows=2",
        "progress=false", "mask_images=[]",
    )  # fmt: skip
    return run(cfg, run_dir=paths["run"])


def _fingerprints(paths: dict[str, Path]) -> dict:
    return json.loads((paths["run"] / "metrics.json").read_text())["provenance"]["fingerprints"]


def test_an_unchanged_relaunch_is_skipped_and_a_changed_data_file_runs_again(inputs):
    first = _run(inputs)
    found = _fingerprints(inputs)
    assert set(found) == {"model", "tokenizer", "device and dtype", "calibration", "eval"}
    assert _run(inputs)["timings"] == first["timings"]  # skipped: the record as it was
    with inputs["cal"].open("a") as handle:  # edited in place: same path, same config
        handle.write("\n\nA new paragraph, written after the first run finished.")
    again = _run(inputs)
    assert again["status"] == "finished" and again["timings"] != first["timings"]
    assert _fingerprints(inputs)["calibration"] != found["calibration"]
    assert _fingerprints(inputs)["model"] == found["model"]
    inputs["eval"].write_text(inputs["eval"].read_text()[1000:])
    assert _run(inputs)["ppl"]["pruned"] != again["ppl"]["pruned"]  # other text: other numbers


def test_a_model_replaced_at_its_path_runs_again(inputs):
    first = _run(inputs)
    save_tiny_model(inputs["model"], seed=1)  # another model saved over the first
    again = _run(inputs)
    assert again["timings"] != first["timings"] and again["ppl"] != first["ppl"]
    assert _run(inputs)["timings"] == again["timings"]  # and now it is the same again


def test_a_tokenizer_edited_in_place_runs_again_and_a_record_before_its_fingerprint_does_not(
    inputs,
):
    """The windows are the tokenizer's: a tokenizer file changed beside the same weights (a fixed
    tokenizer_config.json) changes the run. A record from before the tokenizer was fingerprinted
    keeps resuming: its tokenizer is unknowable, as a record's without any fingerprints."""
    first = _run(inputs)
    settings = inputs["model"] / "tokenizer_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "model_max_length": 4096}))
    again = _run(inputs)
    assert again["timings"] != first["timings"]
    found = _fingerprints(inputs)
    record = inputs["run"] / "metrics.json"
    legacy = json.loads(record.read_text())
    del legacy["provenance"]["fingerprints"]["tokenizer"]
    record.write_text(json.dumps(legacy))
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "model_max_length": 8192}))
    assert _run(inputs)["timings"] == again["timings"]  # skipped: the record as it was
    assert found["model"] == _fingerprints(inputs)["model"]


def test_a_record_without_fingerprints_is_skipped_when_its_config_matches(inputs):
    """Runs and sweeps finished before the fingerprints were recorded keep resuming."""
    first = _run(inputs)
    record = inputs["run"] / "metrics.json"
    legacy = json.loads(record.read_text())
    del legacy["provenance"]
    record.write_text(json.dumps(legacy))
    inputs["cal"].write_text(inputs["cal"].read_text() + " more")  # unknowable for that record
    assert _run(inputs)["timings"] == first["timings"]
    assert "provenance" not in json.loads(record.read_text())  # kept as it was


def test_a_run_scored_or_calibrated_by_an_earlier_protocol_runs_again():
    """How lm-eval is asked (no BOS) and WikiText-2's calibration separator (a space) are part of a
    run's identity: a finished record from before them is run again, not returned as finished."""
    from omegaconf import OmegaConf

    from gblm.config import build_method, build_plan, validate
    from gblm.pipeline import fingerprints
    from gblm.run import changed_content

    cfg = compose_config("method=wanda", "calibration=wikitext2", "eval.zeroshot.enabled=true")
    conf = validate(OmegaConf.to_container(cfg, resolve=True))
    found = fingerprints(conf, build_method(conf), build_plan(conf))
    earlier = {"model": found["model"], "eval": found["eval"],  # as the code before recorded them
               "calibration": "dataset:wikitext2/train"}  # fmt: skip
    assert changed_content({"provenance": {"fingerprints": earlier}}, found) == [
        "calibration",
        "zero-shot",
    ]
    plain = compose_config("method=wanda", "calibration=austen")  # neither: nothing new recorded
    conf = validate(OmegaConf.to_container(plain, resolve=True))
    assert set(fingerprints(conf, build_method(conf), build_plan(conf))) == {
        "model",
        "tokenizer",
        "device and dtype",
        "calibration",
        "eval",
    }


def test_the_users_zero_shot_task_files_are_part_of_the_identity(tmp_path):
    """A task YAML edited in ``eval.zeroshot.include_path`` asks other questions: the run changes.
    A record from before these files were fingerprinted compares the rest."""
    from omegaconf import OmegaConf

    from gblm.config import build_method, build_plan, validate
    from gblm.pipeline import fingerprints
    from gblm.run import changed_content

    (tmp_path / "data").mkdir()
    (tmp_path / "mine.yaml").write_text("task: mine\ndataset_path: json\n")
    (tmp_path / "data" / "items.jsonl").write_text('{"q": 1}\n')
    cfg = compose_config("method=wanda", "eval.zeroshot.enabled=true",
                         f"eval.zeroshot.include_path={tmp_path}")  # fmt: skip
    conf = validate(OmegaConf.to_container(cfg, resolve=True))

    def found() -> dict[str, str]:
        return fingerprints(conf, build_method(conf), build_plan(conf))

    first = found()
    assert changed_content({"provenance": {"fingerprints": first}}, found()) == []
    (tmp_path / "data" / "items.jsonl").write_text('{"q": 2}\n')
    assert changed_content({"provenance": {"fingerprints": first}}, found()) == ["zero-shot tasks"]
    earlier = {k: v for k, v in first.items() if k != "zero-shot tasks"}
    assert changed_content({"provenance": {"fingerprints": earlier}}, found()) == []


def test_a_relaunch_where_auto_resolves_to_another_device_runs_again(monkeypatch):
    """``device=auto dtype=auto`` is the CPU in float32 on one machine and a GPU in float16 on
    another: a run dir finished on the CPU was returned as finished by a relaunch on a GPU (its
    float32 masks and numbers, not what the GPU computes). A device named explicitly is the same
    everywhere, and a record from before this fingerprint compares the rest."""
    import torch
    from omegaconf import OmegaConf

    from gblm.config import build_method, build_plan, validate
    from gblm.pipeline import fingerprints
    from gblm.run import changed_content

    def found(*overrides: str) -> dict:
        cfg = compose_config("model=tiny_llama", "method=magnitude", *overrides)
        conf = validate(OmegaConf.to_container(cfg, resolve=True))
        return fingerprints(conf, build_method(conf), build_plan(conf))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    on_cpu, named = found(), found("device=cuda")
    assert on_cpu["device and dtype"] == "cpu float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    on_gpu = found()
    assert on_gpu["device and dtype"] == "cuda float16"
    assert changed_content({"provenance": {"fingerprints": on_cpu}}, on_gpu) == ["device and dtype"]
    assert changed_content({"provenance": {"fingerprints": named}}, found("device=cuda")) == []
    legacy = {k: v for k, v in on_cpu.items() if k != "device and dtype"}
    assert changed_content({"provenance": {"fingerprints": legacy}}, on_gpu) == []


def test_a_models_own_code_edited_in_place_runs_again(tmp_path):
    """With ``model.trust_remote_code=true`` the architecture is the model folder's own Python
    code: an edited ``modeling_*.py`` beside the same weights returned the earlier run's numbers
    as finished. Without remote code the .py files are not read; a record from before compares
    the rest."""
    from omegaconf import OmegaConf

    from gblm.config import build_method, build_plan, validate
    from gblm.pipeline import fingerprints
    from gblm.run import changed_content

    (tmp_path / "config.json").write_text('{"model_type": "mine"}')
    code = tmp_path / "modeling_mine.py"
    code.write_text("SCALE = 1.0\n")

    def found(*overrides: str) -> dict:
        cfg = compose_config("model=hf", f"model.name_or_path={tmp_path}", "method=magnitude",
                             "eval.perplexity.enabled=false", *overrides)  # fmt: skip
        conf = validate(OmegaConf.to_container(cfg, resolve=True))
        return fingerprints(conf, build_method(conf), build_plan(conf))

    before, plain = found("model.trust_remote_code=true"), found()
    code.write_text("SCALE = 2.0\n")
    after = found("model.trust_remote_code=true")
    assert changed_content({"provenance": {"fingerprints": before}}, after) == ["model code"]
    assert changed_content({"provenance": {"fingerprints": plain}}, found()) == []
    legacy = {k: v for k, v in before.items() if k != "model code"}
    assert changed_content({"provenance": {"fingerprints": legacy}}, after) == []
