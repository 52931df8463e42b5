"""Sweep preflight and summary: the Hydra callback ``hydra/callbacks=sweep`` of every multirun.

Before any job starts, :func:`preflight` expands the sweep as Hydra's basic sweeper does and checks
every job (config, model, data, job dir): problems stop the sweep, exit status 2; else the jobs go
to ``sweep_plan.json``. Each job's end writes its ``job_status.json`` and a fresh
``sweep_summary.json`` (:mod:`gblm.sweep_status`); the sweep's end prints the summary.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from gblm.loggers.local import METRICS_FILE, read_metrics
from gblm.sweep_status import (
    JOB_STATUS_FILE,
    PLAN_FILE,
    format_comparison,
    format_summary,
    now,
    write_summary,
)
from gblm.utils import atomic_write_json, read_json

log = logging.getLogger("gblm.sweep")

VALIDATE_MODES = ("all", "first", "none")
_MODEL_KEYS = ("model", "experiment")  # overrides that can change a job's model
_MAX_LISTED_ERRORS = 20


class SweepPreflightError(RuntimeError):
    """The sweep cannot run as configured; raised before any job starts, listing every reason."""


# The jobs of a sweep ---------------------------------------------------------------------------
def sweep_axes(config: DictConfig) -> dict[str, list[str]] | None:
    """The axes of a multirun, each key with its values as overrides (``{"method": ["method=a",
    "method=b"]}``), as Hydra's basic sweeper reads them: ``hydra.sweeper.params``, then the
    command line, a later key replacing an earlier one in its place. None for another sweeper."""
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    if not target.endswith("BasicSweeper"):
        return None
    hydra = GlobalHydra.instance()  # its config loader lists the groups of glob() sweeps
    loader = hydra.config_loader() if hydra.is_initialized() else None
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    axes: dict[str, list[str]] = {}
    parser = OverridesParser.create(config_loader=loader)
    for override in parser.parse_overrides(arguments + list(config.hydra.overrides.task)):
        key = override.get_key_element()
        if not override.is_sweep_override():
            values = [override.get_value_element_as_str()]
        elif override.is_discrete_sweep():
            values = list(override.sweep_string_iterator())
        else:
            raise SweepPreflightError(f"{override.input_line}: the basic sweeper sweeps lists only")
        axes[key] = [f"{key}={value}" for value in values]
    return axes


def expand_sweep(config: DictConfig) -> list[list[str]] | None:
    """The jobs of a multirun, one override list each, in the basic sweeper's order: the product
    of :func:`sweep_axes`, first key outermost (None for another sweeper)."""
    axes = sweep_axes(config)
    return None if axes is None else [list(job) for job in itertools.product(*axes.values())]


def unnamed_keys(config: DictConfig) -> list[str]:
    """The keys with one value for every job, in a sweep of two or more jobs whose dirs hold the
    job's number. A resumable sweep (job dirs named by the overrides alone) drops none: its dirs
    are the jobs' identities across launches, which may differ in a constant key."""
    subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir", "")
    if "hydra.job.num" not in str(subdir):
        return []
    axes = sweep_axes(config)
    if not axes or math.prod(len(values) for values in axes.values()) < 2:
        return []
    constant = [values[0] for values in axes.values() if len(values) == 1]
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(constant)]


def name_jobs_by_their_axes(config: DictConfig) -> None:
    """Job dirs and names hold only the keys the sweep varies: :func:`unnamed_keys` join
    ``hydra.job.config.override_dirname.exclude_keys``, in the multirun's config and in its Hydra
    overrides, with which every launcher composes each job."""
    naming = config.hydra.job.config.override_dirname
    added = [key for key in unnamed_keys(config) if key not in naming.exclude_keys]
    if not added:
        return
    exclude = [*naming.exclude_keys, *added]
    listed = ",".join(repr(key) for key in exclude)
    override = f"hydra.job.config.override_dirname.exclude_keys=[{listed}]"
    with read_write(config.hydra), open_dict(config.hydra):
        naming.exclude_keys = exclude
        config.hydra.overrides.hydra.append(override)


