"""Sweep preflight and failure summary: a Hydra callback for multiruns.

A paper sweep can hold a hundred GPU jobs. A typo in one point of it, or a model that is not on
disk, should stop it before the first job is queued; and when it ends, one file should say which
jobs finished, which were skipped as already done, and which failed and why.

Registered with ``hydra/callbacks=sweep`` (``conf/hydra/callbacks/sweep.yaml``):

- ``on_multirun_start`` (on the launching machine): expand the sweep as the basic sweeper does,
  compose every job's config, validate it (:func:`gblm.config.validate` and the method's
  constructor), check every distinct model with :func:`gblm.models.loading.check_model_available`
  and check that no two jobs share a job dir. Any problem stops the sweep before any job starts,
  with one line per reason (:class:`SweepPreflightError`'s message, exit status 2). Otherwise the
  plan (each job's overrides and dir) is written to ``sweep_plan.json`` in the sweep dir.
- ``on_job_start`` / ``on_job_end`` (in the job's process, whatever the launcher): write
  ``job_status.json`` into the job dir (finished | skipped | failed, with the error) and rewrite
  ``sweep_summary.json`` in the sweep dir, so the summary is current even if the sweep is killed.
- ``on_multirun_end``: rewrite the summary and print it.

Two Hydra 1.3 behaviours shape this. Hydra turns an ``Exception`` raised by a callback into a
warning and goes on, so the preflight stops the sweep with ``SystemExit``. And the basic sweeper
re-raises a failed job's exception after all jobs of the batch ran, so ``on_multirun_end`` is not
called when a job failed; the launching process therefore also prints the summary at exit.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from gblm.utils import atomic_write_json, file_lock

log = logging.getLogger("gblm.sweep")

PLAN_FILE = "sweep_plan.json"
SUMMARY_FILE = "sweep_summary.json"
JOB_STATUS_FILE = "job_status.json"
METRICS_FILE = "metrics.json"
# finished: ran to the end in this launch (or in an earlier one, when not relaunched since);
# skipped: found finished with the same config, not redone; failed: raised; running: its process
# holds the run lock; incomplete: a job dir whose run ended without a result
# (interrupted by a signal, or killed: "running" with no live process) or never started one;
# pending: no job dir yet.
STATUSES = ("finished", "skipped", "failed", "running", "incomplete", "pending")
VALIDATE_MODES = ("all", "first", "none")
# Overrides that can change the model of a job: one job per distinct combination is checked.
_MODEL_KEYS = ("model", "experiment")
_MAX_LISTED_ERRORS = 20
_SKIP_DIRS = {".submitit", ".hydra", "masks", "model"}


class SweepPreflightError(RuntimeError):
    """The sweep cannot run as configured; raised before any job starts, listing every reason."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _produced_by(status: dict[str, Any] | None) -> dict[str, Any] | None:
    """Which launch ran the job whose metrics a skip keeps: from its last ``job_status.json``."""
    if not status:
        return None
    if status.get("status") == "skipped":
        return status.get("produced_by")
    if status.get("status") != "finished":
        return None
    return {key: status.get(key) for key in ("launch_id", "ended", "seconds")}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _is_multirun(config: DictConfig) -> bool:
    mode = OmegaConf.select(config, "hydra.mode")
    return getattr(mode, "name", str(mode)) == "MULTIRUN"


def sweep_dir_of(config: DictConfig) -> Path:
    """The absolute sweep directory of a multirun (or job) config."""
    return Path(str(config.hydra.sweep.dir)).absolute()


def expand_sweep(config: DictConfig) -> list[list[str]] | None:
    """The jobs of a multirun, one override list each, in the order the basic sweeper runs them.

    Args:
        config: the multirun's config (with its ``hydra`` node), as ``on_multirun_start`` gets it.

    Returns:
        The override lists (``hydra.sweeper.params`` first, then the command line, a command-line
        key replacing a sweeper key), or ``None`` for a sweeper other than Hydra's basic one.
    """
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    if not target.endswith("BasicSweeper"):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = (
        GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
    )
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(config.hydra.overrides.task)
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    return BasicSweeper.split_arguments(overrides, None)[0]


