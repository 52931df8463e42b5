"""One run: validate -> load -> calibrate -> prune -> evaluate -> record.

``run(cfg)`` does the work and returns the metrics; it is what tests call. The Hydra ``main`` only
composes the config, calls ``run`` and closes loggers, so one failed job of a sweep never poisons
the next. Local files (``metrics.json``, ``mask_stats.csv``, masks) are always written before any
remote logger sees them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gblm import devices
from gblm.config import RunSettings, to_plain, validate
from gblm.errors import ConfigError, UserError
from gblm.loggers.base import GuardedLogger, NullLogger
from gblm.loggers.local import LocalLogger, process_record, read_metrics, run_alive, run_lock
from gblm.paths import PROJECT_ROOT, cache_dir, configure_offline
from gblm.progress import OverallEstimate, planned_work
from gblm.utils import StageTimer

log = logging.getLogger("gblm")

# Settings that do not change a run's results: a finished run with a different value is reused.
_NON_RESULT_KEYS = ("logger", "progress", "skip_finished", "overwrite", "experiment", "hydra")
# Signals that end a run as "interrupted" (SIGINT does already, as KeyboardInterrupt).
_INTERRUPT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class RunInterrupted(BaseException):
    """SIGTERM or SIGHUP during a run, raised in the main thread as Ctrl-C raises KeyboardInterrupt.

    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the way eats it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def config_hash(cfg: dict[str, Any]) -> str:
    """Hash of the settings that determine a run's results (for resume)."""
    relevant = _result_settings(cfg)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def _result_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The top-level settings that determine a run's results, ``batch_size=auto`` as 1: it gives
    one window's results bit for bit (gblm/calibration/batching.py) and replaced that default,
    so runs finished before stay valid."""
    relevant = {k: v for k, v in cfg.items() if k not in _NON_RESULT_KEYS}
    if relevant.get("batch_size") == "auto":
        relevant["batch_size"] = 1
    return relevant


def build_method(settings: RunSettings):
    """The configured method (None for the dense baseline); bad options are a ConfigError."""
    from gblm.methods.registry import build_method as build

    return build(settings.method_name, settings.method_target, **settings.method_kwargs)


def build_plan(settings: RunSettings, method=None):
    """The sparsity plan: OWL, one given ratio per block (``sparsity.per_block``), or uniform.

    OWL's 0.01 floor for block ratios <= 0 follows the published code unless ``sparsity.clamp``
    says otherwise: on for every method that calibrates, off for magnitude (the published
    magnitude path has none).
    """
    from gblm.methods.plans import PerBlockPlan, UniformPlan

    allocator = settings.allocator
    if allocator.name == "owl":
        from gblm.methods.owl import OWLPlan

        clamp = allocator.clamp
        if clamp is None:
            clamp = method is None or method.needs_calibration
        try:
            return OWLPlan(settings.sparsity, allocator.lmbda, allocator.outlier_m, clamp)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    if settings.sparsity_per_block:
        return PerBlockPlan(settings.sparsity_per_block)
    return UniformPlan(settings.sparsity)


def method_label(s: RunSettings, method) -> str:
    """The method as the report's tables name it: ``dsnot(wanda)``, ``wanda+owl``, ``gblm``."""
    label = getattr(method, "label", None) or s.method_name
    if method is not None and s.allocator.name != "uniform":
        label += f"+{s.allocator.name}"
    return label


def _run_name(s: RunSettings) -> str:
    """``method_sparsity_model``, and in a sweep the job's other overrides (the swept values:
    ``gblm_0.5_llama_7b_calibration.nsamples=32``), so ablation points have their own names."""
    name = f"{s.method_name}_{s.sparsity.label}_{s.model.name}".replace(":", "of")
    if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
        overrides = [o for o in HydraConfig.get().job.override_dirname.split(",") if o]
        shown = ("method=", "sparsity=", "sparsity.ratio=", "model=")
        extra = [o for o in overrides if not o.startswith(shown)]
        if extra:
            name += "_" + ",".join(extra)
    return name


def _needs_calibration(method, plan) -> bool:
    return method is not None and (method.needs_calibration or plan.needs_calibration)


