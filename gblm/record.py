"""The run record: ``metrics.json`` and its companion files, written from the pipeline's result.

``metrics.json`` starts as the run's identity with ``"status": "running"`` and grows as the stages
end (:func:`update`); the mask statistics go to ``mask_stats.csv`` and ``mask_stats_blocks.json``,
a few masks to PNGs. The remote logger (:func:`remote_logger`) only sees what is already on disk.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig

from gblm.config import RunConf
from gblm.loggers.base import NullLogger
from gblm.loggers.local import process_record
from gblm.pipeline import SAVED_MODEL, Result
from gblm.utils import atomic_leftovers

log = logging.getLogger("gblm")

# The files a run's stages write beside its record (a new run in the folder starts without them).
OUTPUT_FILES = ("mask_stats.csv", "mask_stats_blocks.json", "lm_eval_results.json")
RECORD_FILES = ("metrics.json", "config_resolved.json", *OUTPUT_FILES)


def _pictures_and_samples(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """The mask pictures and lm-eval's per-item logs in ``run_dir``."""
    pictures = sorted((run_dir / "masks").glob("*.png"))
    return pictures, sorted(run_dir.glob("lm_eval_samples_*.jsonl"))


def _sweep() -> Any:
    """Hydra's config when this run is a job of a multirun, else None."""
    if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
        return HydraConfig.get()
    return None


def run_name(conf: RunConf) -> str:
    """``method_sparsity_model`` (the method with its weight update: ``gblm+admm``), and in a
    sweep the other keys that name the job (``gblm_0.5_llama_7b_calibration.nsamples=32``), so
    that its name is unique within the sweep."""
    target, update = conf.sparsity.target(), conf.reconstruct_name
    method = conf.method_name + (f"+{update}" if update != "none" else "")
    name = f"{method}_{target.label}_{conf.model.name}".replace(":", "of")
    hydra = _sweep()
    if hydra is not None:
        shown = ("method=", "sparsity.ratio=", "model=", "reconstruct=")  # in the name already
        extra = [o for o in hydra.job.override_dirname.split(",") if o and not o.startswith(shown)]
        name += "_" + ",".join(extra) if extra else ""
    return name


def command() -> str | None:
    """The command line of this config (:func:`gblm.models.card.portable_command`); None outside
    a Hydra app."""
    if not HydraConfig.initialized():
        return None
    from gblm.models.card import portable_command

    return portable_command(list(HydraConfig.get().overrides.task))


def method_label(conf: RunConf, method, plan) -> str:
    """The method as the report's tables name it: ``dsnot(wanda)``, ``wanda+owl``, ``gblm``,
    ``gblm+admm`` (with its weight update), ``gblm+obs+owl``."""
    if method is None:
        return conf.method_name
    label = method.label or conf.method_name
    label += f"+{method.update.name}" if method.update is not None else ""
    return label + (f"+{plan.label}" if plan.label else "")


def initial(conf: RunConf, method, plan, digest: str) -> dict[str, Any]:
    """The record of a run that starts: who runs what, to which target, on which data."""
    target, c = conf.sparsity.target(), conf.calibration
    return {
        "status": "running",
        "config_hash": digest,
        "process": process_record(),
        "run_name": run_name(conf),
        "command": command(),
        "method": conf.method_name,
        "method_label": method_label(conf, method, plan),
        "method_settings": conf.method_options,
        "reconstruct": conf.reconstruct_name,
        "reconstruct_settings": method.update.describe() if method and method.update else {},
        "model": conf.model.name,
        "sparsity": {
            **{k: getattr(target, k) for k in ("ratio", "n", "m", "label")},
            **plan.record(),
        },
        "calibration": {k: getattr(c, k) for k in ("source", "nsamples", "seqlen", "seed")},
        "ppl": {},
        "timings": {},
    }