def job_subdirs(master: DictConfig, jobs: Sequence[Sequence[str]]) -> list[str]:
    """Each job's ``hydra.sweep.subdir`` as the launcher will resolve it (job number, dirname)."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    naming = master.hydra.job.config.override_dirname
    node = master.copy()
    subdirs = []
    for num, overrides in enumerate(jobs):
        parsed = [o for o in parser.parse_overrides(list(overrides)) if not o.is_hydra_override()]
        dirname = get_overrides_dirname(
            parsed, list(naming.exclude_keys), naming.item_sep, naming.kv_sep
        )
        with read_write(node.hydra), open_dict(node.hydra):
            node.hydra.job.num = num
            node.hydra.job.override_dirname = dirname
        subdirs.append(str(OmegaConf.select(node, "hydra.sweep.subdir")))
    return subdirs


def _shared_dirs(jobs: Sequence[Sequence[str]], subdirs: Sequence[str]) -> list[str]:
    """One line per job dir that two or more jobs would write into."""
    by_dir: dict[str, list[int]] = {}
    for i, subdir in enumerate(subdirs):
        by_dir.setdefault(subdir, []).append(i)
    return [
        f"jobs {', '.join(f'#{i}' for i in nums)} would all write into {subdir!r}: the overrides that "
        f"tell them apart ({' / '.join(' '.join(jobs[i]) for i in nums[:2])}) are in "
        f"hydra.job.config.override_dirname.exclude_keys"
        for subdir, nums in by_dir.items()
        if len(nums) > 1
    ]


def compose_job(master: DictConfig, overrides: Sequence[str], num: int) -> DictConfig:
    """A job's full config (with ``hydra``) exactly as the launcher composes it."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    cfg = loader.load_sweep_config(master, list(overrides))
    with open_dict(cfg.hydra.job):
        cfg.hydra.job.num = num
    return cfg


def task_config(cfg: DictConfig) -> DictConfig:
    """The config the task function receives: the job config without its ``hydra`` node."""
    task = cfg.copy()
    with read_write(task), open_dict(task):
        task.pop("hydra", None)
    return task


def _model_group(overrides: Sequence[str]) -> tuple[str, ...]:
    """The overrides of a job that can change its model."""
    keys = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in _MODEL_KEYS or key.startswith("model."):
            keys.append(item)
    return tuple(keys)


def _jobs_to_validate(jobs: list[list[str]], validate_jobs: str, check_models: bool) -> list[int]:
    if validate_jobs == "all":
        return list(range(len(jobs)))
    chosen: dict[tuple[str, ...], int] = {}
    if check_models:  # one job per distinct model: its spec comes from its composed config
        for i, overrides in enumerate(jobs):
            chosen.setdefault(_model_group(overrides), i)
    indices = set(chosen.values())
    if validate_jobs == "first" and jobs:
        indices.add(0)
    return sorted(indices)


def _validate_jobs(
    master: DictConfig,
    jobs: list[list[str]],
    subdirs: list[str],
    indices: list[int],
    errors: list[str],
) -> tuple[dict[tuple, tuple[int, Any]], dict[tuple, tuple[int, Any]]]:
    """Compose and validate the jobs ``indices``; append one line per problem to ``errors``.

    A problem is a config that does not compose or validate, or a job dir the run would refuse
    (:func:`gblm.run.run_dir_refusal`: a finished run of another config there, or a live one).
    Returns the distinct models seen, ``key -> (job index, ModelSpec)``, and the distinct job
    inputs (for the run's own preflight), ``key -> (job index, RunSettings)``.
    """
    from gblm.config import to_plain, validate
    from gblm.loggers.local import read_metrics
    from gblm.run import build_method, config_hash, run_dir_refusal

    sweep_dir = sweep_dir_of(master)
    models: dict[tuple, tuple[int, Any]] = {}
    inputs: dict[tuple, tuple[int, Any]] = {}
    for i in indices:
        try:
            container = to_plain(task_config(compose_job(master, jobs[i], i)))
            settings = validate(container)
            build_method(settings)
            job_dir = sweep_dir / subdirs[i]
            reason = run_dir_refusal(
                settings, job_dir, read_metrics(job_dir), config_hash(container), container
            )
        except Exception as err:  # every kind of bad config: report them all, then stop
            errors.append(f"job #{i} ({' '.join(jobs[i])}): {type(err).__name__}: {err}")
            continue
        if reason:
            errors.append(f"job #{i} ({' '.join(jobs[i])}): {reason}")
        spec = settings.model
        key = (spec.kind, spec.name_or_path, spec.revision, json.dumps(spec.tiny, sort_keys=True))
        models.setdefault(key, (i, spec))
        inputs.setdefault((key, *_inputs_key(settings)), (i, settings))
    return models, inputs