def _prepare_data(s: RunSettings, needs_calibration: bool) -> dict[str, list[str]]:
    """Load the texts first: an unavailable dataset fails before the model loads."""
    from gblm.data.sources import load_documents

    texts: dict[str, list[str]] = {}
    if needs_calibration:
        texts["calibration"] = load_documents(
            s.calibration.source, s.calibration.split, s.calibration.paths
        )
    if s.perplexity.enabled:
        texts["eval"] = load_documents(
            s.perplexity.dataset,
            s.perplexity.split,
            s.perplexity.paths,
            key="eval.perplexity.dataset",
        )
    return texts


def run(cfg: DictConfig | dict, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Prune and evaluate one configuration; returns the metrics written to ``metrics.json``.

    A finished run in ``run_dir`` with the same config is returned as it is; one with another
    config is kept (a ConfigError) unless ``overwrite=true``; a live run there is refused. A
    SIGTERM, SIGHUP or Ctrl-C ends the run as ``"status": "interrupted"`` and is re-raised.
    Every expected error (:class:`gblm.errors.UserError`: a config value, a data file, the
    model's files, the device, the amount of text) is raised before the model loads, with the
    run dir marked failed.
    """
    if run_dir is None:
        run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else Path.cwd()
    run_dir = Path(run_dir)
    container, digest = None, None
    try:
        container = to_plain(cfg)
        settings = validate(container)
        digest = config_hash(container)
        previous = _previous_run(settings, run_dir, digest, container)
        if previous is not None:
            return previous
        method = build_method(settings)
        plan = build_plan(settings, method)
    except UserError as err:
        _record_refusal(run_dir, err, digest)
        raise
    metrics = _initial_metrics(settings, method, plan, digest)
    local = LocalLogger(run_dir)
    with run_lock(run_dir), _interruptible():
        local.write_json("config_resolved.json", container)
        local.write_metrics(metrics)
        _execute_and_record(settings, method, plan, metrics, local, run_dir, container)
    return metrics


def _previous_run(
    s: RunSettings, run_dir: Path, digest: str, container: dict
) -> dict[str, Any] | None:
    """The finished record to return instead of running, or None to run.

    Raises:
        ConfigError: :func:`run_dir_refusal`'s reason not to run in ``run_dir``.
    """
    previous = read_metrics(run_dir)
    reason = run_dir_refusal(s, run_dir, previous, digest, container)
    if reason:
        raise ConfigError(reason)
    if not previous or previous.get("status") != "finished":
        return None  # new, failed, interrupted or killed: (re)done
    if _same_config(previous, digest, run_dir, container):
        if not s.skip_finished:
            return None
        log.info("run in %s already finished with the same config: skipped", run_dir)
        return previous
    log.warning("run in %s finished with another config: replaced (overwrite=true)", run_dir)
    return None


def run_dir_refusal(
    s: RunSettings, run_dir: Path, previous: dict | None, digest: str, container: dict
) -> str | None:
    """Why a run of this config must not start in ``run_dir``, or None.

    A live process is writing it; or it holds a finished run of another config and
    ``overwrite`` is false (a finished result is never replaced silently). ``previous`` is the
    dir's ``metrics.json``; the sweep preflight asks this for every job before any starts.
    """
    if not previous:
        return None
    if previous.get("status") == "running" and run_alive(run_dir):
        owner = previous.get("process") or {}
        return (
            f"{run_dir} is in use: process {owner.get('pid')} on {owner.get('host')} is running "
            "there. Wait for it or stop it, or choose another run dir."
        )
    if previous.get("status") == "finished" and not _same_config(
        previous, digest, run_dir, container
    ):
        return None if s.overwrite else _overwrite_refusal(run_dir, container)
    return None


def _same_config(previous: dict, digest: str, run_dir: Path, container: dict) -> bool:
    """Whether the finished run in ``run_dir`` had this config's results: the same hash, or a
    saved config (``config_resolved.json``) that differs in no key that changes results.

    The second test keeps runs finished under an older version valid when a key was added since
    with None as its "off" value (e.g. ``model.offload_folder``; None and absent compare equal)."""
    if previous.get("config_hash") == digest:
        return True
    return _result_changes(run_dir, container) == []


def _result_changes(run_dir: Path, container: dict) -> list[str] | None:
    """Keys that change results between the saved config and ``container``; None if unreadable."""
    try:
        old = json.loads((run_dir / "config_resolved.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(old, dict):
        return None
    return _changed_keys(_result_settings(old), _result_settings(container))


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configs."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [prefix.rstrip(".") or "(config)"]
    keys = sorted(set(old) | set(new), key=str)
    return [k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]


def _overwrite_refusal(run_dir: Path, container: dict) -> str:
    relevant = _result_changes(run_dir, container) or []
    what = f" (changed: {', '.join(relevant[:8])}{', ...' if len(relevant) > 8 else ''})"
    return (
        f"{run_dir} holds a finished run of another config{what if relevant else ''}; it is "
        "kept. Add overwrite=true to replace it, or choose another dir (hydra.run.dir=..., or "
        "hydra.sweep.dir=... for a sweep)."
    )


def _record_refusal(run_dir: Path, err: UserError, digest: str | None) -> None:
    """Mark the run dir failed with the error, unless it holds a finished run (kept as it is)."""
    try:
        previous = read_metrics(run_dir)
    except (OSError, ValueError):
        previous = None
    if previous and previous.get("status") == "finished":
        log.warning("%s holds a finished run: its metrics.json is kept", run_dir)
        return
    if previous and previous.get("status") == "running" and run_alive(run_dir):
        return  # another process's live run: its record is its own
    failed = {"status": "failed", "error": f"{type(err).__name__}: {err}", "config_hash": digest}
    LocalLogger(run_dir).write_metrics(failed)


def _initial_metrics(settings: RunSettings, method, plan, digest: str) -> dict[str, Any]:
    return {
        "status": "running",
        "config_hash": digest,
        "process": process_record(),
        "run_name": _run_name(settings),
        "method": settings.method_name,
        "method_label": method_label(settings, method),
        "method_settings": settings.method_kwargs,
        "model": settings.model.name,
        "sparsity": {
            "ratio": settings.sparsity.ratio,
            "n": settings.sparsity.n,
            "m": settings.sparsity.m,
            "label": settings.sparsity.label,
            "per_block_target": plan.block_targets(),
        },
        "calibration": {
            "source": settings.calibration.source,
            "nsamples": settings.calibration.nsamples,
            "seqlen": settings.calibration.seqlen,
            "seed": settings.calibration.seed,
        },
        "ppl": {},
        "timings": {},
    }


@dataclass
class Inputs:
    """What the preflight loaded: the texts, the tokenizer, the device and the model dtype."""

    texts: dict[str, list[str]]
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype


def _device_and_dtype(s: RunSettings) -> tuple[torch.device, torch.dtype]:
    try:
        device = devices.resolve_device(s.device)
        return device, devices.resolve_dtype(s.dtype, device)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(str(err)) from None


def _seqlens(s: RunSettings, needs_calibration: bool) -> dict[str, int]:
    seqlens = {"calibration.seqlen": s.calibration.seqlen} if needs_calibration else {}
    if s.perplexity.enabled:
        seqlens["eval.perplexity.seqlen"] = s.perplexity.seqlen
    return seqlens


def preflight(
    s: RunSettings, method, plan, timer: StageTimer | None = None, check_device: bool = True
) -> Inputs:
    """Every check that needs no weights, cheapest first; raises :class:`UserError`.

    The model's files and config (its context length against the sequence lengths), the
    device, the zero-shot task names, the data files, the tokenizer and whether the texts hold
    enough tokens. The sweep preflight runs it too (:mod:`gblm.sweep`), without the device check
    (``check_device=False``: the launching machine may lack the jobs' GPUs).
    """
    from gblm.data import checks
    from gblm.models.loading import check_model_available, load_tokenizer, max_positions

    timer = timer or StageTimer()
    check_model_available(s.model)
    device, dtype = _device_and_dtype(s) if check_device else (torch.device("cpu"), torch.float32)
    needs_calibration = _needs_calibration(method, plan)
    checks.check_context(max_positions(s.model), _seqlens(s, needs_calibration))
    if s.zeroshot.enabled:
        from gblm.eval.zeroshot import validate_task_names

        try:
            validate_task_names(s.zeroshot.tasks, s.zeroshot.include_path)
        except ValueError as err:
            raise ConfigError(f"eval.zeroshot.tasks: {err}") from None
    configure_offline()
    with timer.stage("load data"):
        texts = _prepare_data(s, needs_calibration)
    with timer.stage("load tokenizer"):
        tokenizer = load_tokenizer(s.model)
    if needs_calibration:
        checks.check_calibration_text(tokenizer, texts["calibration"], s.calibration)
    if s.perplexity.enabled:
        checks.check_eval_text(tokenizer, texts["eval"], s.perplexity)
    return Inputs(texts=texts, tokenizer=tokenizer, device=device, dtype=dtype)


# While the end of a run is written, a signal waits (in "pending") until the record is complete.
_HOLD: dict[str, Any] = {"on": False, "pending": None}


def _interrupt(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else RunInterrupted(signum)


def _on_signal(signum: int, frame: Any) -> None:
    if _HOLD["on"]:
        _HOLD["pending"] = signum
        return
    raise _interrupt(signum)


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`RunInterrupted` inside, SIGINT KeyboardInterrupt.

    Main thread only (Python runs signal handlers there). SIGINT is taken over only from
    Python's default handler: an ignored SIGINT (a background job) stays ignored.
    """
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


def _execute_and_record(s, method, plan, metrics, local, run_dir, container) -> None:
    """Run the stages; record the end (finished | interrupted | failed) whatever happens."""
    remote = GuardedLogger(NullLogger)  # the real one once the preflight has passed
    timer = StageTimer()
    timer.listeners.append(OverallEstimate(planned_work(s, method, plan)))  # logged per stage
    started = time.perf_counter()
    try:
        inputs = preflight(s, method, plan, timer)  # nothing heavy before this passes
        remote = GuardedLogger(lambda: _make_remote_logger(s, run_dir))
        timer.listeners.append(_live_view(remote, metrics))
        remote.start(container)
        _execute(s, method, plan, inputs, metrics, timer, local, run_dir)
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
            local.write_metrics(metrics)
        if metrics["status"] == "finished":
            remote.log_metrics(_flat_metrics(metrics))
            remote.call("log tables and images", lambda: _log_tables_and_images(remote, run_dir))
            remote.log_artifact(f"run-{run_dir.name}", "run-record", _record_files(run_dir))
        remote.finish(exit_code=0 if metrics["status"] == "finished" else 1)


def _execute(
    s: RunSettings,
    method,
    plan,
    inputs: Inputs,
    metrics: dict,
    timer: StageTimer,
    local: LocalLogger,
    run_dir: Path,
) -> None:
    from gblm.models.loading import load_model

    device, dtype, texts, tokenizer = inputs.device, inputs.dtype, inputs.texts, inputs.tokenizer
    devices.reset_peak_memory(device)
    metrics["device"], metrics["dtype"] = str(device), devices.dtype_name(dtype)
    torch.manual_seed(s.seed)
    with timer.stage("load model"):
        model = load_model(s.model, device, dtype, tokenizer)
    log.info(
        "model %s: %s, %.1fM parameters, %s on %s",
        s.model.name,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        metrics["dtype"],
        device,
    )
    if method is not None:
        _check_model(method, plan, model)  # before the dense evaluation, not after it
    eval_ppl = _perplexity_stage(s, model, tokenizer, texts, device, metrics, timer)
    if eval_ppl is not None and (s.perplexity.dense or method is None):
        metrics["ppl"]["dense"] = eval_ppl("dense")
        local.write_metrics(metrics)

    masks: dict[str, torch.Tensor] = {}
    if method is not None:
        masks = _prune(s, method, plan, model, tokenizer, texts, device, dtype, timer)
        # a plan computed from the dense model (OWL) knows its targets only now
        metrics["sparsity"]["per_block_target"] = plan.block_targets()
        if getattr(plan, "outlier_ratios", None) is not None:
            metrics["sparsity"]["outlier_ratios"] = plan.outlier_ratios
        with timer.stage("mask statistics"):
            _record_mask_stats(s, model, masks, metrics, local, run_dir, _n_per_linear(plan, masks))
        if eval_ppl is not None:
            metrics["ppl"]["pruned"] = eval_ppl("pruned")
        local.write_metrics(metrics)
    if s.zeroshot.enabled:
        _zeroshot_stage(s, model, tokenizer, device, metrics, timer, run_dir)
        local.write_metrics(metrics)
    if s.save_model:
        _save_stage(s, model, tokenizer, masks, metrics, timer, run_dir)
    metrics["peak_memory_bytes"] = devices.peak_memory_bytes(device)


def _save_stage(s: RunSettings, model, tokenizer, masks, metrics, timer, run_dir: Path) -> None:
    """The pruned model into ``<run dir>/model`` in ``save_dtype``; then to the hub if asked (a
    failed push is a warning in the record: the saved model and the metrics stay)."""
    from gblm.models.saving import HubPushError, push_saved_model, save_pruned_model

    if s.save_dtype == "original":  # the checkpoint's dtype, as the loader recorded it
        dtype = getattr(model, "gblm_source_dtype", None)
    else:
        dtype = devices.resolve_dtype(s.save_dtype, torch.device("cpu"))
    with timer.stage("save model"):
        saved = save_pruned_model(model, tokenizer, masks, run_dir / "model", metrics, dtype)
    metrics["saved_model"] = str(saved)
    metrics["saved_dtype"] = devices.dtype_name(dtype or next(model.parameters()).dtype)
    if s.push_to_hub:
        try:
            with timer.stage("push to hub"):
                metrics["pushed_to"] = push_saved_model(saved, s.push_to_hub)
        except HubPushError as err:
            log.warning("%s", err)
            metrics["push_to_hub_error"] = str(err)


def _check_model(method, plan, model) -> None:
    """The method's and the plan's checks of the loaded model, as configuration errors."""
    from gblm.models.layers import decoder_layers

    try:
        method.check_model(model)
        if hasattr(plan, "check_blocks"):
            plan.check_blocks(len(decoder_layers(model)))
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _perplexity_stage(s: RunSettings, model, tokenizer, texts, device, metrics, timer):
    """A function ``tag -> perplexity`` of the model as it is then, or None when disabled."""
    if not s.perplexity.enabled:
        return None
    from gblm.data.evaluation import join_and_tokenize
    from gblm.eval.perplexity import perplexity

    with timer.stage("tokenize eval"):
        eval_tokens = join_and_tokenize(tokenizer, texts["eval"])
    metrics["eval_tokens"] = int(eval_tokens.numel())

    def eval_ppl(tag: str) -> float:
        with timer.stage(f"perplexity {tag}"):
            value = perplexity(
                model,
                eval_tokens,
                s.perplexity.seqlen,
                device=devices.input_device(model, device),
                batch_size=s.perplexity.batch_size,
                max_windows=s.perplexity.max_windows,
                progress=s.progress,
                desc=f"perplexity ({tag})",
            )
        log.info("perplexity %s: %.3f", tag, value)
        return value

    return eval_ppl


def _calibration_windows(s: RunSettings, tokenizer, texts, timer: StageTimer) -> torch.Tensor:
    """The (N, T) calibration windows, from the cache when the same ones were drawn before."""
    from gblm.data import calibration as cal

    c = s.calibration
    with timer.stage("calibration windows"):
        key = cal.windows_cache_key(
            tokenizer_id=cal.tokenizer_digest(tokenizer),
            documents_sha256=cal.documents_digest(texts["calibration"]),
            nsamples=c.nsamples,
            seqlen=c.seqlen,
            seed=c.seed,
            sampling=c.sampling,
            vocab_size=len(tokenizer),
        )
        return cal.cached_windows(
            cache_dir(),
            key,
            lambda: cal.sample_windows(
                tokenizer, texts["calibration"], c.nsamples, c.seqlen, c.seed, c.sampling
            ),
        )


def _prune(s: RunSettings, method, plan, model, tokenizer, texts, device, dtype, timer):
    """The method's dense-model pass, the plan's, then the layer walk; returns the masks."""
    from gblm.calibration.sequential import prune_model
    from gblm.methods.base import RunContext
    from gblm.models.loading import weights_fingerprint

    windows = None
    if _needs_calibration(method, plan):
        windows = _calibration_windows(s, tokenizer, texts, timer)
    context = RunContext(
        device=device,
        model_dtype=dtype,
        model_id=s.model.model_id,
        cache_dir=cache_dir(),
        progress=s.progress,
        fingerprint=lambda: weights_fingerprint(s.model),
        onload=s.model.onload,
        batch_size=s.batch_size,
    )
    for stage in (plan, method):  # their passes over the dense model, named as stages
        with timer.stage(stage.dense_pass) if stage.dense_pass else contextlib.nullcontext():
            stage.prepare(model, windows, context)
    try:
        with timer.stage("prune"):
            return prune_model(
                model,
                method,
                plan,
                windows if method.needs_calibration else None,
                device=device,
                batch_size=s.batch_size,
                progress=s.progress,
                offload_inputs=s.offload_inputs,
                onload=s.model.onload,
            )
    finally:
        method.release()


def _zeroshot_stage(s: RunSettings, model, tokenizer, device, metrics, timer, run_dir) -> None:
    """lm-eval on the model; its results JSON (and per-item log) kept in the run dir."""
    from gblm.eval.zeroshot import zeroshot_eval

    with timer.stage("zero-shot"):
        metrics["zeroshot"] = zeroshot_eval(
            model,
            tokenizer,
            s.zeroshot.tasks,
            limit=s.zeroshot.limit,
            batch_size=s.zeroshot.batch_size,
            device=devices.input_device(model, device),
            include_path=_zeroshot_include_path(s, run_dir),
            results_dir=run_dir,
            log_samples=s.zeroshot.log_samples,
        )


def _n_per_linear(plan, masks) -> dict[str, int]:
    """Each Linear's N where the plan gives blocks their own N:M (OWL), for the N:M check."""
    from gblm.names import block_index

    targets = getattr(plan, "targets", None)
    if not targets or not targets[0].structured:
        return {}
    return {name: targets[block_index(name)].n for name in masks}


def _record_mask_stats(
    s: RunSettings,
    model,
    masks,
    metrics: dict,
    local: LocalLogger,
    run_dir: Path,
    n_of: dict[str, int] | None = None,
) -> None:
    from gblm.analysis.plots import save_mask_images
    from gblm.analysis.records import write_mask_stats_blocks, write_mask_stats_csv
    from gblm.analysis.stats import model_mask_stats
    from gblm.models.zeros import weight_zero_share

    per_linear, per_block, per_type, overall = model_mask_stats(
        masks, s.sparsity.n, s.sparsity.m, n_of
    )
    write_mask_stats_csv(per_linear, run_dir / "mask_stats.csv")
    write_mask_stats_blocks(per_block, per_type, run_dir / "mask_stats_blocks.json")
    metrics["mask_stats"] = overall
    metrics["sparsity_check"] = weight_zero_share(model, list(masks))
    wanted = [n for n in s.mask_images if n in masks]
    if not wanted:
        return
    try:
        metrics["mask_images"] = [
            str(p) for p in save_mask_images(masks, wanted, run_dir / "masks")
        ]
    except Exception as err:  # pictures are optional: a full disk costs them, not the run
        message = f"mask images not written: {type(err).__name__}: {err}"
        log.warning("%s; the run goes on", message)
        metrics.setdefault("warnings", []).append(message)


def _zeroshot_include_path(s: RunSettings, run_dir: Path) -> str | None:
    """The local task's folder, exported into ``<run dir>/lm_eval_tasks`` (data and YAML)."""
    if s.zeroshot.include_path or "austen_cloze" not in s.zeroshot.tasks:
        return s.zeroshot.include_path
    from gblm.eval.cloze import ensure_austen_cloze_task, export_task

    built = ensure_austen_cloze_task(cache_dir() / "tasks", n_items=s.zeroshot.cloze_items)
    return str(export_task(built, run_dir / "lm_eval_tasks"))


def _flat_metrics(metrics: dict) -> dict:
    flat: dict[str, Any] = {}
    for key in ("ppl", "timings", "mask_stats", "zeroshot"):
        for k, v in (metrics.get(key) or {}).items():
            if isinstance(v, int | float):
                flat[f"{key}/{k}"] = v
            elif isinstance(v, dict):
                flat.update(
                    {f"{key}/{k}/{kk}": vv for kk, vv in v.items() if isinstance(vv, int | float)}
                )
    flat["sparsity/ratio"] = metrics["sparsity"]["ratio"]
    if "sparsity_check" in metrics:
        flat["sparsity/achieved"] = metrics["sparsity_check"].get("overall")
    if "peak_memory_bytes" in metrics:
        flat["peak_memory_gb"] = metrics["peak_memory_bytes"] / 2**30
    return flat


def _make_remote_logger(s: RunSettings, run_dir: Path):
    if s.logger != "wandb" or s.wandb is None:
        return NullLogger()
    from gblm.loggers.wandb import WandbLogger

    w = s.wandb
    group = w.group
    if group is None and HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
        group = Path(HydraConfig.get().sweep.dir).name
    tags = (s.method_name, f"sparsity={s.sparsity.label}", s.model.name, *w.tags)
    return WandbLogger(
        project=w.project,
        entity=w.entity,
        group=group or f"single-{s.model.name}",  # single runs of a model side by side
        tags=tuple(dict.fromkeys(tags)),
        name=w.name or _run_name(s),
        job_type=s.method_name,
        mode=w.mode,
        dir=str(run_dir),
    )


def _live_view(remote, metrics: dict):
    """A stage listener: each stage's start and end to the remote logger as it happens, and the
    perplexities as soon as they exist (the dense one long before the run ends)."""
    sent: set[str] = set()

    def tell(event: str, stage: str, seconds: float | None, done: int) -> None:
        remote.log_stage(event, stage, seconds, done)
        new = {k: v for k, v in metrics.get("ppl", {}).items() if k not in sent}
        if new:
            remote.log_metrics({"ppl": new})
            sent.update(new)

    return tell


def _record_files(run_dir: Path) -> list[Path]:
    """The run's record, for the remote logger's artifact: metrics, mask statistics, pictures,
    lm-eval's results."""
    names = ("metrics.json", "config_resolved.json", "mask_stats.csv", "mask_stats_blocks.json",
             "lm_eval_results.json")  # fmt: skip
    files = [run_dir / n for n in names]
    files += sorted((run_dir / "masks").glob("*.png")) if (run_dir / "masks").is_dir() else []
    return files + sorted(run_dir.glob("lm_eval_samples_*.jsonl"))


def _log_tables_and_images(remote, run_dir: Path) -> None:
    from gblm.analysis.records import read_mask_stats_csv

    path = run_dir / "mask_stats.csv"
    if path.exists():
        remote.log_table("mask_stats", read_mask_stats_csv(path))
    images = sorted((run_dir / "masks").glob("*.png")) if (run_dir / "masks").exists() else []
    if images:
        remote.log_images("masks", images)


def _print_summary(metrics: dict) -> None:
    ppl = metrics.get("ppl", {})
    parts = [f"{metrics['method']} {metrics['sparsity']['label']} on {metrics['model']}"]
    if "dense" in ppl:
        parts.append(f"dense ppl {ppl['dense']:.2f}")
    if "pruned" in ppl:
        parts.append(f"pruned ppl {ppl['pruned']:.2f}")
    if "sparsity_check" in metrics:
        parts.append(f"sparsity {metrics['sparsity_check']['overall']:.4f}")
    if "zeroshot" in metrics:
        parts.append(f"zero-shot mean acc {metrics['zeroshot'].get('mean_acc', float('nan')):.4f}")
    parts.append(f"{metrics['timings'].get('total', 0):.0f} s")
    print("gblm: " + " | ".join(parts), flush=True)


def _refuse(err: UserError) -> NoReturn:
    """An expected error as one paragraph on stderr (and in the log), exit status 2."""
    kind = "configuration error" if isinstance(err, ConfigError) else "error"
    message = " ".join(str(err).split())
    log.info("%s: %s", kind, message)
    print(f"gblm: {kind}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


@hydra.main(config_path=str(PROJECT_ROOT / "conf"), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Compose, run, report. Errors are logged with the run dir; in a multirun the next job goes on."""
    try:
        metrics = run(cfg)
    except UserError as err:
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise  # the sweep records this job as failed and goes on
        _refuse(err)
    except (KeyboardInterrupt, RunInterrupted) as err:
        signum = err.signum if isinstance(err, RunInterrupted) else signal.SIGINT
        log.error("%s: the run is recorded as interrupted", err or "interrupted by SIGINT")
        raise SystemExit(128 + int(signum)) from None
    _print_summary(metrics)
    return metrics.get("ppl", {}).get("pruned")


_HYDRA_FLAGS = (
    "--multirun",
    "-m",
    "--help",
    "-h",
    "--hydra-help",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--resolve",
    "-p",
    "--package",
    "--run",
    "-r",
    "--experimental-rerun",
    "--version",
)


def composition_problem(argv: list[str]) -> str | None:
    """The paragraph for a command line whose config does not compose, or None.

    Only plain runs are checked here (a multirun's jobs are checked by the sweep preflight, and
    Hydra's own flags are left to Hydra); ``hydra.*`` overrides are left out of the check.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from gblm.config import composition_error_message

    if any(arg.split("=", 1)[0] in _HYDRA_FLAGS for arg in argv):
        return None
    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
            compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        return composition_error_message(err, overrides)
    return None


def cli() -> None:
    """``python -m gblm``: a config that does not compose is one paragraph and exit 2; then Hydra."""
    problem = composition_problem(sys.argv[1:])
    if problem is not None:
        print(f"gblm: configuration error: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    main()


if __name__ == "__main__":
    cli()
