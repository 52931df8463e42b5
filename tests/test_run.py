"""End-to-end runs through ``run(cfg)`` on tiny models, and on the embedded SmolLM2 (slow)."""

from __future__ import annotations

import json

import pytest
import torch

from gblm.config import ConfigError
from gblm.data.sources import DataUnavailableError
from gblm.run import run
from tests.conftest import compose_config

SMALL = (
    "calibration.nsamples=4",
    "calibration.seqlen=32",
    "eval.perplexity.max_windows=2",
    "progress=false",
    "mask_images=[model.layers.0.mlp.down_proj]",
)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "gblm"])
def test_every_method_runs_end_to_end(method, tmp_path):
    cfg = compose_config("model=tiny_llama", f"method={method}", *SMALL)
    metrics = run(cfg, run_dir=tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["status"] == metrics["status"] == "finished"
    assert on_disk["ppl"]["pruned"] > 1 and on_disk["ppl"]["dense"] > 1
    # magnitude's per-layer '<=' rule may prune the threshold entry itself (published behaviour).
    assert on_disk["sparsity_check"]["overall"] == pytest.approx(0.5, abs=1e-3)
    assert (tmp_path / "mask_stats.csv").exists() and (tmp_path / "masks").is_dir()
    assert {"load model", "prune", "perplexity pruned", "total"} <= set(on_disk["timings"])


def test_two_four_on_opt(tmp_path):
    opt_layer = "mask_images=[model.decoder.layers.0.fc2]"  # SMALL's LLaMA name would be refused
    cfg = compose_config("model=tiny_opt", "method=wanda", "sparsity=nm_2_4", *SMALL, opt_layer)
    metrics = run(cfg, run_dir=tmp_path)
    assert metrics["mask_stats"]["nm_valid"] is True
    assert (tmp_path / "masks" / "model.decoder.layers.0.fc2.png").exists()
    assert metrics["sparsity_check"]["overall"] == 0.5


def test_dense_method_evaluates_without_pruning(tmp_path):
    metrics = run(compose_config("model=tiny_llama", "method=dense", *SMALL), run_dir=tmp_path)
    assert "pruned" not in metrics["ppl"] and metrics["ppl"]["dense"] > 1


def test_finished_run_is_skipped_and_a_changed_config_is_kept(tmp_path):
    cfg = compose_config("model=tiny_llama", "method=magnitude", *SMALL)
    first = run(cfg, run_dir=tmp_path)
    again = run(cfg, run_dir=tmp_path)
    assert again["timings"] == first["timings"]  # read back, not recomputed
    changed = compose_config("model=tiny_llama", "method=magnitude", "sparsity.ratio=0.3", *SMALL)
    with pytest.raises(ConfigError, match="overwrite=true"):  # tests/test_run_records.py
        run(changed, run_dir=tmp_path)


def test_unavailable_data_fails_before_the_model_loads_and_is_recorded(tmp_path, monkeypatch):
    import gblm.models.loading as loading

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data check")

    monkeypatch.setattr(loading, "load_model", must_not_load)
    cfg = compose_config(
        "model=tiny_llama",
        "method=wanda",
        "calibration=local",
        f"calibration.paths=[{tmp_path}/missing.txt]",
        *SMALL,
    )
    with pytest.raises(DataUnavailableError, match="missing.txt"):
        run(cfg, run_dir=tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


def test_config_errors_mark_the_run_dir_failed_and_write_nothing_else(tmp_path):
    with pytest.raises(ConfigError):
        run(compose_config("model=tiny_llama", "sparsity.ratio=1.5"), run_dir=tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "sparsity.ratio=1.5" in metrics["error"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.json"]


def test_a_refusal_keeps_a_finished_run(tmp_path):
    cfg = compose_config("model=tiny_llama", "method=magnitude", *SMALL)
    first = run(cfg, run_dir=tmp_path)
    with pytest.raises(ConfigError):
        run(compose_config("model=tiny_llama", "sparsity.ratio=1.5"), run_dir=tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text()) == first


def test_gblm_scale_zero_equals_wanda_end_to_end(tmp_path):
    wanda = run(
        compose_config("model=tiny_llama", "method=wanda", *SMALL),
        run_dir=tmp_path / "w",
    )
    gblm0 = run(
        compose_config("model=tiny_llama", "method=gblm", "method.scale=0", *SMALL),
        run_dir=tmp_path / "g",
    )
    assert wanda["ppl"]["pruned"] == pytest.approx(gblm0["ppl"]["pruned"], rel=1e-6)
    assert wanda["mask_stats"] == gblm0["mask_stats"]  # the same masks, statistic for statistic


def test_cli_prints_a_summary(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gblm",
            "model=tiny_llama",
            "method=wanda",
            *SMALL,
            "save_model=true",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "gblm: wanda 0.5 on tiny_llama" in out.stdout
    assert (tmp_path / ".hydra" / "config.yaml").exists() and (tmp_path / "run.log").exists()
    # the last lines say where everything went
    assert out.stdout.splitlines()[-2:] == [
        f"gblm: run folder {tmp_path}",
        f"gblm: saved model {tmp_path / 'model'}",
    ]
    # the saved model: a finished record, and a card whose command makes it again
    saved = json.loads((tmp_path / "model" / "pruning.json").read_text())["metrics"]
    assert saved["status"] == "finished" and saved["ppl"]["pruned"] > 0
    card = (tmp_path / "model" / "README.md").read_text()
    command = "python -m gblm model=tiny_llama method=wanda " + " ".join(SMALL[:4])
    assert command in card and str(tmp_path) not in card
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "gblm",
            "method=wanda",
            "sparsity=nm_2_4",
            "sparsity.ratio=0.7",
            f"hydra.run.dir={tmp_path / 'refused'}",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and "N/M = 0.5" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_demo_on_smollm2_gblm_beats_magnitude(tmp_path):
    results = {}
    for method in ("magnitude", "gblm"):
        cfg = compose_config(
            "experiment=demo",
            f"method={method}",
            "eval.perplexity.max_windows=16",
            "progress=false",
        )
        results[method] = run(cfg, run_dir=tmp_path / method)["ppl"]
    assert results["gblm"]["pruned"] < results["magnitude"]["pruned"]
    assert results["gblm"]["dense"] < results["gblm"]["pruned"]
    assert torch.isfinite(torch.tensor(results["gblm"]["pruned"]))
