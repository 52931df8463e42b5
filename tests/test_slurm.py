"""hydra/launcher=slurm on a real one-node SLURM cluster (scripts/slurm_local.sh; slow, root).

``make test-slurm`` starts the cluster and runs this; ``GBLM_TEST_SLURM=1`` lets the test start it.

The 4-job tiny sweep runs as a job array; its last job is held inside the run (its perplexity
replaced by a wait, through a ``sitecustomize`` that only that array task loads) and cancelled
with ``scancel``, which SLURM delivers as SIGTERM: the run records ``interrupted``. The relaunch
of the same command skips the three finished jobs and redoes the cancelled one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gblm.sweep_status import SUMMARY_FILE
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "scripts" / "slurm_local.sh"
METHODS = ("magnitude", "wanda", "sparsegpt", "gblm")  # tiny_sweep's jobs, array tasks 0..3

_PAUSE = """
import os, time
from pathlib import Path

marker = os.environ.get("GBLM_TEST_PAUSE_MARKER")
if marker and os.environ.get("SLURM_ARRAY_TASK_ID") == "3":
    import gblm.eval.perplexity

    def paused(*args, **kwargs):
        task = os.environ["SLURM_ARRAY_JOB_ID"] + "_" + os.environ["SLURM_ARRAY_TASK_ID"]
        Path(marker).write_text(task)
        while True:
            time.sleep(0.05)

    gblm.eval.perplexity.perplexity = paused
"""


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The cluster of scripts/slurm_local.sh: started with GBLM_TEST_SLURM=1, else used if up."""
    if not all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "munged", "sbatch")):
        pytest.skip("needs slurm-wlm and munge (see scripts/slurm_local.sh)")
    if os.environ.get("GBLM_TEST_SLURM") == "1":
        started = subprocess.run(
            [str(SCRIPT), "start"], capture_output=True, text=True, timeout=600
        )
        assert started.returncode == 0, started.stderr
    conf = subprocess.run([str(SCRIPT), "conf"], capture_output=True, text=True, check=True)
    env = {**os.environ, "SLURM_CONF": conf.stdout.strip(), "TOKENIZERS_PARALLELISM": "false"}
    up = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
    if up.returncode != 0 or not up.stdout.strip():
        pytest.skip("no local SLURM cluster: make test-slurm, or GBLM_TEST_SLURM=1 (root)")
    return env


def _command(sweep_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gblm",
        "-m",
        "experiment=tiny_sweep",
        "hydra/launcher=slurm",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=60",
        "hydra.launcher.array_parallelism=4",
    ]


def _wait_for_marker(marker: Path, proc: subprocess.Popen, timeout: float = 1200) -> str:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"task 3 never paused ({proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
        time.sleep(1)
    return marker.read_text()


def _metrics(sweep_dir: Path, method: str) -> dict:
    return json.loads((sweep_dir / f"method={method}" / "metrics.json").read_text())


def _sacct_state(env: dict[str, str], job: str) -> str:
    deadline = time.monotonic() + 300
    while True:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job],
            env=env,
            capture_output=True,
            text=True,
        ).stdout.split()
        if (out and out[0] not in ("RUNNING", "PENDING")) or time.monotonic() > deadline:
            return out[0] if out else ""
        time.sleep(2)


def test_a_real_job_array_survives_scancel_and_resumes(tmp_path, slurm_env):
    sweep_dir, marker, pause = tmp_path / "sweep", tmp_path / "paused", tmp_path / "pause"
    pause.mkdir()
    (pause / "sitecustomize.py").write_text(_PAUSE)
    env = {
        **slurm_env,
        "PYTHONPATH": os.pathsep.join([str(pause), str(ROOT), slurm_env.get("PYTHONPATH", "")]),
        "GBLM_TEST_PAUSE_MARKER": str(marker),
    }
    proc = subprocess.Popen(
        _command(sweep_dir),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    task = _wait_for_marker(marker, proc)
    subprocess.run(["scancel", task], env=env, check=True)
    out, err = proc.communicate(timeout=1800)
    assert proc.returncode != 0, out + err  # the cancelled job fails the launch
    assert _sacct_state(env, task) == "CANCELLED"
    for method in METHODS[:3]:
        assert _metrics(sweep_dir, method)["status"] == "finished"
    cancelled = _metrics(sweep_dir, "gblm")
    assert cancelled["status"] == "interrupted" and cancelled["error"] == "interrupted by SIGTERM"
    summary = json.loads((sweep_dir / SUMMARY_FILE).read_text())
    assert summary["counts"]["finished"] == 3 and summary["counts"]["incomplete"] == 1, summary
    before = {
        m: (sweep_dir / f"method={m}" / "metrics.json").stat().st_mtime_ns for m in METHODS[:3]
    }

    env.pop("GBLM_TEST_PAUSE_MARKER")
    again = subprocess.run(
        _command(sweep_dir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    summary = json.loads((sweep_dir / SUMMARY_FILE).read_text())
    assert summary["counts"]["skipped"] == 3 and summary["counts"]["finished"] == 1, summary
    assert summary["finished"] == ["method=gblm"]
    after = {
        m: (sweep_dir / f"method={m}" / "metrics.json").stat().st_mtime_ns for m in METHODS[:3]
    }
    assert after == before  # the finished jobs were not rewritten
    redone = _metrics(sweep_dir, "gblm")
    assert redone["status"] == "finished" and redone["ppl"]["pruned"] > 1