def provenance(device: str, fingerprints: dict[str, str]) -> dict[str, Any]:
    """What produced the numbers beyond the config: the code, the libraries, the device and the
    thread count (floating-point results move with them), and the inputs' content fingerprints
    (:func:`gblm.pipeline.fingerprints`), which a relaunch compares."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from gblm import __version__, devices
    from gblm.paths import PROJECT_ROOT

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    def package(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return {
        "gblm": __version__,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        **{name: package(name) for name in ("torch", "transformers", "lm_eval", "accelerate")},
        "device": devices.device_name(torch.device(device)),
        "threads": torch.get_num_threads(),
        "fingerprints": fingerprints,
    }


def clear_outputs(run_dir: Path) -> None:
    """Remove the companion files an earlier run left in ``run_dir`` (mask statistics, mask
    pictures, lm-eval's output, the saved model and the temporaries of a killed save): a run that
    writes none of them must not show the old ones."""
    pictures, samples = _pictures_and_samples(run_dir)
    for path in [run_dir / name for name in OUTPUT_FILES] + pictures + samples:
        path.unlink(missing_ok=True)
    for folder in [run_dir / SAVED_MODEL, *atomic_leftovers(run_dir / SAVED_MODEL)]:
        shutil.rmtree(folder, ignore_errors=True)


def update(metrics: dict[str, Any], result: Result, conf: RunConf, run_dir: Path) -> dict:
    """``metrics`` with what ``result`` holds now; the mask statistics' files written once."""
    from gblm.analysis.records import write_mask_stats_blocks, write_mask_stats_csv

    metrics.update(device=result.device, dtype=result.dtype, ppl=dict(result.ppl))
    metrics["sparsity"].update(result.plan)
    optional = ("eval_tokens", "sparsity_check", "zeroshot", "saved_model", "saved_dtype",
                "pushed_to", "push_to_hub_error", "peak_memory_bytes",
                "reconstruct_seconds")  # fmt: skip
    metrics.update({k: getattr(result, k) for k in optional if getattr(result, k) is not None})
    stats = result.mask_stats
    if stats is not None and "mask_stats" not in metrics:
        write_mask_stats_csv(stats.per_linear, run_dir / "mask_stats.csv")
        write_mask_stats_blocks(stats.per_block, stats.per_type, run_dir / "mask_stats_blocks.json")
        metrics["mask_stats"] = stats.overall
        _mask_images(conf, result, metrics, run_dir)
    return metrics


def _mask_images(conf: RunConf, result: Result, metrics: dict, run_dir: Path) -> None:
    """PNGs of the masks of ``mask_images``: optional, so a failure is a warning in the record."""
    from gblm.analysis.plots import save_mask_images

    wanted = [n for n in conf.mask_images if n in result.masks]
    if not wanted:
        return
    try:
        paths = save_mask_images(result.masks, wanted, run_dir / "masks")
        metrics["mask_images"] = [str(p) for p in paths]
    except Exception as err:  # pictures are optional: a full disk costs them, not the run
        message = f"mask images not written: {type(err).__name__}: {err}"
        log.warning("%s; the run goes on", message)
        metrics.setdefault("warnings", []).append(message)


def resumed_wandb(previous: Any, digest: str) -> dict[str, str]:
    """``{"id": ...}`` of the W&B run of an unfinished earlier attempt of the same config in the
    run dir (``previous``: its ``metrics.json``), which a relaunch goes on with; else nothing."""
    if not isinstance(previous, dict) or previous.get("status") == "finished":
        return {}
    wandb_id = (previous.get("wandb") or {}).get("id")
    return {"id": wandb_id} if wandb_id and previous.get("config_hash") == digest else {}


def remote_logger(conf: RunConf, run_dir: Path, resume_id: str | None = None):
    """The W&B logger of ``logger=wandb`` (a :class:`NullLogger` otherwise); ``resume_id``: the
    W&B run to go on with (:func:`resumed_wandb`)."""
    if conf.logger.name != "wandb":
        return NullLogger()
    from gblm.loggers.wandb import WandbLogger

    w, hydra = conf.logger, _sweep()
    group = w.group or (Path(hydra.sweep.dir).name if hydra is not None else None)
    tags = (conf.method_name, f"sparsity={conf.sparsity.target().label}", conf.model.name,
            f"reconstruct={conf.reconstruct_name}", *w.tags)  # fmt: skip
    return WandbLogger(
        project=w.project,
        entity=w.entity,
        group=group or f"single-{conf.model.name}",  # single runs of a model side by side
        tags=tags,  # repeats dropped by the logger
        name=w.run_name or run_name(conf),
        job_type=conf.method_name,
        mode=w.mode,
        dir=str(run_dir),
        resume_id=resume_id,
    )


def live_view(remote, metrics: dict):
    """A stage listener: each stage's start and end to the remote logger, and the perplexities
    as soon as they exist (the dense one long before the run ends)."""
    sent: set[str] = set()

    def tell(event: str, stage: str, seconds: float | None, done: int) -> None:
        if event not in ("start", "end"):  # a note about a stage to come
            return
        remote.log_stage(event, stage, seconds, done)
        new = {k: v for k, v in metrics.get("ppl", {}).items() if k not in sent}
        if new:
            remote.log_metrics({"ppl": new})
            sent.update(new)

    return tell


def publish(remote, metrics: dict, run_dir: Path) -> None:
    """A finished run's record to the remote logger: numbers, the mask table, pictures, files."""
    from gblm.analysis.records import read_mask_stats_csv

    numbers = {key: metrics.get(key) or {} for key in ("ppl", "timings", "mask_stats", "zeroshot")}
    achieved = (metrics.get("sparsity_check") or {}).get("overall")
    numbers["sparsity"] = {"ratio": metrics["sparsity"]["ratio"], "achieved": achieved}
    if "peak_memory_bytes" in metrics:
        numbers["peak_memory_gb"] = metrics["peak_memory_bytes"] / 2**30
    remote.log_metrics(numbers)  # nested: the logger names them ``ppl/pruned``
    masks, samples = _pictures_and_samples(run_dir)

    def tables_and_images() -> None:
        if (run_dir / "mask_stats.csv").exists():
            remote.log_table("mask_stats", read_mask_stats_csv(run_dir / "mask_stats.csv"))
        if masks:
            remote.log_images("masks", masks)

    remote.call("log tables and images", tables_and_images)
    files = [run_dir / n for n in RECORD_FILES] + masks + samples
    # the run dir's parent (the date of a single run, the sweep of a job) keeps names apart
    remote.log_artifact(f"run-{run_dir.parent.name}-{run_dir.name}", "run-record", files)


def remote_outcome(metrics: dict, remote) -> bool:
    """The remote logger's failures into ``metrics["warnings"]``, where its record went (an
    offline folder, a URL) into ``metrics["wandb"]``; whether anything changed."""
    location = remote.location()
    new = [w for w in remote.failures() if w not in metrics.get("warnings", [])]
    if new:
        metrics.setdefault("warnings", []).extend(new)
    if location and metrics.get("wandb") != location:
        metrics["wandb"] = location
        return True
    return bool(new)


def summary_line(metrics: dict) -> str:
    """The line a finished run prints: what ran, the perplexities, the sparsity, the time."""
    ppl = metrics.get("ppl", {})
    parts = [f"{metrics['method']} {metrics['sparsity']['label']} on {metrics['model']}"]
    parts += [f"{tag} ppl {ppl[tag]:.2f}" for tag in ("dense", "pruned") if tag in ppl]
    if "sparsity_check" in metrics:
        parts.append(f"sparsity {metrics['sparsity_check']['overall']:.4f}")
    if "mean_acc" in (metrics.get("zeroshot") or {}):
        parts.append(f"zero-shot mean acc {metrics['zeroshot']['mean_acc']:.4f}")
    parts.append(f"{metrics['timings'].get('total', 0):.0f} s")
    return "gblm: " + " | ".join(parts)


def _shown(path: str | Path) -> str:
    """A path as the user can paste it: relative to the working directory when inside it."""
    path = Path(path).absolute()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def where_lines(metrics: dict, run_dir: Path) -> list[str]:
    """Where a run's outputs went: its folder, the saved model, the W&B run (or how to upload it)."""
    lines = [f"gblm: run folder {_shown(run_dir)}"]
    if metrics.get("saved_model"):
        lines.append(f"gblm: saved model {_shown(metrics['saved_model'])}")
    wandb = metrics.get("wandb") or {}
    if wandb.get("sync_dir"):
        lines.append(f"gblm: W&B run saved offline; upload it with: wandb sync {_shown(wandb['sync_dir'])}")  # fmt: skip
    elif wandb.get("url"):
        lines.append(f"gblm: W&B run {wandb['url']}")
    return lines
