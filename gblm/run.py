"""One run in its run directory: identity and resume, refusals, signals, the record, loggers.

``run(cfg)`` checks the config, decides from the run dir whether to run (a finished run of the
same config is returned as it is), hands the stages to :mod:`gblm.pipeline` and writes the record
(:mod:`gblm.record`) locally before any remote logger sees it. The Hydra ``main`` composes, calls
``run`` and reports.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gblm import devices, pipeline, record
from gblm.config import RunConf, build_method, build_plan, to_plain, validate
from gblm.errors import ConfigError, UserError
from gblm.loggers.base import GuardedLogger, NullLogger
from gblm.loggers.local import in_use, read_metrics, run_alive, run_lock, write_metrics
from gblm.methods.registry import allocator_entry, allocator_options
from gblm.models.loading import model_directory
from gblm.paths import PROJECT_ROOT
from gblm.utils import OverallEstimate, StageTimer, atomic_write_json, content_hash, read_json

log = logging.getLogger("gblm")

# Settings that do not change a run's results: a finished run with a different value is reused.
NON_RESULT_KEYS = ("logger", "progress", "skip_finished", "overwrite", "experiment", "hydra")
# Memory-only options of earlier versions' gradient stage (no result changed): their records resume.
RETIRED_MEMORY_OPTIONS = ("gradient_checkpointing", "loss_chunk_tokens")
_INTERRUPT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # SIGINT is KeyboardInterrupt already


class RunInterrupted(BaseException):
    """SIGTERM or SIGHUP during a run: a BaseException, as KeyboardInterrupt is, so that no
    ``except Exception`` on the way eats it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


# Identity ------------------------------------------------------------------------------------------
def result_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings that determine a run's results, normalised so that equal runs compare equal:
    ``batch_size=auto`` is 1, ``reconstruct=none`` no node (as recorded before weight updates),
    the method without :data:`RETIRED_MEMORY_OPTIONS`, the sparsity its target and its own
    allocator's options (an old ``per_block`` schedule counts as the ``per_block`` allocator)."""
    relevant = {k: v for k, v in cfg.items() if k not in NON_RESULT_KEYS}
    if relevant.get("batch_size") == "auto":
        relevant["batch_size"] = 1
    if (relevant.get("reconstruct") or {}).get("name", "none") == "none":
        relevant.pop("reconstruct", None)
    if isinstance(method := relevant.get("method"), dict):
        relevant["method"] = {k: v for k, v in method.items() if k not in RETIRED_MEMORY_OPTIONS}
    sparsity = dict(relevant.get("sparsity") or {})
    if sparsity.get("per_block") is not None and sparsity.get("allocator") == "uniform":
        sparsity["allocator"] = "per_block"
    entry = allocator_entry(sparsity.get("allocator"))
    kept = ("allocator", "ratio", "n", "m", *(allocator_options(entry) if entry else ()))
    relevant["sparsity"] = {k: v for k, v in sparsity.items() if k in kept}
    return relevant


def config_hash(cfg: dict[str, Any]) -> str:
    """Hash of the settings that determine a run's results (for resume)."""
    return content_hash(result_settings(cfg), length=16)


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configs (None and absent are equal)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [prefix.rstrip(".") or "(config)"]
    keys = sorted(set(old) | set(new), key=str)
    return [k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]


def _result_changes(run_dir: Path, container: dict) -> list[str] | None:
    """Keys that change results between the saved config and ``container``; None if unreadable."""
    old = read_json(run_dir / "config_resolved.json")
    if not isinstance(old, dict):
        return None
    return _changed_keys(result_settings(old), result_settings(container))


def _same_config(previous: dict, digest: str, run_dir: Path, container: dict) -> bool:
    """The same hash, or a saved config that differs in no key that changes results (runs of
    older versions)."""
    return previous.get("config_hash") == digest or _result_changes(run_dir, container) == []


def run_dir_refusal(
    conf: RunConf, run_dir: Path, previous: dict | None, digest: str, container: dict
) -> str | None:
    """Why a run of this config must not start in ``run_dir`` (whose ``metrics.json`` is
    ``previous``), or None: a live process writes it, or it holds a finished run of another config
    and ``overwrite`` is false. The sweep preflight asks this for every job before any starts."""
    if not previous:
        return None
    if previous.get("status") == "running" and run_alive(run_dir):
        return in_use(run_dir, previous)
    if (source := model_directory(conf.model)) and source.resolve() == (
        run_dir / pipeline.SAVED_MODEL
    ).resolve():
        return (
            f"model.name_or_path={source} is this run folder's saved model, which a new run here "
            "replaces: run in another folder (hydra.run.dir=...)."
        )
    finished = previous.get("status") == "finished"
    if not finished or conf.overwrite or _same_config(previous, digest, run_dir, container):
        return None
    changed = _result_changes(run_dir, container) or []
    what = f" (changed: {', '.join(changed[:8])}{', ...' if len(changed) > 8 else ''})"
    return (
        f"{run_dir} holds a finished run of another config{what if changed else ''}; it is "
        "kept. Add overwrite=true to replace it, or choose another dir (hydra.run.dir=..., or "
        "hydra.sweep.dir=... for a sweep)."
    )


