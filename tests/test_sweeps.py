"""Sweeps: every experiment composes and validates, sweeps expand as planned, the preflight stops a
bad sweep before any job, and a real multirun survives a crashed job and resumes."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gblm.config import to_plain, validate
from gblm.sweep import (
    SweepPreflightError,
    expand_sweep,
    job_config,
    name_jobs_by_their_axes,
    override_dirname,
    preflight,
)
from gblm.sweep_status import (
    JOB_STATUS_FILE,
    PLAN_FILE,
    SUMMARY_FILE,
    format_comparison,
    format_summary,
    summarize,
)
from tests.conftest import CONF, ROOT, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SWEEPS = [name for name in EXPERIMENTS if name != "demo"]
# Jobs per experiment: the product of its sweep axes.
EXPECTED_JOBS = {
    "paper_main_llama1": 3 * 5 * 3,  # models x methods x sparsity patterns
    "paper_main_llama2": 3 * 5 * 3,
    "paper_sparsity_sweep": 4 * 8,  # methods x ratios 0.1 .. 0.8
    "ablation_norm": 2,
    "ablation_scale": 5,
    "ablation_score": 3,
    "ablation_group": 2,
    "ablation_nsamples": 3 * 8,
    "ablation_calibration": 2 * 4,
    "ablation_owl": 6 * 4,  # Lambda x M
    "owl_llama1_70": 4 * 2,  # methods x (uniform, OWL)
    "dsnot_llama_60": 2 * 3,  # models x initial methods
    "dsnot_baselines_60": 2 * 4,  # models x methods
    "demo_sweep": 5,
    "results_smollm2": 6 * 2,  # methods x (uniform, OWL), per launch of the script
    "reconstruct_llama1": 2 * 3 * 4,  # masks x updates x ratios, the script's first launch
    "tiny_sweep": 4,
}


@contextmanager
def multirun_config(*overrides: str) -> Iterator[DictConfig]:
    """The config ``python -m gblm -m <overrides>`` hands to ``on_multirun_start``.

    Hydra stays initialized inside the block, as it is in a real multirun, so jobs can be composed.
    """
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield GlobalHydra.instance().hydra.compose_config(
            "config", list(overrides), run_mode=RunMode.MULTIRUN, with_log_configuration=False
        )


def test_every_sweep_experiment_is_listed():
    assert set(SWEEPS) == set(EXPECTED_JOBS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name):
    from gblm.config import build_method

    settings = validate(to_plain(compose_config(f"experiment={name}")))
    build_method(settings)


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_expands_and_its_first_job_validates(name):
    """The planned number of jobs, a fixed sweep dir, the callback registered, job 0 valid."""
    with multirun_config(f"experiment={name}") as cfg:
        jobs = preflight(cfg, validate_jobs="first", check_models=False)
        assert len(jobs) == EXPECTED_JOBS[name]
        # a fixed sweep dir and job dirs named by the overrides only: a relaunch resumes there
        sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
        assert sweep == {"dir": f"outputs/sweeps/{name}", "subdir": "${hydra.job.override_dirname}"}
        assert cfg.hydra.callbacks.sweep._target_ == "gblm.sweep.SweepCallback"


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEPS)
def test_every_job_of_every_sweep_validates(name):
    """The preflight (without the model check: hub models are not here) passes on every job."""
    with multirun_config(f"experiment={name}") as cfg:
        assert len(preflight(cfg, validate_jobs="all", check_models=False)) == EXPECTED_JOBS[name]


def test_paper_main_table_expands_to_the_published_grid():
    with multirun_config("experiment=paper_main_llama2") as cfg:
        jobs = expand_sweep(cfg)
        narrowed = expand_sweep(_with_task_overrides(cfg, ["model=llama2_70b"]))
    points = {tuple(sorted(o for o in job if not o.startswith("experiment="))) for job in jobs}
    assert len(points) == len(jobs) == 45
    for model in ("llama2_7b", "llama2_13b", "llama2_70b"):
        for method in ("dense", "magnitude", "sparsegpt", "wanda", "gblm"):
            for sparsity in ("unstructured", "nm_4_8", "nm_2_4"):
                assert (f"method={method}", f"model={model}", f"sparsity={sparsity}") in points
    # a command-line value replaces the sweep axis: one model, 15 jobs, same dir names
    assert len(narrowed) == 15 and all("model=llama2_70b" in job for job in narrowed)


def _with_task_overrides(cfg: DictConfig, extra: list[str]) -> DictConfig:
    from omegaconf import open_dict, read_write

    cfg = cfg.copy()
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.overrides.task = list(cfg.hydra.overrides.task) + extra
    return cfg


def test_paper_protocol_settings():
    s = validate(to_plain(compose_config("experiment=paper_main_llama1")))
    assert (s.calibration.source, s.calibration.nsamples, s.calibration.seqlen) == ("c4", 128, 2048)
    assert (s.eval.perplexity.dataset, s.eval.perplexity.seqlen, s.eval.perplexity.max_windows) == (
        "wikitext2",
        2048,
        None,
    )
    assert (s.method["norm"], s.method["scale"]) == ("l1", 100.0)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["sparsity.ratio=0.5,1.5"], "sparsity.ratio=1.5"),
        (["method=gblm", "method.norm=l3"], "method.norm='l3'"),
        (["model=hf", "model.name_or_path=/nonexistent/model"], "/nonexistent/model"),
        # the preflight leaves the device to the job's machine: its name is checked all the same
        (["method=wanda", "device=cpu,cuda:abc"], "device='cuda:abc'"),
        (["method=wanda", "seed=0,99999999999999999999999"], "seed=99999999999999999999999"),
        (["method=wanda", "reconstruct=none", "+reconstruct.iters=5,20"], "reconstruct.iters=5"),
        # locations do not name job dirs: sweeping over them would make two jobs share one dir
        (
            ["method=wanda", "calibration=local", "calibration.paths=[a.txt],[b.txt]"],
            "would all write into",
        ),
    ],
)
def test_preflight_stops_a_bad_sweep_with_the_reason(overrides, needle):
    with (
        multirun_config("experiment=tiny_sweep", *overrides) as cfg,
        pytest.raises(SweepPreflightError) as err,
    ):
        preflight(cfg)
    assert needle in str(err.value) and "no job was started" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "dirs"),
    [
        # one value for every job: no job is named by it (nor by the logger's keys, ever)
        (["method=magnitude,wanda", "calibration.nsamples=8", "logger=wandb",
          "logger.mode=offline"], ["0_method=magnitude", "1_method=wanda"]),
        (["method=wanda", "sparsity.ratio=0.5,0.6", "seed=3"],
         ["0_sparsity.ratio=0.5", "1_sparsity.ratio=0.6"]),
        # a sweep of one job: its overrides are what is not default, they name it
        (["method=wanda", "calibration.nsamples=8"], ["0_calibration.nsamples=8,method=wanda,model=tiny_llama"]),
        # a resumable sweep (one fixed dir, no job numbers) drops no key: its dirs are the jobs'
        # identities across launches, so its axes name its jobs narrowed to one value too, and
        # so does a constant key (a relaunch with seed=2 must not meet these runs)
        (["experiment=tiny_sweep", "method=gblm", "calibration.nsamples=4,8", "seed=1"],
         ["calibration.nsamples=4,method=gblm,model=tiny_llama,seed=1",
          "calibration.nsamples=8,method=gblm,model=tiny_llama,seed=1"]),
    ],
)  # fmt: skip
def test_jobs_are_named_by_what_the_sweep_varies(overrides, dirs):
    with multirun_config("model=tiny_llama", *overrides) as cfg:
        name_jobs_by_their_axes(cfg)
        jobs = preflight(cfg, validate_jobs="first", check_models=False)
        assert [job["dir"] for job in jobs] == dirs
        # every job is composed with the same rule, which Hydra applies to its own dir and name
        job = GlobalHydra.instance().config_loader().load_sweep_config(cfg, jobs[-1]["overrides"])
        excluded = job.hydra.job.config.override_dirname.exclude_keys
        assert list(excluded) == list(cfg.hydra.job.config.override_dirname.exclude_keys)
        for key in (override.split("=")[0] for override in overrides):
            assert key in dirs[-1] or key in excluded, key


def test_launches_into_one_resumable_dir_never_share_a_job_dir(tmp_path):
    """experiments/results_smollm2.sh launches one sweep per sparsity into one dir: the constant
    ``sparsity.ratio`` of each launch must name its jobs, or the second launch meets the first."""
    dirs = []
    for ratio in ("0.5", "0.7"):
        args = ("experiment=tiny_sweep", f"hydra.sweep.dir={tmp_path}", f"sparsity.ratio={ratio}")
        with multirun_config(*args, "method=magnitude,wanda") as cfg:
            name_jobs_by_their_axes(cfg)
            dirs += [
                job["dir"] for job in preflight(cfg, validate_jobs="first", check_models=False)
            ]
    assert len(set(dirs)) == 4
    assert all(f"sparsity.ratio={ratio}" in d for d, ratio in zip(dirs, ["0.5"] * 2 + ["0.7"] * 2))


def test_reconstruct_llama1_launches_are_valid_and_never_share_a_dir():
    """experiments/reconstruct_llama1.sh needs LLaMA-7B, so it cannot run here: its launches are
    checked as the preflight checks them (every job valid, without the model), and no two of its
    jobs may meet in one dir of the sweep."""
    script = (ROOT / "experiments" / "reconstruct_llama1.sh").read_text()
    launches = [shlex.split(extra) for extra in re.findall(r'^launch (.*?)"\$@"', script, re.M)]
    assert len(launches) == 5
    dirs = []
    for extra in launches:
        with multirun_config("experiment=reconstruct_llama1", *extra) as cfg:
            name_jobs_by_their_axes(cfg)
            jobs = preflight(cfg, validate_jobs="all", check_models=False, check_data=False)
            dirs += [job["dir"] for job in jobs]
    assert len(dirs) == len(set(dirs)) == 41


def test_preflight_first_mode_still_checks_every_model():
    with (
        multirun_config(
            "experiment=tiny_sweep",
            "method=magnitude",
            "model=tiny_llama,hf",
            "model.name_or_path=/nonexistent/m",
        ) as cfg,
        pytest.raises(SweepPreflightError, match="/nonexistent/m"),
    ):
        preflight(cfg, validate_jobs="first")


def test_preflight_refuses_a_finished_job_dir_of_another_config(tmp_path):
    from gblm.run import config_hash

    args = ("experiment=tiny_sweep", f"hydra.sweep.dir={tmp_path}", "method=magnitude,wanda")
    with multirun_config(*args) as cfg:
        job = job_config(cfg, expand_sweep(cfg)[0])
        same = {"status": "finished", "config_hash": config_hash(to_plain(job))}
        (tmp_path / "method=magnitude").mkdir()
        (tmp_path / "method=magnitude" / "metrics.json").write_text(json.dumps(same))
        preflight(cfg)  # the same config: the relaunch will skip it
        other = {"status": "finished", "config_hash": "0" * 16}
        (tmp_path / "method=wanda").mkdir()
        (tmp_path / "method=wanda" / "metrics.json").write_text(json.dumps(other))
        with pytest.raises(SweepPreflightError, match=r"job #1 .*finished run of another config"):
            preflight(cfg)
    with multirun_config(*args, "overwrite=true") as cfg:
        assert [job["dir"] for job in preflight(cfg)] == ["method=magnitude", "method=wanda"]


def test_summary_of_an_empty_or_missing_sweep_dir(tmp_path):
    summary = summarize(tmp_path / "nothing")
    assert summary["total"] == 0 and summary["counts"]["failed"] == 0
    assert "0 job(s)" in format_summary(summary)


def test_slurm_launcher_config_renders_an_sbatch_script(tmp_path, monkeypatch):
    """hydra/launcher=slurm: every key is a valid submitit parameter (a fake srun stands in)."""
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    with multirun_config("hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}") as cfg:
        params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    # the same split of parameters as hydra_submitit_launcher's BaseSubmititLauncher.launch
    executor = submitit.AutoExecutor(
        folder=params.pop("submitit_folder"),
        cluster="slurm",
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m gblm", "uid")
    for line in (
        "--gpus-per-node=1",
        "--cpus-per-task=8",
        "--mem=128GB",
        "--time=720",
        "--job-name=gblm",
    ):
        assert line in script


# A real multirun ---------------------------------------------------------------------------------
def _gblm(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "gblm", "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _metrics(job_dir: Path) -> dict:
    return json.loads((job_dir / "metrics.json").read_text())


# the fixture's job dirs: a resumable sweep names its jobs by every override
MAGNITUDE, WANDA = "calibration=local,method=magnitude", "calibration=local,method=wanda"


@pytest.fixture(scope="module")
def crashed_then_resumed(tmp_path_factory):
    """tiny_sweep with magnitude and wanda on a local calibration file that is missing at first.

    Magnitude needs no calibration data and finishes; Wanda fails (the sweep preflight's data
    check is off, or it would stop the sweep). Then the file appears and the same command is
    launched again: magnitude is skipped, wanda redone.
    """
    tmp = tmp_path_factory.mktemp("sweep")
    sweep_dir, text = tmp / "sweep", tmp / "calibration.txt"
    args = [
        "experiment=tiny_sweep",
        f"hydra.sweep.dir={sweep_dir}",
        "method=magnitude,wanda",
        "calibration=local",
        f"calibration.paths=[{text}]",
        # the preflight would refuse the missing file: let the job fail at run time instead
        "hydra.callbacks.sweep.check_data=false",
    ]
    first = _gblm(*args)
    state = {
        "first": first,
        "summary": json.loads((sweep_dir / SUMMARY_FILE).read_text()),
        "magnitude_mtime": (sweep_dir / MAGNITUDE / "metrics.json").stat().st_mtime_ns,
        "magnitude_status": json.loads((sweep_dir / MAGNITUDE / JOB_STATUS_FILE).read_text()),
    }
    text.write_text(" ".join(f"word{i % 97} and more words, said she." for i in range(4000)))
    state["second"] = _gblm(*args)
    return sweep_dir, state


def test_crash_in_one_job_leaves_the_others_intact(crashed_then_resumed):
    sweep_dir, state = crashed_then_resumed
    first = state["first"]
    assert first.returncode != 0, first.stdout + first.stderr  # the failure is re-raised at the end
    summary = state["summary"]
    assert summary["counts"] == {
        "finished": 1,
        "skipped": 0,
        "failed": 1,
        "running": 0,
        "incomplete": 0,
        "pending": 0,
    }
    assert summary["failed"] == [WANDA]
    failed = next(job for job in summary["jobs"] if job["status"] == "failed")
    assert "DataUnavailableError" in failed["error"] and "calibration.txt" in failed["error"]
    assert "1 failed" in first.stdout and WANDA in first.stdout  # printed at exit
    plan = json.loads((sweep_dir / PLAN_FILE).read_text())["jobs"]
    assert [job["dir"] for job in plan] == [
        MAGNITUDE,
        WANDA,
    ]
    assert all((sweep_dir / job["dir"] / ".hydra").is_dir() for job in plan)  # where Hydra put them


def test_relaunch_skips_finished_and_redoes_failed(crashed_then_resumed):
    sweep_dir, state = crashed_then_resumed
    second = state["second"]
    assert second.returncode == 0, second.stdout + second.stderr
    summary = json.loads((sweep_dir / SUMMARY_FILE).read_text())
    assert summary["counts"]["skipped"] == 1 and summary["counts"]["finished"] == 1
    assert summary["skipped"] == [MAGNITUDE]
    assert summary["finished"] == [WANDA]
    magnitude = sweep_dir / MAGNITUDE
    assert (magnitude / "metrics.json").stat().st_mtime_ns == state[
        "magnitude_mtime"
    ]  # not rewritten
    status, first_run = (
        json.loads((magnitude / JOB_STATUS_FILE).read_text()),
        state["magnitude_status"],
    )
    assert status["status"] == "skipped" and first_run["status"] == "finished"
    # the skip keeps which launch produced the metrics, and how long that run took
    assert status["produced_by"] == {k: first_run[k] for k in ("launch_id", "ended", "seconds")}
    assert status["launch_id"] != first_run["launch_id"]
    assert "already finished with the same config: skipped" in (second.stdout + second.stderr)
    assert "pruned ppl" in second.stdout  # the comparison table, both jobs in it
    # the jobs by their folder
    table = [line.split() for line in second.stdout.splitlines() if line.startswith("  calib")]
    assert sorted(row[0] for row in table) == [MAGNITUDE, WANDA]
    # one metrics.json per job, every one finished
    job_dirs = sorted(p.parent for p in sweep_dir.glob("*/metrics.json"))
    assert [p.name for p in job_dirs] == [
        MAGNITUDE,
        WANDA,
    ]
    assert all(_metrics(p)["status"] == "finished" for p in job_dirs)
    assert _metrics(job_dirs[1])["sparsity_check"]["overall"] == pytest.approx(0.5, abs=0.01)


def test_job_dirs_are_where_hydra_puts_them(tmp_path):
    """A real multirun with non-default dir naming: the planned dirs are Hydra's own job dirs.

    The job number in the dir, another kv_sep and item_sep, an excluded key, a sweep axis from
    the experiment replaced on the command line, a range sweep, a new key (+) whose quoted value
    holds "=". Every job fails fast (the new key is not in the schema), once Hydra has made its dir.
    """
    sweep_dir = tmp_path / "sweep"
    result = _gblm(
        "experiment=tiny_sweep",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweep.subdir=${hydra.job.num}_${hydra.job.override_dirname}",
        "hydra.job.config.override_dirname.kv_sep=-",
        "hydra.job.config.override_dirname.item_sep=__",
        "hydra.callbacks.sweep.validate_jobs=none",  # let the bad jobs start
        "hydra.callbacks.sweep.check_models=false",
        "method=wanda,magnitude",
        "calibration.seed=range(1,3)",
        "+tag='a=b'",
        "progress=false",  # an excluded key
    )
    assert "not a key of the config" in result.stdout + result.stderr, result.stderr[-3000:]
    plan = json.loads((sweep_dir / PLAN_FILE).read_text())["jobs"]
    hydra_dirs = sorted(
        p.parent.relative_to(sweep_dir).as_posix() for p in sweep_dir.glob("*/.hydra")
    )
    assert sorted(job["dir"] for job in plan) == hydra_dirs and len(plan) == 4
    # +tag has one value in every job: it names none (method is also an axis of the experiment)
    assert plan[1]["dir"] == "1_calibration.seed-2__method-wanda"
    for job in plan:
        saved = OmegaConf.load(sweep_dir / job["dir"] / ".hydra" / "hydra.yaml").hydra
        assert list(saved.overrides.task) == job["overrides"] and saved.job.num == job["num"]
        ours = override_dirname(job["overrides"], saved.job.config.override_dirname)
        assert ours == saved.job.override_dirname
    summary = json.loads((sweep_dir / SUMMARY_FILE).read_text())
    assert summary["counts"]["failed"] == 4 and summary["failed"] == [job["dir"] for job in plan]


@pytest.mark.slow
def test_preflight_failure_from_the_command_line(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = _gblm(
        "experiment=tiny_sweep", f"hydra.sweep.dir={sweep_dir}", "sparsity.ratio=0.5,1.5"
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no job was started" in result.stderr and "sparsity.ratio=1.5" in result.stderr
    assert not sweep_dir.exists()  # no job started


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["slurm_local", "submitit_local", "local_parallel"])
def test_other_launchers_run_a_small_sweep(tmp_path, launcher):
    """The SLURM code path (submitit, local executor) and joblib: two jobs, then a resume."""
    sweep_dir = tmp_path / "sweep"
    args = [
        "experiment=tiny_sweep",
        f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={sweep_dir}",
        "method=magnitude,wanda",
    ]
    first = _gblm(*args, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert json.loads((sweep_dir / SUMMARY_FILE).read_text())["counts"]["finished"] == 2
    assert all(
        _metrics(sweep_dir / f"method={m}")["status"] == "finished" for m in ("magnitude", "wanda")
    )
    if launcher == "local_parallel":  # each of its 2 jobs gets its share of the cores
        share = max(len(os.sched_getaffinity(0)) // 2, 1)
        for m in ("magnitude", "wanda"):
            assert _metrics(sweep_dir / f"method={m}")["provenance"]["threads"] == share
    second = _gblm(*args, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert json.loads((sweep_dir / SUMMARY_FILE).read_text())["counts"]["skipped"] == 2


@pytest.mark.slow
def test_tiny_sweep_runs_every_method(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = _gblm("experiment=tiny_sweep", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stdout + result.stderr
    for method in ("magnitude", "wanda", "sparsegpt", "gblm"):
        metrics = _metrics(sweep_dir / f"method={method}")
        assert metrics["status"] == "finished" and metrics["method"] == method
        assert metrics["sparsity_check"]["overall"] == pytest.approx(0.5, abs=0.01)


def test_comparison_table_orders_finished_jobs_by_pruned_perplexity():
    job = lambda status, ov, ppl: {"status": status, "overrides": ov, "ppl": ppl,  # noqa: E731
                                   "dir": ov[-1]}  # fmt: skip
    summary = {"jobs": [
        job("finished", ["experiment=x", "method=wanda"], {"dense": 10.0, "pruned": 30.0}),
        job("skipped", ["method=gblm"], {"dense": 10.0, "pruned": 20.0}),
        job("failed", ["method=sparsegpt"], {}),
        job("finished", ["method=dense"], {"dense": 10.0}),
    ]}  # fmt: skip
    lines = format_comparison(summary).splitlines()
    assert lines[0].split() == ["job", "dense", "ppl", "pruned", "ppl"]
    assert [line.split()[0] for line in lines[1:]] == [
        "method=dense",
        "method=gblm",
        "method=wanda",
    ]
    assert lines[2].split()[1:] == ["10.00", "20.00"] and lines[1].split()[2] == "-"
    assert format_comparison({"jobs": []}) == ""


def test_preflight_checks_the_data_of_a_job_whose_weight_update_calibrates(tmp_path):
    """Magnitude reads no calibration text, magnitude + OBS does: the preflight's check of each
    distinct job input must not take the second for the first (both name method=magnitude)."""
    missing = tmp_path / "no_such_calibration.txt"
    with (
        multirun_config(
            "experiment=tiny_sweep", f"hydra.sweep.dir={tmp_path}", "method=magnitude",
            "reconstruct=none,obs", "calibration=local", f"calibration.paths=[{missing}]",
        ) as cfg,
        pytest.raises(SweepPreflightError, match=r"job #1: .*no_such_calibration"),
    ):  # fmt: skip
        preflight(cfg)


def test_comparison_table_puts_a_diverged_job_last_and_keeps_the_order():
    """A NaN perplexity (a diverged job) compares false with every number: it used to leave the
    table unsorted, a worse job printed above the best one."""
    summary = {"jobs": [
        {"status": "finished", "dir": d, "ppl": {"dense": 10.0, "pruned": p}}
        for d, p in (("a", 50.0), ("b", float("nan")), ("c", 20.0), ("d", float("inf")), ("e", 30.0))
    ]}  # fmt: skip
    lines = format_comparison(summary).splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["c", "e", "a", "d", "b"]
    assert lines[-1].split()[-1] == "nan"