def override_dirname(overrides: Sequence[str], naming: DictConfig) -> str:
    """A job's ``hydra.job.override_dirname`` as Hydra computes it from ``naming``
    (``hydra.job.config.override_dirname``): its overrides as typed, less ``hydra.*`` and the
    ``exclude_keys``, sorted, joined by ``item_sep``, ``=`` made ``kv_sep``."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    excluded = naming.exclude_keys
    keep = (o for o in parsed if not o.is_hydra_override() and o.key_or_group not in excluded)
    return naming.item_sep.join(sorted(str(o.input_line) for o in keep)).replace("=", naming.kv_sep)


def job_dirs(master: DictConfig, jobs: Sequence[Sequence[str]]) -> list[str]:
    """Each job's dir in the sweep dir: ``hydra.sweep.subdir`` with the job's number and dirname."""
    naming = master.hydra.job.config.override_dirname
    node = master.copy()
    dirs = []
    for num, overrides in enumerate(jobs):
        dirname = override_dirname(overrides, naming)
        with read_write(node.hydra), open_dict(node.hydra):
            node.hydra.job.num, node.hydra.job.override_dirname = num, dirname
        dirs.append(str(node.hydra.sweep.subdir))
    return dirs


def job_config(master: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The config a job's task function receives (no ``hydra`` node), composed as a launcher does."""
    cfg = GlobalHydra.instance().config_loader().load_sweep_config(master, list(overrides))
    with read_write(cfg), open_dict(cfg):
        cfg.pop("hydra")
    return cfg


def sweep_dir_of(config: DictConfig) -> Path:
    """The absolute sweep directory of a multirun (or job) config."""
    return Path(str(config.hydra.sweep.dir)).absolute()


