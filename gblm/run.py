"""One run: validate -> load -> calibrate -> prune -> evaluate -> record.

``run(cfg)`` does the work and returns the metrics; it is what tests call. The Hydra ``main`` only
composes the config, calls ``run`` and closes loggers, so one failed job of a sweep never poisons
the next. Local files (``metrics.json``, ``mask_stats.csv``, masks) are always written before any
remote logger sees them.
"""

from __future__ import annotations

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
from hydra.utils import get_class
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


def build_pruner(settings: RunSettings):
    """Instantiate the method's class from its ``_target_`` with the group's remaining keys."""
    if settings.method_target is None:
        return None
    cls = get_class(settings.method_target)
    try:
        return cls(**settings.method_kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"method={settings.method_name}: {err}") from err


def _run_name(s: RunSettings) -> str:
    return f"{s.method_name}_{s.sparsity.label}_{s.model.name}".replace(":", "of")


def _prepare_data(s: RunSettings) -> dict[str, list[str]]:
    """Load the texts first: an unavailable dataset fails before the model loads."""
    from gblm.data.sources import load_documents

    texts: dict[str, list[str]] = {}
    if s.method_name not in ("dense", "magnitude"):
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
    pruner = build_pruner(settings)
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
        _execute(settings, pruner, metrics, timer, local, run_dir)
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
    s: RunSettings, pruner, metrics: dict, timer: StageTimer, local: LocalLogger, run_dir: Path
) -> None:
    from gblm.data.calibration import cached_windows, sample_windows, windows_cache_key
    from gblm.data.evaluation import join_and_tokenize
    from gblm.eval.perplexity import perplexity
    from gblm.models.loading import load_model_and_tokenizer

    configure_offline()
    device = devices.resolve_device(s.device)
    dtype = devices.resolve_dtype(s.dtype, device)
    devices.reset_peak_memory(device)
    metrics["device"], metrics["dtype"] = str(device), devices.dtype_name(dtype)
    torch.manual_seed(s.seed)

    with timer.stage("load data"):
        texts = _prepare_data(s)
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

    eval_tokens = None
    if s.perplexity.enabled:
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

    if pruner is not None and pruner.needs_gradients and s.loss_chunk_tokens:
        from gblm.calibration.gradients import check_chunkable

        check_chunkable(model)  # before the dense evaluation, not after it

    if eval_tokens is not None and (s.perplexity.dense or pruner is None):
        metrics["ppl"]["dense"] = eval_ppl("dense")
        local.write_metrics(metrics)

    masks: dict[str, torch.Tensor] = {}
    if pruner is not None:
        windows = None
        if pruner.needs_calibration:
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
                windows = cached_windows(
                    cache_dir(),
                    key,
                    lambda: sample_windows(
                        tokenizer, texts["calibration"], c.nsamples, c.seqlen, c.seed, c.sampling
                    ),
                )
        grad_norms = None
        if pruner.needs_gradients:
            grad_norms = _gradient_norms(s, pruner, model, windows, device, dtype, timer)
        from gblm.calibration.sequential import prune_model

        with timer.stage("prune"):
            masks = prune_model(
                model,
                pruner,
                s.sparsity,
                windows,
                device=device,
                batch_size=s.batch_size,
                grad_norms=grad_norms,
                progress=s.progress,
                offload_inputs=s.offload_inputs,
            )
        del grad_norms
        with timer.stage("mask statistics"):
            _record_mask_stats(s, model, masks, metrics, local, run_dir)
        if eval_tokens is not None:
            metrics["ppl"]["pruned"] = eval_ppl("pruned")
        local.write_metrics(metrics)

    if s.zeroshot.enabled:
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
        local.write_metrics(metrics)

    if s.save_model:
        from gblm.models.saving import save_pruned_model

        with timer.stage("save model"):
            metrics["saved_model"] = str(
                save_pruned_model(model, tokenizer, masks, run_dir / "model", metrics)
            )
    metrics["peak_memory_bytes"] = devices.peak_memory_bytes(device)


def _input_device(model, device: torch.device) -> torch.device:
    """Where token ids go: the embedding's device when a device_map placed the model."""
    return (
        model.get_input_embeddings().weight.device
        if getattr(model, "hf_device_map", None)
        else device
    )


def _gradient_norms(s: RunSettings, pruner, model, windows, device, dtype, timer: StageTimer):
    from gblm.calibration.gradients import cached_gradient_norms, gradient_cache_key, gradient_norms

    acc_dtype = (
        devices.resolve_dtype(pruner.accumulator_dtype, device)
        if isinstance(pruner.accumulator_dtype, str)
        else pruner.accumulator_dtype
    )
    key = gradient_cache_key(s.model.model_id, windows, pruner.norm, pruner.scale, acc_dtype, dtype)
    if s.loss_chunk_tokens:  # its norms may differ from the default's in the last float bits
        key["loss_chunk_tokens"] = s.loss_chunk_tokens
    with timer.stage("gradients"):
        return cached_gradient_norms(
            cache_dir() / "gradients",
            key,
            lambda: gradient_norms(
                model,
                windows,
                norm=pruner.norm,
                scale=pruner.scale,
                accumulator_dtype=acc_dtype,
                device=device,
                checkpointing=s.gradient_checkpointing,
                loss_chunk_tokens=s.loss_chunk_tokens,
                progress=s.progress,
            ),
        )


def _record_mask_stats(
    s: RunSettings, model, masks, metrics: dict, local: LocalLogger, run_dir: Path
) -> None:
    from gblm.pruning import stats

    per_linear, per_block, per_type, overall = stats.model_mask_stats(
        masks, s.sparsity.n, s.sparsity.m
    )
    stats.write_mask_stats_csv(per_linear, run_dir / "mask_stats.csv")
    local.write_json("mask_stats_blocks.json", {"per_block": per_block, "per_type": per_type})
    metrics["mask_stats"] = overall
    metrics["sparsity_check"] = stats.weight_zero_share(model, list(masks))
    wanted = [n for n in s.mask_images if n in masks]
    if wanted:
        metrics["mask_images"] = [
            str(p) for p in stats.save_mask_images(masks, wanted, run_dir / "masks")
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
    from gblm.pruning.stats import read_mask_stats_csv

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
