"""What a run keeps besides metrics.json: lm-eval's own output and the task it ran."""

from __future__ import annotations

import json

import pytest

from gblm.run import run
from tests.conftest import compose_config


def test_zeroshot_results_samples_and_task_are_kept_in_the_run_dir(tmp_path):
    cfg = compose_config(
        "model=tiny_llama", "method=magnitude", "eval.perplexity.enabled=false",
        "eval.zeroshot.enabled=true", "eval.zeroshot.limit=4", "eval.zeroshot.cloze_items=20",
        "eval.zeroshot.log_samples=true", "progress=false", "mask_images=[]",
    )  # fmt: skip
    metrics = run(cfg, run_dir=tmp_path)
    row = metrics["zeroshot"]["austen_cloze"]
    assert row["samples"] == 4 and {"acc_stderr", "acc_norm_stderr"} <= set(row)
    kept = json.loads((tmp_path / "lm_eval_results.json").read_text())
    assert kept["results"]["austen_cloze"]["acc,none"] == row["acc"]
    assert len((tmp_path / "lm_eval_samples_austen_cloze.jsonl").read_text().splitlines()) == 4
    task = tmp_path / "lm_eval_tasks"
    assert (task / "austen_cloze.yaml").exists() and (task / "austen_cloze.jsonl").exists()
    assert str(task / "austen_cloze.jsonl") in (task / "austen_cloze.yaml").read_text()


def test_overall_estimate_prices_the_stages_left_at_the_measured_rate():
    from gblm.utils import OverallEstimate

    estimate = OverallEstimate({"perplexity dense": 100.0, "gradients": 300.0, "prune": 200.0})
    estimate("start", "load model", None, 0)
    estimate("end", "load model", 5.0, 1)  # weighs nothing: no rate yet
    assert "left" not in estimate.lines[-1]
    estimate("end", "perplexity dense", 2.0, 2)  # 100 units in 2 s: 500 units left -> 10 s
    assert "17% of the work done, about 10 s left (gradients, prune)" in estimate.lines[-1]
    estimate("end", "gradients", 10.0, 3)  # 400 units in 12 s: 200 left -> 6 s
    assert "67% of the work done, about 6 s left (prune)" in estimate.lines[-1]


def test_a_stage_read_from_a_cache_weighs_nothing():
    from gblm.utils import OverallEstimate

    estimate = OverallEstimate({"perplexity dense": 100.0, "gradients": 300.0, "prune": 200.0})
    estimate("cached", "gradients", None, 0)  # the pipeline's note before the first stage
    estimate("end", "perplexity dense", 2.0, 1)  # 100 units in 2 s: 200 left -> 4 s
    assert "33% of the work done, about 4 s left (prune)" in estimate.lines[-1]
    estimate("end", "gradients", 0.5, 2)  # read from the cache: no rate from it
    assert "about 4 s left (prune)" in estimate.lines[-1]


def test_a_second_gblm_run_knows_its_gradients_are_cached(tmp_path, monkeypatch, caplog):
    """The estimate after the first stage leaves out a gradient stage that the cache holds."""
    import logging

    monkeypatch.setenv("GBLM_CACHE_DIR", str(tmp_path / "cache"))
    cfg = compose_config("model=tiny_llama", "method=gblm", *SMALL)
    first_lines = []
    for name in ("first", "second"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gblm.progress"):
            run(cfg, run_dir=tmp_path / name)
        lines = [r.getMessage() for r in caplog.records if "work done" in r.getMessage()]
        first_lines.append(lines[0])
    assert "(gradients, prune, perplexity pruned)" in first_lines[0]
    assert "(prune, perplexity pruned)" in first_lines[1]


def test_planned_work_follows_the_method_and_the_run(tmp_path, caplog):
    import logging

    from gblm.config import build_method, build_plan, to_plain, validate
    from gblm.pipeline import planned_stages

    conf = validate(to_plain(compose_config("model=tiny_llama", "method=gblm", *SMALL)))
    work = planned_stages(conf, build_method(conf), build_plan(conf))
    n_t = conf.calibration.nsamples * conf.calibration.seqlen
    assert list(work) == ["perplexity dense", "gradients", "prune", "perplexity pruned"]
    assert work["gradients"] == 3 * n_t and work["prune"] == 2 * n_t
    assert work["perplexity dense"] == work["perplexity pruned"] == 2 * conf.eval.perplexity.seqlen
    with caplog.at_level(logging.INFO, logger="gblm.progress"):
        run(compose_config("model=tiny_llama", "method=magnitude", *SMALL), run_dir=tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "gblm.progress"]
    assert lines and all(line.startswith("overall: ") for line in lines)
    assert "100% of the work done" in lines[-1]


SMALL = ("calibration.nsamples=2", "calibration.seqlen=32", "eval.perplexity.max_windows=2",
         "progress=false", "mask_images=[]")  # fmt: skip


def test_a_walk_without_calibration_is_not_weighed():
    from gblm.config import build_method, build_plan, to_plain, validate
    from gblm.pipeline import planned_stages

    conf = validate(to_plain(compose_config("model=tiny_llama", "method=magnitude", *SMALL)))
    work = planned_stages(conf, build_method(conf), build_plan(conf))
    assert set(work) == {"perplexity dense", "perplexity pruned"}  # the rate comes from them


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_opt", "tiny_qwen2", "tiny_mistral"])
def test_tiny_models_bring_tiny_sizes(model):
    """A tiny model runs at sizes that take seconds unless told otherwise; the command line and
    experiments still win."""
    from gblm.config import build_method, build_plan, to_plain, validate
    from gblm.pipeline import planned_stages

    conf = validate(to_plain(compose_config(f"model={model}", "method=gblm")))
    c, e = conf.calibration, conf.eval
    assert (c.nsamples, c.seqlen, e.perplexity.max_windows, e.zeroshot.cloze_items) == (
        8,
        64,
        8,
        20,
    )
    work = planned_stages(conf, build_method(conf), build_plan(conf))
    assert sum(work.values()) <= 6 * 8 * 64 + 2 * 8 * 64  # a few thousand tokens in all
    given = validate(to_plain(compose_config(f"model={model}", "calibration.nsamples=16", "eval=paper")))  # fmt: skip
    assert (given.calibration.nsamples, given.calibration.seqlen) == (16, 64)
    assert given.eval.perplexity.dataset == "wikitext2"  # another eval keeps the tiny sizes
    swept = validate(to_plain(compose_config("experiment=tiny_sweep", f"model={model}")))
    assert (swept.calibration.nsamples, swept.eval.perplexity.max_windows) == (4, 4)


@pytest.mark.parametrize("model", ["smollm2_135m", "llama2_7b", "opt_125m"])
def test_real_models_keep_the_published_sizes(model):
    from gblm.config import to_plain, validate

    conf = validate(to_plain(compose_config(f"model={model}")))
    c, e = conf.calibration, conf.eval
    assert (c.nsamples, c.seqlen, e.perplexity.max_windows, e.zeroshot.cloze_items) == (128, 2048, None, 100)  # fmt: skip
    demo = validate(to_plain(compose_config("experiment=demo")))
    assert (demo.calibration.nsamples, demo.calibration.seqlen, demo.eval.perplexity.max_windows) == (32, 256, 32)  # fmt: skip