def _inputs_key(settings) -> tuple[str, ...]:
    """What the run's own preflight checks beyond the model: data, lengths, method, tasks."""
    parts = (settings.calibration, settings.perplexity, settings.zeroshot, settings.method_name)
    return tuple(repr(p) for p in parts) + (repr(settings.sparsity_per_block),)


def _check_inputs(jobs: list[tuple[int, Any]]) -> list[str]:
    """The run's preflight (data files, enough tokens, context length) once per distinct input.

    The device is not checked: the launching machine may have no GPU that the jobs will have.
    """
    from gblm.run import build_method, build_plan
    from gblm.run import preflight as run_preflight

    errors = []
    for i, settings in jobs:
        try:
            method = build_method(settings)
            run_preflight(settings, method, build_plan(settings, method), check_device=False)
        except Exception as err:  # report every job's reason, then stop
            errors.append(f"job #{i}: {type(err).__name__}: {' '.join(str(err).split())}")
    return errors


def preflight(
    master: DictConfig,
    validate_jobs: str = "all",
    check_models: bool = True,
    check_data: bool = True,
) -> list[dict[str, Any]]:
    """Compose and validate the sweep's jobs and check its models; raise before anything runs.

    Args:
        master: the multirun's config.
        validate_jobs: ``all`` jobs, the ``first`` one, or ``none`` (beyond one job per model,
            which ``check_models`` composes to learn the model).
        check_models: check that every distinct model can be loaded here (offline-aware).
        check_data: with ``check_models``, run every distinct job input through the run's own
            preflight (:func:`gblm.run.preflight`: data files, enough tokens, context length).

    Returns:
        The sweep's jobs in launch order, each ``{"num", "overrides", "dir"}`` (``dir``: its job
        dir relative to the sweep dir); empty for a sweeper other than the basic one.

    Raises:
        SweepPreflightError: with one line per problem: a config that does not compose or validate,
            a model that cannot be loaded, two jobs that would share a job dir, a job dir that
            holds a finished run of another config (without ``overwrite=true``) or a live run.
    """
    from gblm.models.loading import check_model_available

    if validate_jobs not in VALIDATE_MODES:
        raise SweepPreflightError(
            f"validate_jobs={validate_jobs!r}: choose one of {', '.join(VALIDATE_MODES)}."
        )
    jobs = expand_sweep(master)
    if jobs is None:
        log.warning("sweep preflight: only Hydra's basic sweeper is expanded; jobs not checked")
        return []
    subdirs = job_subdirs(master, jobs)
    errors = _shared_dirs(jobs, subdirs)
    indices = _jobs_to_validate(jobs, validate_jobs, check_models)
    models, inputs = _validate_jobs(master, jobs, subdirs, indices, errors)
    if check_models:
        bad_models = set()
        for key, (i, spec) in models.items():
            try:
                check_model_available(spec)
            except Exception as err:
                bad_models.add(key)
                errors.append(f"model {spec.name} (job #{i}): {type(err).__name__}: {err}")
        if check_data:
            errors += _check_inputs([v for k, v in inputs.items() if k[0] not in bad_models])
    if errors:
        listed = errors[:_MAX_LISTED_ERRORS]
        more = len(errors) - len(listed)
        raise SweepPreflightError(
            f"sweep preflight found {len(errors)} problem(s) in {len(jobs)} job(s); no job was started:\n"
            + "\n".join(f"  - {line}" for line in listed)
            + (f"\n  ... and {more} more" if more else "")
        )
    return [
        {"num": i, "overrides": list(ov), "dir": subdir}
        for i, (ov, subdir) in enumerate(zip(jobs, subdirs))
    ]


