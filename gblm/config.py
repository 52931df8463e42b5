"""Typed run settings and validation: bad values fail here, before any model or data loads.

Only :mod:`gblm.run` sees a ``DictConfig``; it calls :func:`validate` to turn it into a
:class:`RunSettings`, and everything below takes these typed values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from gblm.data.sources import SAMPLINGS, SOURCES
from gblm.devices import DTYPE_NAMES
from gblm.errors import ConfigError
from gblm.models.loading import KINDS, ModelSpec
from gblm.pruning.sparsity import Sparsity

METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "gblm")
LOGGERS = ("local", "wandb")
WANDB_MODES = ("auto", "online", "offline", "disabled")
# Keys of the method group that configure the run, not the pruner's constructor.
METHOD_RUN_KEYS = ("name", "_target_", "order", "gradient_checkpointing", "loss_chunk_tokens")


@dataclass
class CalibrationSettings:
    source: str = "austen"
    paths: list[str] | None = None
    split: str = "train"
    sampling: str = "stream"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0


@dataclass
class PerplexitySettings:
    enabled: bool = True
    dataset: str = "austen"
    split: str = "test"
    paths: list[str] | None = None
    seqlen: int = 2048
    batch_size: int = 1
    max_windows: int | None = None
    dense: bool = True


@dataclass
class ZeroshotSettings:
    enabled: bool = False
    tasks: list[str] = field(default_factory=list)
    limit: int | float | None = None
    batch_size: int = 1
    include_path: str | None = None
    cloze_items: int = 100


@dataclass
class WandbSettings:
    project: str = "gblm"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    name: str | None = None
    mode: str = "auto"


@dataclass
class RunSettings:
    model: ModelSpec
    method_name: str
    method_target: str | None
    method_kwargs: dict[str, Any]
    sparsity: Sparsity
    calibration: CalibrationSettings
    perplexity: PerplexitySettings
    zeroshot: ZeroshotSettings
    logger: str = "local"
    wandb: WandbSettings | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    batch_size: int = 1
    offload_inputs: bool = False
    gradient_checkpointing: bool = False
    loss_chunk_tokens: int = 0  # GBLM gradient stage: LM head + loss this many positions at a time
    save_model: bool = False
    mask_images: list[str] = field(default_factory=list)
    progress: bool = True
    skip_finished: bool = True


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(allowed)}.")
    return value


def _positive_int(key: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{key}={value!r}: must be an integer >= {minimum}.")
    return value


def _paths(key: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def to_plain(cfg: Any) -> dict[str, Any]:
    """A resolved plain dict of a DictConfig; a missing mandatory value (``???``) is a ConfigError."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} must be set (it has no default).") from None
    except InterpolationToMissingValueError as err:
        found = re.search(r"Missing mandatory value: ([\w.]+)", str(err.msg))
        missing = found.group(1) if found else err.full_key
        raise ConfigError(
            f"{missing} must be set (it has no default; {err.full_key} refers to it)."
        ) from None
    plain.pop("hydra", None)
    return plain