def changed_content(previous: dict, found: dict[str, str]) -> list[str]:
    """The inputs (:func:`gblm.pipeline.fingerprints`) whose content changed since ``previous``
    finished; none for a record older than the fingerprints, nor for one of
    :data:`gblm.pipeline.LATER_FINGERPRINTS` that the record predates."""
    old = (previous.get("provenance") or {}).get("fingerprints")
    if not isinstance(old, dict):
        return []
    keys = set(old) | (set(found) - set(pipeline.LATER_FINGERPRINTS))
    return sorted(k for k in keys if old.get(k) != found.get(k))


def _previous_run(
    conf: RunConf, run_dir: Path, digest: str, container: dict, found: dict[str, str]
) -> dict | None:
    """The finished record to return instead of running (the same config on the same content
    ``found``), or None to run; raises the refusal."""
    try:
        previous = read_metrics(run_dir)
    except ConfigError:
        if not conf.overwrite:
            raise
        previous = None  # a damaged record, replaced as asked
    if reason := run_dir_refusal(conf, run_dir, previous, digest, container):
        raise ConfigError(reason)
    if not previous or previous.get("status") != "finished":
        return None  # new, failed, interrupted or killed: (re)done
    if not _same_config(previous, digest, run_dir, container):
        log.warning("run in %s finished with another config: replaced (overwrite=true)", run_dir)
        return None
    if changed := changed_content(previous, found):
        log.warning("run in %s finished with the same config on other content (changed: %s): "
                    "run again", run_dir, ", ".join(changed))  # fmt: skip
        return None
    if conf.skip_finished:
        log.info("run in %s already finished with the same config: skipped", run_dir)
        return previous
    return None


def _record_refusal(run_dir: Path, err: UserError, digest: str | None) -> None:
    """Mark the run dir failed with the error, unless it holds a finished or a live run."""
    try:
        previous = read_metrics(run_dir)
    except ConfigError:  # a damaged record stays as it is until overwrite=true replaces it
        return
    if previous and previous.get("status") == "finished":
        log.warning("%s holds a finished run: its metrics.json is kept", run_dir)
        return
    if previous and previous.get("status") == "running" and run_alive(run_dir):
        return  # another process's live run: its record is its own
    failed = {"status": "failed", "error": f"{type(err).__name__}: {err}", "config_hash": digest}
    write_metrics(run_dir, failed)


