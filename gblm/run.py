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
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gblm import devices
from gblm.config import ConfigError, RunSettings, to_plain, validate
from gblm.loggers.local import LocalLogger, read_metrics
from gblm.paths import PROJECT_ROOT, cache_dir, configure_offline
from gblm.utils import StageTimer

log = logging.getLogger("gblm")

# Settings that do not change a run's results: a finished run with a different value is reused.
_NON_RESULT_KEYS = ("logger", "progress", "skip_finished", "experiment", "hydra")


def config_hash(cfg: dict[str, Any]) -> str:
    """Hash of the settings that determine a run's results (for resume)."""
    relevant = {k: v for k, v in cfg.items() if k not in _NON_RESULT_KEYS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def build_method(settings: RunSettings):
    """The configured method (None for the dense baseline); bad options are a ConfigError."""
    from gblm.methods.registry import build_method as build

    return build(settings.method_name, settings.method_target, **settings.method_kwargs)


def build_plan(settings: RunSettings):
    """The sparsity plan: one ratio per block when ``sparsity.per_block`` is set, else uniform."""
    from gblm.methods.plans import PerBlockPlan, UniformPlan

    if settings.sparsity_per_block:
        return PerBlockPlan(settings.sparsity_per_block)
    return UniformPlan(settings.sparsity)


def _run_name(s: RunSettings) -> str:
    return f"{s.method_name}_{s.sparsity.label}_{s.model.name}".replace(":", "of")


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
    """Prune and evaluate one configuration; returns the metrics written to ``metrics.json``."""
    container = to_plain(cfg)
    settings = validate(container)
    if run_dir is None:
        run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else Path.cwd()
    run_dir = Path(run_dir)
    local = LocalLogger(run_dir)
    digest = config_hash(container)

    previous = read_metrics(run_dir)
    if (
        settings.skip_finished
        and previous
        and previous.get("status") == "finished"
        and previous.get("config_hash") == digest
    ):
        log.info("run in %s already finished with the same config: skipped", run_dir)
        return previous

    from gblm.models.loading import check_model_available

    check_model_available(settings.model)  # fail fast, before data or weights
    if settings.zeroshot.enabled:
        from gblm.eval.zeroshot import validate_task_names

        validate_task_names(settings.zeroshot.tasks, settings.zeroshot.include_path)
    method, plan = build_method(settings), build_plan(settings)
    metrics: dict[str, Any] = {
        "status": "running",
        "config_hash": digest,
        "run_name": _run_name(settings),
        "method": settings.method_name,
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
    local.write_json("config_resolved.json", container)
    local.write_metrics(metrics)
    remote = _make_remote_logger(settings, run_dir)
    timer = StageTimer()
    started = time.perf_counter()
    try:
        remote.start(container)
        _execute(settings, method, plan, metrics, timer, local, run_dir)
        metrics["status"] = "finished"
    except BaseException as err:
        metrics["status"] = "failed"
        metrics["error"] = f"{type(err).__name__}: {err}"
        metrics["traceback"] = traceback.format_exc()
        raise
    finally:
        metrics["timings"] = {**timer.timings, "total": time.perf_counter() - started}
        local.write_metrics(metrics)
        if metrics["status"] == "finished":
            remote.log_metrics(_flat_metrics(metrics))
            _log_tables_and_images(remote, run_dir)
        remote.finish(exit_code=0 if metrics["status"] == "finished" else 1)
    return metrics


def _execute(
    s: RunSettings,
    method,
    plan,
    metrics: dict,
    timer: StageTimer,
    local: LocalLogger,
    run_dir: Path,
) -> None:
    from gblm.models.loading import load_model_and_tokenizer

    configure_offline()
    device = devices.resolve_device(s.device)
    dtype = devices.resolve_dtype(s.dtype, device)
    devices.reset_peak_memory(device)
    metrics["device"], metrics["dtype"] = str(device), devices.dtype_name(dtype)
    torch.manual_seed(s.seed)

    with timer.stage("load data"):
        texts = _prepare_data(s, _needs_calibration(method, plan))
    with timer.stage("load model"):
        model, tokenizer = load_model_and_tokenizer(s.model, device, dtype)
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
        with timer.stage("mask statistics"):
            _record_mask_stats(s, model, masks, metrics, local, run_dir)
        if eval_ppl is not None:
            metrics["ppl"]["pruned"] = eval_ppl("pruned")
        local.write_metrics(metrics)
    if s.zeroshot.enabled:
        _zeroshot_stage(s, model, tokenizer, device, metrics, timer)
        local.write_metrics(metrics)
    if s.save_model:
        from gblm.models.saving import save_pruned_model

        with timer.stage("save model"):
            metrics["saved_model"] = str(
                save_pruned_model(model, tokenizer, masks, run_dir / "model", metrics)
            )
    metrics["peak_memory_bytes"] = devices.peak_memory_bytes(device)


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
                device=_input_device(model, device),
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
    from gblm.data.calibration import cached_windows, sample_windows, windows_cache_key

    c = s.calibration
    with timer.stage("calibration windows"):
        key = windows_cache_key(
            s.model.model_id if s.model.kind != "tiny" else "smollm2-tokenizer",
            c.source,
            c.paths,
            c.nsamples,
            c.seqlen,
            c.seed,
            c.sampling,
            len(tokenizer),
        )
        return cached_windows(
            cache_dir(),
            key,
            lambda: sample_windows(
                tokenizer, texts["calibration"], c.nsamples, c.seqlen, c.seed, c.sampling
            ),
        )


def _prune(s: RunSettings, method, plan, model, tokenizer, texts, device, dtype, timer):
    """The method's dense-model pass, the plan's, then the layer walk; returns the masks."""
    from gblm.calibration.sequential import prune_model
    from gblm.methods.base import RunContext

    windows = None
    if _needs_calibration(method, plan):
        windows = _calibration_windows(s, tokenizer, texts, timer)
    context = RunContext(
        device=device,
        model_dtype=dtype,
        model_id=s.model.model_id,
        cache_dir=cache_dir(),
        progress=s.progress,
        onload=s.model.onload,
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


def _zeroshot_stage(s: RunSettings, model, tokenizer, device, metrics, timer) -> None:
    from gblm.eval.zeroshot import zeroshot_eval

    with timer.stage("zero-shot"):
        metrics["zeroshot"] = zeroshot_eval(
            model,
            tokenizer,
            s.zeroshot.tasks,
            limit=s.zeroshot.limit,
            batch_size=s.zeroshot.batch_size,
            device=_input_device(model, device),
            include_path=_zeroshot_include_path(s, tokenizer),
        )


def _input_device(model, device: torch.device) -> torch.device:
    """Where token ids go: the embedding's device when a device_map placed the model or
    ``model.onload`` kept the weights on the CPU (evaluation then runs where the weights are)."""
    embeddings = model.get_input_embeddings().weight.device
    placed = getattr(model, "hf_device_map", None) or embeddings.type != device.type
    return embeddings if placed else device


def _record_mask_stats(
    s: RunSettings, model, masks, metrics: dict, local: LocalLogger, run_dir: Path
) -> None:
    from gblm.analysis.plots import save_mask_images
    from gblm.analysis.records import write_mask_stats_blocks, write_mask_stats_csv
    from gblm.analysis.stats import model_mask_stats
    from gblm.models.zeros import weight_zero_share

    per_linear, per_block, per_type, overall = model_mask_stats(masks, s.sparsity.n, s.sparsity.m)
    write_mask_stats_csv(per_linear, run_dir / "mask_stats.csv")
    write_mask_stats_blocks(per_block, per_type, run_dir / "mask_stats_blocks.json")
    metrics["mask_stats"] = overall
    metrics["sparsity_check"] = weight_zero_share(model, list(masks))
    wanted = [n for n in s.mask_images if n in masks]
    if wanted:
        metrics["mask_images"] = [
            str(p) for p in save_mask_images(masks, wanted, run_dir / "masks")
        ]


def _zeroshot_include_path(s: RunSettings, tokenizer) -> str | None:
    if s.zeroshot.include_path or "austen_cloze" not in s.zeroshot.tasks:
        return s.zeroshot.include_path
    from gblm.eval.cloze import ensure_austen_cloze_task

    return str(ensure_austen_cloze_task(cache_dir() / "tasks", n_items=s.zeroshot.cloze_items))


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
    from gblm.loggers.base import NullLogger

    if s.logger != "wandb" or s.wandb is None:
        return NullLogger()
    from gblm.loggers.wandb import WandbLogger

    w = s.wandb
    group = w.group
    if group is None and HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
        group = Path(HydraConfig.get().sweep.dir).name
    return WandbLogger(
        project=w.project,
        entity=w.entity,
        group=group,
        tags=w.tags,
        name=w.name or _run_name(s),
        mode=w.mode,
        dir=str(run_dir),
    )


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


@hydra.main(config_path=str(PROJECT_ROOT / "conf"), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Compose, run, report. Errors are logged with the run dir; in a multirun the next job goes on."""
    try:
        metrics = run(cfg)
    except ConfigError as err:
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise  # the sweep records this job as failed and goes on
        log.error("configuration error: %s", err)
        raise SystemExit(2) from None
    _print_summary(metrics)
    return metrics.get("ppl", {}).get("pruned")


if __name__ == "__main__":
    main()