# Preflight -------------------------------------------------------------------------------------
def preflight(
    master: DictConfig,
    validate_jobs: str = "all",
    check_models: bool = True,
    check_data: bool = True,
) -> list[dict[str, Any]]:
    """Check every job of the multirun ``master`` before any starts (see :class:`SweepCallback`
    for the options); returns the jobs in launch order, each ``{"num", "overrides", "dir"}``
    (relative to the sweep dir), none for a sweeper other than the basic one.

    Raises:
        SweepPreflightError: one line per problem: a config that does not compose or validate, a
            model that cannot be loaded, an input the run would refuse, two jobs sharing a job
            dir, a job dir the run would refuse (:func:`gblm.run.run_dir_refusal`).
    """
    if validate_jobs not in VALIDATE_MODES:
        raise SweepPreflightError(f"validate_jobs={validate_jobs!r}: choose all, first or none")
    jobs = expand_sweep(master)
    if jobs is None:
        log.warning("sweep preflight: only Hydra's basic sweeper is expanded; jobs not checked")
        return []
    dirs = job_dirs(master, jobs)
    errors = _shared_dirs(jobs, dirs)
    indices = _jobs_to_check(jobs, validate_jobs, check_models)
    errors += _check_jobs(master, jobs, dirs, indices, check_models, check_data)
    if errors:
        more = len(errors) - _MAX_LISTED_ERRORS
        raise SweepPreflightError(
            f"sweep preflight found {len(errors)} problem(s) in {len(jobs)} job(s); no job was "
            "started:\n"
            + "\n".join(f"  - {line}" for line in errors[:_MAX_LISTED_ERRORS])
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    return [{"num": i, "overrides": ov, "dir": d} for i, (ov, d) in enumerate(zip(jobs, dirs))]


def _shared_dirs(jobs: Sequence[Sequence[str]], dirs: Sequence[str]) -> list[str]:
    """One line per job dir that two or more jobs would write into."""
    by_dir: dict[str, list[int]] = {}
    for i, d in enumerate(dirs):
        by_dir.setdefault(d, []).append(i)
    return [
        f"jobs {', '.join(f'#{i}' for i in nums)} would all write into {d!r}: the overrides that "
        f"tell them apart ({' / '.join(' '.join(jobs[i]) for i in nums[:2])}) are in "
        "hydra.job.config.override_dirname.exclude_keys"
        for d, nums in by_dir.items()
        if len(nums) > 1
    ]


def _jobs_to_check(jobs: list[list[str]], validate_jobs: str, per_model: bool) -> list[int]:
    """The jobs to compose: all; or the first (``first``) and, with ``per_model``, one per model."""
    if validate_jobs == "all":
        return list(range(len(jobs)))
    chosen = {0} if validate_jobs == "first" and jobs else set()
    models: dict[tuple[str, ...], int] = {}
    for i, overrides in enumerate(jobs if per_model else []):
        keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
        model = [o for o, k in zip(overrides, keys) if k in _MODEL_KEYS or k.startswith("model.")]
        models.setdefault(tuple(model), i)
    return sorted(chosen | set(models.values()))


def _check_jobs(
    master: DictConfig,
    jobs: list[list[str]],
    dirs: list[str],
    indices: list[int],
    check_models: bool,
    check_data: bool,
) -> list[str]:
    """One line per problem of the jobs ``indices``; each distinct model and input is checked
    once (not the device, which the launching machine may lack)."""
    from gblm.config import build_method, build_plan, to_plain, validate
    from gblm.models.loading import check_model_available
    from gblm.pipeline import inputs as run_inputs
    from gblm.run import config_hash, run_dir_refusal

    errors: list[str] = []
    available: dict[tuple, bool] = {}  # model -> loadable here
    inputs: set[tuple] = set()
    for i in indices:
        job = f"job #{i} ({' '.join(jobs[i])})"
        try:
            container = to_plain(job_config(master, jobs[i]))
            s = validate(container)
            method, plan = build_method(s), build_plan(s)
            job_dir = sweep_dir_of(master) / dirs[i]
            previous, digest = read_metrics(job_dir), config_hash(container)
            reason = run_dir_refusal(s, job_dir, previous, digest, container)
        except Exception as err:  # every kind of bad config: report them all, then stop
            errors.append(f"{job}: {type(err).__name__}: {err}")
            continue
        errors += [f"{job}: {reason}"] if reason else []
        spec = s.model
        model = (spec.kind, spec.name_or_path, spec.revision, json.dumps(spec.tiny, sort_keys=True))
        if check_models and model not in available:
            try:
                check_model_available(spec)
                available[model] = True
            except Exception as err:
                available[model] = False
                errors.append(f"model {spec.name} (job #{i}): {type(err).__name__}: {err}")
        # what the inputs' checks read: the method and its weight update decide the calibration
        data = (s.calibration, s.eval, s.method, s.reconstruct, s.sparsity, s.mask_images)
        key = (model, *map(repr, data))
        if not (check_models and check_data and available[model]) or key in inputs:
            continue
        inputs.add(key)
        try:
            run_inputs(s, method, plan, check_device=False)
        except Exception as err:
            errors.append(f"job #{i}: {type(err).__name__}: {' '.join(str(err).split())}")
    return errors


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


# The callback ----------------------------------------------------------------------------------
class SweepCallback(Callback):
    """Preflight before a multirun, a status record per job, and ``sweep_summary.json``.

    Args:
        validate_jobs: ``all`` | ``first`` | ``none``: which jobs are composed and validated
            (beyond one job per model, which ``check_models`` composes to learn the model).
        check_models: check that every distinct model can be loaded here (offline-aware).
        check_data: also run each distinct job input through the run's preflight (data files,
            enough tokens for nsamples x seqlen, the model's context length).

    ``on_multirun_end`` is skipped when a job fails (the basic sweeper re-raises), so the summary
    is also printed at exit; the preflight stops the sweep with ``SystemExit``, since Hydra turns
    a callback's ``Exception`` into a warning.
    """

    def __init__(
        self, validate_jobs: str = "all", check_models: bool = True, check_data: bool = True
    ) -> None:
        self.checks = (validate_jobs, check_models, check_data)
        self._sweep_dir: Path | None = None  # set on the launching machine, until reported
        self._started: dict[str, tuple[float, int | None]] = {}  # job dir -> time, metrics mtime

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tic = time.perf_counter()
        try:
            name_jobs_by_their_axes(config)
            jobs = preflight(config, *self.checks)
        except SweepPreflightError as err:  # SystemExit, not an Exception: the sweep stops
            print(f"gblm: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        self._sweep_dir = sweep_dir_of(config)
        if jobs:
            launch_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%f}-{os.getpid()}"
            plan = {"launch_id": launch_id, "started": now(), "sweep_dir": str(self._sweep_dir),
                    "validate_jobs": self.checks[0], "jobs": jobs}  # fmt: skip
            atomic_write_json(self._sweep_dir / PLAN_FILE, plan)
        took = time.perf_counter() - tic
        log.info("sweep preflight: %d job(s) checked (validate_jobs=%s, check_models=%s, "
                 "check_data=%s) in %.1f s", len(jobs), *self.checks, took)  # fmt: skip
        atexit.register(self._report)  # a failed job skips on_multirun_end

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._report()

    def _report(self) -> None:
        """Write and print the summary, once."""
        sweep_dir, self._sweep_dir = self._sweep_dir, None
        if sweep_dir is None:
            return
        try:
            summary = write_summary(sweep_dir)
        except Exception as err:  # never mask the sweep's own error at exit
            log.warning("sweep summary not written: %s", err)
            return
        table = format_comparison(summary)
        print(format_summary(summary) + ("\n" + table if table else ""), flush=True)
        if summary["counts"]["failed"]:
            log.error("sweep: %d job(s) failed; relaunch the same command to redo them (finished "
                      "ones are skipped)", summary["counts"]["failed"])  # fmt: skip

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        out = str(config.hydra.runtime.output_dir)
        self._started[out] = (time.time(), _mtime(Path(out) / METRICS_FILE))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if getattr(config.hydra.mode, "name", config.hydra.mode) != "MULTIRUN":
            return
        out, sweep_dir = Path(str(config.hydra.runtime.output_dir)), sweep_dir_of(config)
        started, mtime = self._started.pop(str(out), (time.time(), None))
        before = read_json(out / JOB_STATUS_FILE) or {}  # an earlier launch's record
        status, error = "finished", None
        if job_return.status == JobStatus.FAILED:
            exc = job_return._return_value  # .return_value re-raises the job's exception
            status, error = "failed", f"{type(exc).__name__}: {exc}"
        elif mtime is not None and _mtime(out / METRICS_FILE) == mtime:
            status = "skipped"  # run() found it finished with the same config: not rewritten
        record = {
            "launch_id": (read_json(sweep_dir / PLAN_FILE) or {}).get("launch_id"),
            "num": int(config.hydra.job.num),
            "overrides": list(config.hydra.overrides.task),
            "status": status,
            "error": error,
            "ended": now(),
            "seconds": round(time.time() - started, 3),
        }
        if status == "skipped" and before.get("status") in ("finished", "skipped"):
            produced = {key: before.get(key) for key in ("launch_id", "ended", "seconds")}
            record["produced_by"] = before.get("produced_by", produced)  # who ran the kept run
        atomic_write_json(out / JOB_STATUS_FILE, record)
        if status == "failed":
            log.error("sweep job #%s failed: %s (log: %s)", record["num"], error, out / "run.log")
        try:
            write_summary(sweep_dir)
        except Exception as err:  # the summary is a convenience: never fail a job for it
            log.warning("sweep summary not written: %s", err)