def _job_dirs(sweep_dir: Path, max_depth: int = 4) -> dict[tuple[str, ...], Path]:
    """Job dirs under ``sweep_dir`` (they hold ``.hydra/overrides.yaml``), keyed by their overrides."""
    found: dict[tuple[str, ...], Path] = {}
    base_depth = len(sweep_dir.parts)
    for root, dirs, _files in os.walk(sweep_dir):
        path = Path(root)
        overrides_file = path / ".hydra" / "overrides.yaml"
        if path != sweep_dir and overrides_file.exists():
            overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) or []
            found[tuple(str(o) for o in overrides)] = path
            dirs.clear()  # a job dir holds no other job dir
            continue
        if len(path.parts) - base_depth >= max_depth:
            dirs.clear()
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
    return found


def _existing_job_dir(path: Path) -> Path | None:
    return path if (path / ".hydra").is_dir() or (path / METRICS_FILE).exists() else None


def _job_entry(
    num: int | None,
    overrides: Sequence[str],
    job_dir: Path | None,
    sweep_dir: Path,
    launch_id: str | None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "num": num,
        "overrides": list(overrides),
        "dir": None,
        "status": "pending",
        "this_launch": False,
        "error": None,
    }
    if job_dir is None:
        return entry
    entry["dir"] = os.path.relpath(job_dir, sweep_dir)
    record = _read_json(job_dir / JOB_STATUS_FILE)
    metrics = _read_json(job_dir / METRICS_FILE) or {}
    if record and launch_id is not None and record.get("launch_id") == launch_id:
        entry.update(status=record["status"], this_launch=True, error=record.get("error"))
    else:
        entry.update(_status_from_metrics(job_dir, metrics))
    if entry["status"] == "failed" and not entry["error"]:
        entry["error"] = metrics.get("error") or (record or {}).get("error")
    for key in ("run_name", "ppl"):
        if key in metrics:
            entry[key] = metrics[key]
    return entry