# The run -------------------------------------------------------------------------------------------
def run(cfg: DictConfig | dict, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Prune and evaluate one configuration; returns the record written to ``metrics.json``.

    A finished run in ``run_dir`` of the same config is returned as it is; one of another config
    is kept (a ConfigError) unless ``overwrite=true``; a live run there is refused. SIGTERM,
    SIGHUP or Ctrl-C record ``"status": "interrupted"`` and are re-raised. Expected errors
    (:class:`gblm.errors.UserError`) come before the load, the dir marked failed.
    """
    if run_dir is None:
        run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else Path.cwd()
    run_dir = Path(run_dir)
    digest = None
    try:
        container = to_plain(cfg)
        conf = validate(container)
        digest = config_hash(container)
        method, plan = build_method(conf), build_plan(conf)
        found = pipeline.fingerprints(conf, method, plan)
        previous = _previous_run(conf, run_dir, digest, container, found)
        if previous is not None:
            return previous
    except UserError as err:
        _record_refusal(run_dir, err, digest)
        raise
    metrics = record.initial(conf, method, plan, digest)
    with run_lock(run_dir), _interruptible():
        if resumed := record.resumed_wandb(read_json(run_dir / "metrics.json"), digest):
            metrics["wandb"] = resumed  # a relaunch goes on with the W&B run it began
        # "running" first: a saved config never stands beside a finished record of another one
        write_metrics(run_dir, metrics)
        atomic_write_json(run_dir / "config_resolved.json", container)
        record.clear_outputs(run_dir)  # an earlier run's mask files and lm-eval output
        _execute_and_record(conf, method, plan, metrics, run_dir, container, found)
    return metrics


def _execute_and_record(
    conf: RunConf, method, plan, metrics, run_dir, container, found: dict[str, str]
) -> None:
    """Run the stages; record the end (finished | interrupted | failed) whatever happens."""
    remote = GuardedLogger(NullLogger)  # the real one once the inputs have passed their checks
    timer = StageTimer()
    timer.listeners.append(OverallEstimate(pipeline.planned_stages(conf, method, plan)))
    started = time.perf_counter()

    def on_update(result: pipeline.Result) -> dict:
        write_metrics(run_dir, record.update(metrics, result, conf, run_dir))
        return metrics

    try:
        given = pipeline.inputs(conf, method, plan, timer)  # nothing heavy before this passes
        resume_id = (metrics.get("wandb") or {}).get("id")
        remote = GuardedLogger(lambda: record.remote_logger(conf, run_dir, resume_id))
        timer.listeners.append(record.live_view(remote, metrics))
        metrics["provenance"] = record.provenance(str(given.device), found)
        write_metrics(run_dir, metrics)  # on disk before the remote logger is sent it
        remote.start({**container, "provenance": metrics["provenance"]})
        result = pipeline.execute(conf, method, plan, given, timer, run_dir, on_update)
        if not found["model"].startswith("files:"):  # a hub id first loaded now: its files
            found.update(pipeline.model_fingerprints(conf.model))
        record.update(metrics, result, conf, run_dir)
        metrics["status"] = "finished"
    except (KeyboardInterrupt, RunInterrupted) as err:
        metrics["status"] = "interrupted"
        metrics["error"] = str(err) if isinstance(err, RunInterrupted) else "interrupted by SIGINT"
        raise
    except BaseException as err:
        metrics["status"] = "failed"
        metrics["error"] = f"{type(err).__name__}: {err}"
        if not isinstance(err, UserError):  # an expected error is its message, not a traceback
            metrics["traceback"] = traceback.format_exc()
        raise
    finally:
        metrics["timings"] = {**timer.timings, "total": time.perf_counter() - started}
        with _signals_held():
            write_metrics(run_dir, metrics)
        try:  # a signal during the upload still closes the remote run (the record is whole)
            if metrics["status"] == "finished":
                record.publish(remote, metrics, run_dir)
        finally:
            remote.finish(exit_code=0 if metrics["status"] == "finished" else 1)
        if record.remote_outcome(metrics, remote):  # a failed upload is a warning of the record
            with _signals_held():
                write_metrics(run_dir, metrics)


# Signals -------------------------------------------------------------------------------------------
# While the end of a run is written, a signal waits (in "pending") until the record is complete.
_HOLD: dict[str, Any] = {"on": False, "pending": None}


def _interrupt(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else RunInterrupted(signum)


def _on_signal(signum: int, frame: Any) -> None:
    if not _HOLD["on"]:
        raise _interrupt(signum)
    _HOLD["pending"] = signum


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`RunInterrupted` inside (main thread only), SIGINT
    KeyboardInterrupt unless it is ignored (a background job)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = list(_INTERRUPT_SIGNALS)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        wanted.append(signal.SIGINT)
    previous = {sig: signal.signal(sig, _on_signal) for sig in wanted}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """A signal that comes inside waits until the end, then interrupts (the record is whole)."""
    _HOLD.update(on=True, pending=None)
    try:
        yield
    finally:
        pending = _HOLD["pending"]
        _HOLD.update(on=False, pending=None)
        if pending is not None:
            raise _interrupt(pending)


# The Hydra app -------------------------------------------------------------------------------------
@hydra.main(config_path=str(PROJECT_ROOT / "conf"), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Compose, run, report. Errors are logged with the run dir; in a multirun the next job goes on."""
    devices.default_threads()  # the CPUs idle now (unless OMP_NUM_THREADS is set)
    try:
        metrics = run(cfg)
    except UserError as err:
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise  # the sweep records this job as failed and goes on
        kind = "configuration error" if isinstance(err, ConfigError) else "error"
        message = " ".join(str(err).split())
        log.info("%s: %s", kind, message)
        print(f"gblm: {kind}: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except (KeyboardInterrupt, RunInterrupted) as err:
        signum = err.signum if isinstance(err, RunInterrupted) else signal.SIGINT
        log.error("%s: the run is recorded as interrupted", err or "interrupted by SIGINT")
        raise SystemExit(128 + int(signum)) from None
    lines = record.where_lines(metrics, Path(HydraConfig.get().runtime.output_dir))
    print("\n".join([record.summary_line(metrics), *lines]), flush=True)
    return metrics.get("ppl", {}).get("pruned")
