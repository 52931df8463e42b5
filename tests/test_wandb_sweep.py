"""The W&B sweep recipe: every point of its grid, expanded as the agent does, is a valid run."""

from __future__ import annotations

import itertools

import yaml

from gblm.config import to_plain, validate
from gblm.paths import PROJECT_ROOT
from tests.conftest import compose_config

RECIPE = PROJECT_ROOT / "experiments" / "wandb_sweep.yaml"


def agent_commands(sweep: dict) -> list[list[str]]:
    """The commands a grid sweep's agent runs: the macros replaced by each point's values."""
    names = list(sweep["parameters"])
    grids = [sweep["parameters"][n]["values"] for n in names]
    commands = []
    for point in itertools.product(*grids):
        args = [f"{n}={v}" for n, v in zip(names, point)]
        command = []
        for part in sweep["command"]:
            if part == "${env}":
                command.append("/usr/bin/env")
            elif part == "${args_no_hyphens}":
                command += args
            else:
                command.append(part)
        commands.append(command)
    return commands


def test_every_grid_point_is_a_valid_gblm_run():
    sweep = yaml.safe_load(RECIPE.read_text())
    assert sweep["method"] == "grid" and sweep["metric"]["name"] == "ppl/pruned"
    commands = agent_commands(sweep)
    assert len(commands) == 8
    for command in commands:
        assert command[1:4] == ["python", "-m", "gblm"]
        settings = validate(to_plain(compose_config(*command[4:])))
        assert settings.logger.name == "wandb" and settings.method_name in ("wanda", "gblm")
    point = commands[-1][4:]
    assert "method=gblm" in point and "sparsity.ratio=0.6" in point


def test_a_hydra_sweep_logs_each_job_to_wandb_with_its_run_record(tmp_path):
    """A real multirun with ``logger=wandb logger.mode=offline``: each job's offline W&B run holds
    its run record as an artifact with a valid name, a short run name, and the run says how to
    upload it; the sweep's end names the report command."""
    import json
    import os
    import re
    import subprocess
    import sys

    from tests.test_wandb_logger import read_wandb_records

    sweep_dir = tmp_path / "sweep"
    wandb_home = {f"WANDB_{k}_DIR": str(tmp_path / "wandb-home" / k.lower())
                  for k in ("CACHE", "CONFIG", "DATA", "ARTIFACT")}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "gblm", "-m", "model=tiny_llama", "method=magnitude,wanda",
         "calibration.nsamples=4", "eval.perplexity.max_windows=2", "logger=wandb",
         "logger.mode=offline", "progress=false", "mask_images=[model.layers.0.mlp.up_proj]",
         f"hydra.sweep.dir={sweep_dir}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, **wandb_home, "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    plan = json.loads((sweep_dir / "sweep_plan.json").read_text())["jobs"]
    # the constant overrides name no job: only the swept method does
    assert [job["dir"] for job in plan] == ["0_method=magnitude", "1_method=wanda"]
    for job, method in zip(plan, ("magnitude", "wanda")):
        job_dir = sweep_dir / job["dir"]
        metrics = json.loads((job_dir / "metrics.json").read_text())
        assert metrics["status"] == "finished", metrics.get("error")
        assert "warnings" not in metrics, metrics["warnings"]
        (offline,) = sorted((job_dir / "wandb").glob("offline-run-*"))
        assert metrics["wandb"]["sync_dir"] == str(offline)
        assert f"wandb sync {offline}" in done.stdout  # outside the cwd: the absolute path
        (log_file,) = offline.glob("run-*.wandb")
        records = read_wandb_records(log_file)
        (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"][:1]
        assert started.display_name == f"{method}_0.5_tiny_llama"  # the swept value only
        assert started.run_group == "sweep"
        artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
        (kept,) = [a for a in artifacts if a.type == "run-record"]
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", kept.name) and method in kept.name
        files = {f.path for f in kept.manifest.contents}
        assert {"metrics.json", "mask_stats.csv", "model.layers.0.mlp.up_proj.png"} <= files
    assert f"report: python -m gblm.report {sweep_dir}" in done.stdout
    table = [line for line in done.stdout.splitlines() if line.split()[:1] == ["job"]]
    assert table and len(table[0]) < 60, table  # the job column: the short job names