def _status_from_metrics(job_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """A job's status from its ``metrics.json`` alone (no record of this launch)."""
    from gblm.loggers.local import run_alive

    status = metrics.get("status")
    if status in ("finished", "failed"):
        return {"status": status}
    if status == "running":
        if run_alive(job_dir):
            return {"status": "running"}
        owner = metrics.get("process") or {}
        gone = f"killed: process {owner.get('pid')} on {owner.get('host')} is gone"
        return {"status": "incomplete", "error": gone}
    if status == "interrupted":
        return {"status": "incomplete", "error": metrics.get("error") or "interrupted"}
    return {"status": "incomplete"}


def summarize(sweep_dir: str | Path) -> dict[str, Any]:
    """The state of every job of the sweep in ``sweep_dir``, from its plan and its job dirs.

    The jobs are those of the last launch's ``sweep_plan.json``, each in its planned dir (or,
    without a plan, every job dir found). A job's status comes from its ``job_status.json`` when
    this launch wrote it, else from its ``metrics.json``: finished or failed (an earlier launch),
    ``running`` (its process is alive), ``incomplete`` (interrupted, killed, or no recorded end);
    ``pending`` when it has no dir yet.
    """
    sweep_dir = Path(sweep_dir).absolute()
    plan = _read_json(sweep_dir / PLAN_FILE)
    launch_id = plan.get("launch_id") if plan else None
    if plan:  # the planned dir of each job, where it exists
        jobs = [
            _job_entry(
                job["num"],
                job["overrides"],
                _existing_job_dir(sweep_dir / job["dir"]),
                sweep_dir,
                launch_id,
            )
            for job in plan["jobs"]
        ]
    else:  # no plan (another sweeper): every job dir found
        found = _job_dirs(sweep_dir) if sweep_dir.exists() else {}
        jobs = [
            _job_entry(None, list(ov), path, sweep_dir, None)
            for ov, path in sorted(found.items(), key=lambda kv: str(kv[1]))
        ]
    counts = {status: sum(job["status"] == status for job in jobs) for status in STATUSES}
    return {
        "sweep_dir": str(sweep_dir),
        "launch_id": launch_id,
        "updated": _now(),
        "total": len(jobs),
        "counts": counts,
        **{
            status: [
                job["dir"] or " ".join(job["overrides"]) for job in jobs if job["status"] == status
            ]
            for status in ("finished", "skipped", "failed", "running", "incomplete")
        },
        "jobs": jobs,
    }


def write_summary(sweep_dir: str | Path) -> dict[str, Any]:
    """Summarize the sweep and write ``sweep_summary.json`` atomically (jobs may end at once)."""
    sweep_dir = Path(sweep_dir).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / SUMMARY_FILE
    with file_lock(sweep_dir / ".sweep_summary"):  # hidden: <sweep dir>/.sweep_summary.lock
        summary = summarize(sweep_dir)
        atomic_write_json(path, summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the console: counts, then every failed job with its error and log."""
    counts = summary["counts"]
    parts = [f"{counts[s]} {s}" for s in STATUSES if counts[s] or s in ("finished", "failed")]
    lines = [f"sweep {summary['sweep_dir']}: {summary['total']} job(s): " + ", ".join(parts)]
    for job in summary["jobs"]:
        if job["status"] in ("failed", "incomplete"):
            where = (
                Path(summary["sweep_dir"]) / job["dir"] / "run.log" if job["dir"] else "no job dir"
            )
            label = " ".join(o for o in job["overrides"] if not o.startswith("experiment="))
            lines.append(
                f"  {job['status']} #{job['num']} {label}: {job['error'] or '-'} ({where})"
            )
    lines.append(f"summary: {Path(summary['sweep_dir']) / SUMMARY_FILE}")
    return "\n".join(lines)


def format_comparison(summary: dict[str, Any]) -> str:
    """A compact table of the finished jobs, best pruned perplexity first: what each job varied,
    dense and pruned perplexity. Empty when no job has a perplexity."""
    rows = []
    for job in summary["jobs"]:
        ppl = job.get("ppl") or {}
        if job["status"] in ("finished", "skipped") and ("pruned" in ppl or "dense" in ppl):
            varied = " ".join(o for o in job["overrides"]  # locations make no column
                              if not o.startswith("experiment=") and ".paths=" not in o)  # fmt: skip
            rows.append((ppl.get("pruned", ppl.get("dense")), varied or job.get("run_name") or "-",
                         ppl.get("dense"), ppl.get("pruned")))  # fmt: skip
    if not rows:
        return ""
    rows.sort(key=lambda r: (r[0] is None, r[0] if r[0] is not None else 0.0))
    width = max(len("job"), *(len(r[1]) for r in rows))

    def fmt(v: float | None) -> str:
        return "-" if v is None else (f"{v:.2f}" if abs(v) < 1e4 else f"{v:.3g}")

    lines = [f"  {'job':<{width}}  {'dense ppl':>10}  {'pruned ppl':>10}"]
    lines += [f"  {r[1]:<{width}}  {fmt(r[2]):>10}  {fmt(r[3]):>10}" for r in rows]
    return "\n".join(lines)


class SweepCallback(Callback):
    """Preflight before a multirun, a status record per job, and ``sweep_summary.json``.

    Args:
        validate_jobs: ``all`` | ``first`` | ``none``: which jobs are composed and validated
            before the sweep starts (``all`` costs about one config composition per job).
        check_models: check every distinct model of the sweep with ``check_model_available``.
        check_data: also run each distinct job input through the run's preflight (data files,
            enough tokens for nsamples x seqlen, the model's context length).
    """

    def __init__(
        self, validate_jobs: str = "all", check_models: bool = True, check_data: bool = True
    ) -> None:
        if validate_jobs not in VALIDATE_MODES:
            raise ValueError(
                f"validate_jobs={validate_jobs!r}: choose one of {', '.join(VALIDATE_MODES)}."
            )
        self.validate_jobs = validate_jobs
        self.check_models = check_models
        self.check_data = check_data
        self._sweep_dir: Path | None = None
        self._reported = False
        self._before: dict[str, tuple[str | None, int] | None] = {}
        self._started: dict[str, float] = {}
        self._produced: dict[str, dict[str, Any] | None] = {}

    # launching machine ------------------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tic = time.perf_counter()
        try:
            jobs = preflight(config, self.validate_jobs, self.check_models, self.check_data)
        except SweepPreflightError as err:
            # Hydra turns an Exception raised by a callback into a warning and starts the sweep
            # anyway; SystemExit is not an Exception, so it stops the sweep here.
            print(f"gblm: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        sweep_dir = sweep_dir_of(config)
        plan = {
            "launch_id": f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%f}-{os.getpid()}",
            "started": _now(),
            "sweep_dir": str(sweep_dir),
            "validate_jobs": self.validate_jobs,
            "jobs": jobs,
        }
        if jobs:
            atomic_write_json(sweep_dir / PLAN_FILE, plan)
        log.info(
            "sweep preflight: %d job(s) checked (validate_jobs=%s, check_models=%s) in %.1f s",
            len(jobs),
            self.validate_jobs,
            self.check_models,
            time.perf_counter() - tic,
        )
        self._sweep_dir = sweep_dir
        atexit.register(self._report_at_exit)  # a failed job skips on_multirun_end

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._report(sweep_dir_of(config))

    def _report(self, sweep_dir: Path) -> None:
        summary = write_summary(sweep_dir)
        self._reported = True
        text = format_summary(summary)
        table = format_comparison(summary)
        print(text + ("\n" + table if table else ""), flush=True)
        if summary["counts"]["failed"]:
            log.error(
                "sweep: %d job(s) failed; relaunch the same command to redo them (finished ones "
                "are skipped)",
                summary["counts"]["failed"],
            )

    def _report_at_exit(self) -> None:
        if self._reported or self._sweep_dir is None:
            return
        try:
            self._report(self._sweep_dir)
        except Exception as err:  # never mask the sweep's own error at exit
            log.warning("sweep summary not written: %s", err)

    # job process ------------------------------------------------------------------------------
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        out = str(config.hydra.runtime.output_dir)
        path = Path(out) / METRICS_FILE
        previous = _read_json(path)
        self._before[out] = (
            (previous or {}).get("status"),
            path.stat().st_mtime_ns if previous else None,
        )
        self._produced[out] = _produced_by(_read_json(Path(out) / JOB_STATUS_FILE))
        self._started[out] = time.time()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        from hydra.core.utils import JobStatus

        out = Path(str(config.hydra.runtime.output_dir))
        sweep_dir = sweep_dir_of(config)
        error = None
        if job_return.status == JobStatus.FAILED:
            status = "failed"
            exc = job_return._return_value  # .return_value re-raises the job's exception
            error = f"{type(exc).__name__}: {exc}"
        else:
            status = "finished"
            before_status, before_mtime = self._before.get(str(out)) or (None, None)
            metrics_path = out / METRICS_FILE
            if (
                before_status == "finished"
                and metrics_path.exists()
                and metrics_path.stat().st_mtime_ns == before_mtime
            ):
                status = "skipped"  # run() found it finished with the same config
        plan = _read_json(sweep_dir / PLAN_FILE) or {}
        record = {
            "launch_id": plan.get("launch_id"),
            "num": int(config.hydra.job.num),
            "overrides": list(config.hydra.overrides.task),
            "status": status,
            "error": error,
            "ended": _now(),
            "seconds": round(time.time() - self._started.pop(str(out), time.time()), 3),
        }
        produced = self._produced.pop(str(out), None)
        if status == "skipped" and produced:
            record["produced_by"] = produced  # the launch whose run the metrics come from
        atomic_write_json(out / JOB_STATUS_FILE, record)
        if status == "failed":
            log.error("sweep job #%s failed: %s (log: %s)", record["num"], error, out / "run.log")
        try:
            write_summary(sweep_dir)
        except Exception as err:  # the summary is a convenience: never fail a job for it
            log.warning("sweep summary not written: %s", err)