def validate(cfg: dict[str, Any]) -> RunSettings:
    """Check every value of a resolved config (a plain dict) and return typed settings."""
    method = dict(cfg["method"])
    name = _choice("method", method.get("name"), METHODS)
    method_kwargs = {k: v for k, v in method.items() if k not in METHOD_RUN_KEYS}

    sp = cfg["sparsity"]
    try:
        ratio = float(sp.get("ratio", 0.0))
        sparsity = Sparsity(ratio=ratio, n=int(sp.get("n", 0)), m=int(sp.get("m", 0)))
    except ValueError as err:
        raise ConfigError(
            f"{err} Allowed: sparsity.ratio in [0, 1) for unstructured; N:M with 0 < N < M and "
            f"sparsity.ratio = N/M (sparsity=nm_2_4 or nm_4_8)."
        ) from None
    if name != "dense" and ratio == 0.0:
        raise ConfigError(
            f"sparsity.ratio=0 with method={name}: nothing to prune; use method=dense."
        )

    c = cfg["calibration"]
    calibration = CalibrationSettings(
        source=_choice("calibration.source", c.get("source"), SOURCES),
        paths=_paths("calibration.paths", c.get("paths")),
        split=c.get("split", "train"),
        sampling=_choice("calibration.sampling", c.get("sampling", "stream"), SAMPLINGS),
        nsamples=_positive_int("calibration.nsamples", c.get("nsamples")),
        seqlen=_positive_int("calibration.seqlen", c.get("seqlen"), minimum=2),
        seed=int(c.get("seed", 0)),
    )
    if calibration.source == "local" and not calibration.paths:
        raise ConfigError(
            "calibration.source=local needs calibration.paths=[file.txt, file.jsonl, ...]."
        )

    e = cfg["eval"]
    p = e.get("perplexity", {}) or {}
    perplexity = PerplexitySettings(
        enabled=bool(p.get("enabled", True)),
        dataset=_choice("eval.perplexity.dataset", p.get("dataset", "austen"), SOURCES),
        split=p.get("split", "test"),
        paths=_paths("eval.perplexity.paths", p.get("paths")),
        seqlen=_positive_int(
            "eval.perplexity.seqlen", p.get("seqlen", calibration.seqlen), minimum=2
        ),
        batch_size=_positive_int("eval.perplexity.batch_size", p.get("batch_size", 1)),
        max_windows=None
        if p.get("max_windows") is None
        else _positive_int("eval.perplexity.max_windows", p["max_windows"]),
        dense=bool(p.get("dense", True)),
    )
    if perplexity.enabled and perplexity.dataset == "local" and not perplexity.paths:
        raise ConfigError(
            "eval.perplexity.dataset=local needs eval.perplexity.paths=[file.txt, ...]."
        )
    z = e.get("zeroshot", {}) or {}
    zeroshot = ZeroshotSettings(
        enabled=bool(z.get("enabled", False)),
        tasks=list(z.get("tasks") or []),
        limit=z.get("limit"),
        batch_size=z.get("batch_size", 1)
        if z.get("batch_size") == "auto"
        else _positive_int("eval.zeroshot.batch_size", z.get("batch_size", 1)),
        include_path=z.get("include_path"),
        cloze_items=_positive_int("eval.zeroshot.cloze_items", z.get("cloze_items", 100)),
    )
    if zeroshot.enabled and not zeroshot.tasks:
        raise ConfigError("eval.zeroshot.enabled=true needs eval.zeroshot.tasks=[...].")

    m = cfg["model"]
    model = ModelSpec(
        kind=_choice("model.kind", m.get("kind", "hf"), KINDS),
        name=str(m.get("name", m.get("name_or_path") or m.get("kind"))),
        name_or_path=m.get("name_or_path"),
        revision=m.get("revision"),
        dtype=_choice("model.dtype", m.get("dtype", cfg.get("dtype", "auto")), DTYPE_NAMES),
        device_map=m.get("device_map"),
        trust_remote_code=bool(m.get("trust_remote_code", False)),
        tiny=dict(m.get("tiny") or {}),
    )
    if model.kind == "hf" and not model.name_or_path:
        raise ConfigError(
            "model.name_or_path is required with model.kind=hf (hub id or local directory)."
        )

    lg = cfg.get("logger", {}) or {}
    logger = _choice("logger.name", lg.get("name", "local"), LOGGERS)
    wandb = None
    if logger == "wandb":
        wandb = WandbSettings(
            project=lg.get("project", "gblm"),
            entity=lg.get("entity"),
            group=lg.get("group"),
            tags=list(lg.get("tags") or []),
            name=lg.get("run_name"),
            mode=_choice("logger.mode", lg.get("mode", "auto"), WANDB_MODES),
        )
    device = str(cfg.get("device", "auto"))
    if not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise ConfigError(f"device={device!r}: allowed values are auto, cpu, cuda, cuda:N.")

    return RunSettings(
        model=model,
        method_name=name,
        method_target=method.get("_target_"),
        method_kwargs=method_kwargs,
        sparsity=sparsity,
        calibration=calibration,
        perplexity=perplexity,
        zeroshot=zeroshot,
        logger=logger,
        wandb=wandb,
        device=device,
        dtype=model.dtype,
        seed=int(cfg.get("seed", 0)),
        batch_size=_positive_int("batch_size", cfg.get("batch_size", 1)),
        offload_inputs=bool(cfg.get("offload_inputs", False)),
        gradient_checkpointing=bool(method.get("gradient_checkpointing", False)),
        loss_chunk_tokens=_positive_int(
            "method.loss_chunk_tokens", method.get("loss_chunk_tokens", 0), minimum=0
        ),
        save_model=bool(cfg.get("save_model", False)),
        mask_images=list(cfg.get("mask_images") or []),
        progress=bool(cfg.get("progress", True)),
        skip_finished=bool(cfg.get("skip_finished", True)),
    )
