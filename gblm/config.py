"""The config schema, and validation: bad values fail here, before any model or data loads.

The schema is written once, as the dataclasses below: their fields are the keys, their types and
their defaults. :class:`RunConf` is stored in Hydra's ConfigStore as ``schema`` and heads the
defaults list of ``conf/config.yaml``, so every group file merges onto a typed node and holds only
what differs from these defaults. A value of the wrong type (``calibration.nsamples=abc``) fails
at composition, naming its key; ``save_model=no`` or ``eval.perplexity.enabled=off`` become a real
``False``. The ``method`` node stays an untyped dict: each method's options are the keyword
arguments of its class (``conf/method/<name>.yaml``, :mod:`gblm.methods.registry`), which checks
them.

Only :mod:`gblm.run` sees a ``DictConfig``; it calls :func:`validate` to turn it into a
:class:`RunSettings`: the checks of allowed values and across groups, each message naming the key
and the allowed values. Everything below takes these typed values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import II, MISSING, OmegaConf

from gblm.data.sources import SAMPLINGS, SOURCES
from gblm.devices import DTYPE_NAMES
from gblm.errors import ConfigError
from gblm.methods.registry import ENTRY_KEYS, method_entry, method_names
from gblm.models.loading import KINDS, ModelSpec
from gblm.pruning.sparsity import Sparsity

LOGGERS = ("local", "wandb")
ALLOCATORS = ("uniform", "owl")
WANDB_MODES = ("auto", "online", "offline", "disabled")
SCHEMA_NAME = "schema"  # the ConfigStore entry at the head of conf/config.yaml's defaults list


# The schema ---------------------------------------------------------------------------------------
@dataclass
class ModelConf:
    """The ``model`` group: what to load (see :class:`gblm.models.loading.ModelSpec`)."""

    name: str | None = II("model.name_or_path")  # a short name for run records
    kind: str = "hf"  # hf | smollm2 | tiny
    # kind=hf: a hub id or a local save_pretrained directory (required); null for the other kinds
    name_or_path: str | None = MISSING
    revision: str | None = None
    dtype: str = II("dtype")
    device_map: Any = None  # auto: spread over GPUs / offload to CPU with accelerate
    # device_map with "disk" entries: the folder accelerate offloads to, and where the walk writes
    # those blocks' pruned weights (one per run; required then)
    offload_folder: str | None = None
    # weights stay on the CPU (or memory-mapped); each block is moved to the device for its work
    onload: bool = False
    trust_remote_code: bool = False
    tiny: dict[str, Any] = field(default_factory=dict)  # kind=tiny: tiny_config arguments + seed
    run_dir: str | None = None  # model=saved: the run dir whose model/ a run saved (required)


@dataclass
class SparsityConf:
    """The ``sparsity`` group: unstructured (``n = m = 0``) or N:M."""

    ratio: float = 0.5
    n: int = 0
    m: int = 0
    per_block: list[float] | None = None  # one ratio per decoder block; None: ``ratio`` for all
    allocator: str = "uniform"  # uniform | owl (per-block ratios from the dense model's outliers)
    lmbda: float = 0.08  # OWL's Lambda: the block ratios span 2 * Lambda (N:M: N spans Lambda)
    outlier_m: float = 5.0  # OWL's M: an outlier is a Wanda score > M * the block's mean
    clamp: bool | None = None  # OWL: ratios <= 0 -> 0.01; None: as published (not for magnitude)


@dataclass
class CalibrationSettings:
    """The ``calibration`` group (schema and settings alike)."""

    source: str = "austen"  # austen | kjv | wikitext2 | c4 | local
    paths: list[str] | None = None  # local files, or an offline copy of the source
    split: str = "train"
    sampling: str = "stream"  # stream | documents (one document at a time, as published for C4)
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0


@dataclass
class PerplexitySettings:
    """``eval.perplexity`` (schema and settings alike)."""

    enabled: bool = True
    dataset: str = "austen"
    split: str = "test"
    paths: list[str] | None = None
    seqlen: int = II("calibration.seqlen")
    batch_size: int = 1
    max_windows: int | None = None  # None: every window, as published
    dense: bool = True  # also evaluate the dense model first


@dataclass
class ZeroshotSettings:
    """``eval.zeroshot`` (schema and settings alike)."""

    enabled: bool = False
    # a local multiple-choice task built from Persuasion (gblm/eval/cloze.py)
    tasks: list[str] = field(default_factory=lambda: ["austen_cloze"])
    limit: int | float | None = None
    batch_size: int | str = 8  # an integer, or auto
    include_path: str | None = None  # a folder of extra lm-eval task YAMLs
    cloze_items: int = 100
    log_samples: bool = (
        False  # keep lm-eval's per-item log in the run dir (lm_eval_samples_*.jsonl)
    )


@dataclass
class EvalConf:
    """The ``eval`` group."""

    perplexity: PerplexitySettings = field(default_factory=PerplexitySettings)
    zeroshot: ZeroshotSettings = field(default_factory=ZeroshotSettings)


@dataclass
class LoggerConf:
    """The ``logger`` group: local files only, or Weights & Biases after them."""

    name: str = "local"  # local | wandb
    project: str = "gblm"
    entity: str | None = None
    group: str | None = None  # None: the sweep directory's name
    tags: list[str] = field(default_factory=list)
    run_name: str | None = None  # None: method_sparsity_model
    mode: str = "auto"  # auto (online when logged in, else offline) | online | offline | disabled


@dataclass
class RunConf:
    """The whole run config: the groups and the top-level keys."""

    model: ModelConf = field(default_factory=ModelConf)
    method: dict[str, Any] = field(default_factory=dict)  # untyped: the method class checks it
    sparsity: SparsityConf = field(default_factory=SparsityConf)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    eval: EvalConf = field(default_factory=EvalConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    seed: int = 0
    device: str = "auto"  # auto (first CUDA device, else CPU) | cpu | cuda | cuda:N
    # model dtype: auto (float16 on CUDA as published, float32 on CPU) | float32 | float16 | bfloat16
    dtype: str = "auto"
    # calibration windows per forward in the layer walk (and GBLM's gradient stage): auto (CPU:
    # 2048 rows per matmul, bit for bit the same results; GPU: 1, as published) | an integer
    batch_size: int | str = "auto"
    offload_inputs: bool = False  # keep the walk's (N, T, hidden) block inputs on the CPU
    save_model: bool = False  # save_pretrained the pruned model with its masks into the run dir
    # dtype of the saved weights: original (the checkpoint's) | float32 | float16 | bfloat16
    save_dtype: str = "original"
    push_to_hub: str | None = None  # a hub repo id: upload the saved model there (save_model=true)
    mask_images: list[str] = field(  # PNG masks of these Linears
        default_factory=lambda: ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    )
    progress: bool = True
    skip_finished: bool = True  # a run dir finished with the same config is not redone
    overwrite: bool = False  # replace a run dir's finished run of another config (else refused)


def _require(value: Any, key: str) -> Any:
    """``${gblm.require:${a.b},a.b}``: the value of ``a.b``, which an option needs set.

    A group file cannot make a key with a schema default mandatory (``???`` never replaces a
    value in a merge), so the option that needs it interpolates through this resolver.
    """
    if value is None or value == "":
        raise ConfigError(f"{key} must be set (it has no default)")
    return value


def register_schema() -> None:
    """Store :class:`RunConf` in Hydra's ConfigStore, and the ``gblm.require`` resolver.

    Done on import of this module, which :mod:`gblm.run` and :mod:`gblm.sweep` import.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConf)
    OmegaConf.register_new_resolver("gblm.require", _require, replace=True)


register_schema()


# The settings -------------------------------------------------------------------------------------
@dataclass
class WandbSettings:
    project: str
    entity: str | None
    group: str | None
    tags: list[str]
    name: str | None
    mode: str


@dataclass
class AllocatorSettings:
    """How the per-block targets are chosen: ``uniform`` (or ``per_block``) or OWL's options."""

    name: str = "uniform"
    lmbda: float = 0.08
    outlier_m: float = 5.0
    clamp: bool | None = None


@dataclass
class RunSettings:
    model: ModelSpec
    method_name: str
    method_target: str | None
    method_kwargs: dict[str, Any]
    sparsity: Sparsity
    sparsity_per_block: list[float] | None  # one ratio per decoder block; None: uniform
    allocator: AllocatorSettings
    calibration: CalibrationSettings
    perplexity: PerplexitySettings
    zeroshot: ZeroshotSettings
    logger: str
    wandb: WandbSettings | None
    device: str
    dtype: str
    seed: int
    batch_size: int | str
    offload_inputs: bool
    save_model: bool
    save_dtype: str
    push_to_hub: str | None
    mask_images: list[str]
    progress: bool
    skip_finished: bool
    overwrite: bool = False


# Validation ---------------------------------------------------------------------------------------
def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(allowed)}.")
    return value


def _push_target(repo_id: str | None, save_model: bool) -> str | None:
    if repo_id is None:
        return None
    if not save_model:
        raise ConfigError(
            f"push_to_hub={repo_id!r} needs save_model=true (the saved model is pushed)."
        )
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or " " in repo_id:
        raise ConfigError(f"push_to_hub={repo_id!r}: give a hub repo id as owner/name.")
    return repo_id


def _positive_int(key: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{key}={value!r}: must be an integer >= {minimum}.")
    return value


def _auto_or_positive_int(key: str, value: Any) -> int | str:
    if value == "auto":
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r}: allowed values are auto or an integer >= 1.")
    return value


def _missing_key(err: Exception) -> str:
    found = re.search(r"Missing mandatory value: ([\w.\[\]]+)", str(getattr(err, "msg", err)))
    return found.group(1) if found else str(err.full_key)


def _config_error_in(err: BaseException) -> ConfigError | None:
    """The ConfigError a resolver raised, which OmegaConf wraps (as the context, not the cause)."""
    seen: BaseException | None = err
    while seen is not None and not isinstance(seen, ConfigError):
        seen = seen.__cause__ or seen.__context__
    return seen


def to_plain(cfg: Any) -> dict[str, Any]:
    """A resolved plain dict of a DictConfig; a missing mandatory value (``???``) is a ConfigError."""
    from omegaconf import DictConfig
    from omegaconf.errors import (
        InterpolationResolutionError,
        InterpolationToMissingValueError,
        MissingMandatoryValue,
    )

    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} must be set (it has no default).") from None
    except InterpolationToMissingValueError as err:
        raise ConfigError(
            f"{_missing_key(err)} must be set (it has no default; {err.full_key} refers to it)."
        ) from None
    except InterpolationResolutionError as err:
        cause = _config_error_in(err)
        if cause is None:
            raise
        raise ConfigError(f"{str(cause)[:-1]}; {err.full_key} refers to it).") from None
    plain.pop("hydra", None)
    return plain


def _unknown_schema_key(key: str) -> str:
    """``key`` is in no schema node: name it with the keys its parent node has."""
    node: Any = RunConf()
    parent = key.rpartition(".")[0]
    for part in parent.split(".") if parent else []:
        node = getattr(node, part, None)
    keys = list(vars(node)) if hasattr(node, "__dataclass_fields__") else []
    listed = f": the keys of {parent or 'the top level'} are {', '.join(keys)}" if keys else ""
    return f"{key}: not a key of the config{listed}. Check its spelling."


def typed_config(cfg: dict[str, Any]) -> RunConf:
    """``cfg`` merged onto the schema: defaults filled in, every value of its declared type.

    A composed config is typed already; a plain dict from elsewhere gets the same checks here.
    Raises ConfigError naming the key of a value of the wrong type or of an unknown key.
    """
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        MissingMandatoryValue,
        OmegaConfBaseException,
    )

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConf), cfg))
    except MissingMandatoryValue as err:
        raise ConfigError(f"{_missing_key(err)} must be set (it has no default).") from None
    except OmegaConfBaseException as err:
        reason = str(getattr(err, "msg", err)).splitlines()[0]
        if isinstance(err, ConfigKeyError | ConfigAttributeError):
            raise ConfigError(_unknown_schema_key(str(err.full_key))) from None
        raise ConfigError(f"{err.full_key}: {reason}") from None


def _method(method: dict[str, Any]) -> tuple[str, str | None, dict[str, Any]]:
    """The method's name, class and constructor options (the node minus the entry's keys)."""
    name = _choice("method.name", method.get("name"), method_names())
    kwargs = {k: v for k, v in method.items() if k not in ENTRY_KEYS}
    return name, method.get("_target_"), kwargs


def _sparsity(sp: SparsityConf, method_name: str, pruning: bool) -> Sparsity:
    try:
        sparsity = Sparsity(ratio=sp.ratio, n=sp.n, m=sp.m)
    except ValueError as err:
        raise ConfigError(
            f"{err} Allowed: sparsity.ratio in [0, 1) for unstructured; N:M with 0 < N < M and "
            f"sparsity.ratio = N/M (sparsity=nm_2_4 or nm_4_8)."
        ) from None
    ratios = [sp.ratio] if sp.per_block is None else sp.per_block
    if sp.per_block is not None:
        if sparsity.structured:
            raise ConfigError(
                f"sparsity.per_block with N:M {sp.n}:{sp.m}: a per-block schedule is for "
                "unstructured sparsity only; set sparsity.per_block=null or sparsity=unstructured."
            )
        if not sp.per_block:
            raise ConfigError(
                "sparsity.per_block=[]: give one ratio per decoder block, or null (uniform "
                "sparsity.ratio)."
            )
        for i, ratio in enumerate(sp.per_block):
            if not 0.0 <= ratio < 1.0:
                raise ConfigError(
                    f"sparsity.per_block[{i}]={ratio}: each ratio must lie in [0, 1)."
                )
    if pruning and not any(ratios):
        baselines = [n for n in method_names() if method_entry(n).target is None]
        zero = "sparsity.ratio=0" if sp.per_block is None else "sparsity.per_block all 0"
        raise ConfigError(
            f"{zero} with method={method_name}: nothing to prune; use "
            f"method={' or method='.join(baselines)}."
        )
    return sparsity


def _allocator(sp: SparsityConf) -> AllocatorSettings:
    name = _choice("sparsity.allocator", sp.allocator, ALLOCATORS)
    if name == "owl":
        if sp.per_block is not None:
            raise ConfigError(
                "sparsity.allocator=owl with sparsity.per_block: OWL computes the per-block "
                "ratios itself; set sparsity.per_block=null."
            )
        if sp.lmbda < 0:
            raise ConfigError(f"sparsity.lmbda={sp.lmbda}: must be >= 0.")
        if sp.outlier_m <= 0:
            raise ConfigError(f"sparsity.outlier_m={sp.outlier_m}: must be > 0.")
    return AllocatorSettings(name, sp.lmbda, sp.outlier_m, sp.clamp)


def _calibration(c: CalibrationSettings) -> CalibrationSettings:
    _choice("calibration.source", c.source, SOURCES)
    _choice("calibration.sampling", c.sampling, SAMPLINGS)
    _positive_int("calibration.nsamples", c.nsamples)
    _positive_int("calibration.seqlen", c.seqlen, minimum=2)
    if c.source == "local" and not c.paths:
        raise ConfigError(
            "calibration.source=local needs calibration.paths=[file.txt, file.jsonl, ...]."
        )
    return c


def _perplexity(p: PerplexitySettings) -> PerplexitySettings:
    _choice("eval.perplexity.dataset", p.dataset, SOURCES)
    _positive_int("eval.perplexity.seqlen", p.seqlen, minimum=2)
    _positive_int("eval.perplexity.batch_size", p.batch_size)
    if p.max_windows is not None:
        _positive_int("eval.perplexity.max_windows", p.max_windows)
    if p.enabled and p.dataset == "local" and not p.paths:
        raise ConfigError(
            "eval.perplexity.dataset=local needs eval.perplexity.paths=[file.txt, ...]."
        )
    return p


def _zeroshot(z: ZeroshotSettings) -> ZeroshotSettings:
    if z.batch_size != "auto":
        _positive_int("eval.zeroshot.batch_size", z.batch_size)
    _positive_int("eval.zeroshot.cloze_items", z.cloze_items)
    if z.enabled and not z.tasks:
        raise ConfigError("eval.zeroshot.enabled=true needs eval.zeroshot.tasks=[...].")
    return z


def _check_offload_folder(spec: ModelSpec) -> None:
    """``model.offload_folder`` goes with a device map, and one with disk entries needs it."""
    if spec.offload_folder is not None and spec.device_map is None:
        raise ConfigError(
            f"model.offload_folder={spec.offload_folder!r} needs a model.device_map that places "
            "some modules on 'disk' (set model.offload_folder=null otherwise)."
        )
    placed = spec.device_map.values() if isinstance(spec.device_map, Mapping) else ()
    if "disk" in placed and spec.offload_folder is None:
        raise ConfigError(
            "model.device_map puts modules on 'disk': set model.offload_folder to a folder for "
            "accelerate's offloaded weights (the pruned ones of those modules are written there)."
        )


def _model(m: ModelConf) -> ModelSpec:
    spec = ModelSpec(
        kind=_choice("model.kind", m.kind, KINDS),
        name=str(m.name or m.kind),
        name_or_path=m.name_or_path,
        revision=m.revision,
        dtype=_choice("model.dtype", m.dtype, DTYPE_NAMES),
        device_map=(
            OmegaConf.to_container(m.device_map)
            if OmegaConf.is_config(m.device_map)
            else m.device_map
        ),
        offload_folder=m.offload_folder,
        onload=m.onload,
        trust_remote_code=m.trust_remote_code,
        tiny=dict(m.tiny),
    )
    if not isinstance(spec.onload, bool):
        raise ConfigError(f"model.onload={spec.onload!r}: allowed values are true, false.")
    if spec.onload and spec.device_map is not None:
        raise ConfigError(
            "model.onload=true keeps the weights on the CPU itself; it cannot be combined with "
            f"model.device_map={spec.device_map!r} (set model.device_map=null)."
        )
    _check_offload_folder(spec)
    if spec.kind == "hf" and not spec.name_or_path:
        raise ConfigError(
            "model.name_or_path is required with model.kind=hf (hub id or local directory)."
        )
    return spec


def _wandb(lg: LoggerConf) -> WandbSettings | None:
    if _choice("logger.name", lg.name, LOGGERS) != "wandb":
        return None
    return WandbSettings(
        project=lg.project,
        entity=lg.entity,
        group=lg.group,
        tags=list(lg.tags),
        name=lg.run_name,
        mode=_choice("logger.mode", lg.mode, WANDB_MODES),
    )


def validate(cfg: dict[str, Any]) -> RunSettings:
    """Check every value of a resolved config (a plain dict) and return typed settings."""
    conf = typed_config(cfg)
    name, target, kwargs = _method(conf.method)
    device = conf.device
    if not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise ConfigError(f"device={device!r}: allowed values are auto, cpu, cuda, cuda:N.")
    model = _model(conf.model)
    return RunSettings(
        model=model,
        method_name=name,
        method_target=target,
        method_kwargs=kwargs,
        sparsity=_sparsity(conf.sparsity, name, pruning=target is not None),
        sparsity_per_block=conf.sparsity.per_block,
        allocator=_allocator(conf.sparsity),
        calibration=_calibration(conf.calibration),
        perplexity=_perplexity(conf.eval.perplexity),
        zeroshot=_zeroshot(conf.eval.zeroshot),
        logger=conf.logger.name,
        wandb=_wandb(conf.logger),
        device=device,
        dtype=model.dtype,
        seed=conf.seed,
        batch_size=_auto_or_positive_int("batch_size", conf.batch_size),
        offload_inputs=conf.offload_inputs,
        save_model=conf.save_model,
        save_dtype=_choice("save_dtype", conf.save_dtype, ("original", *DTYPE_NAMES[1:])),
        push_to_hub=_push_target(conf.push_to_hub, conf.save_model),
        mask_images=list(conf.mask_images),
        progress=conf.progress,
        skip_finished=conf.skip_finished,
        overwrite=conf.overwrite,
    )


# Composition errors ------------------------------------------------------------------------------
_TYPE_HINTS = (
    ("converted to Integer", "must be an integer"),
    ("converted to Float", "must be a number"),
    ("not a valid bool", "must be true or false"),
    ("is not Optional", "must not be null"),
)


def _override_value(overrides: list[str], key: str) -> str | None:
    """The value the command line gives ``key`` (the last override of it, as Hydra applies)."""
    for item in reversed(overrides):
        name, _, value = item.partition("=")
        if name.lstrip("+~") == key:
            return value
    return None


def _keys_of(node_key: str, overrides: list[str], dropped: str) -> list[str]:
    """The keys of the node ``node_key`` ('' = the top level) composed without ``dropped``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig

    from gblm.paths import PROJECT_ROOT

    rest = [o for o in overrides if o.partition("=")[0].lstrip("+~") != dropped]
    try:
        with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=rest)
    except Exception:  # another override is bad too: list nothing rather than fail here
        return []
    node = OmegaConf.select(cfg, node_key) if node_key else cfg
    if not isinstance(node, DictConfig):
        return []
    return [k for k in node if not str(k).startswith("_") and k not in ENTRY_KEYS]


def _unknown_key_message(key: str, overrides: list[str]) -> str:
    parent = key.rpartition(".")[0]
    keys = _keys_of(parent, overrides, key)
    where = f"{parent}" if parent else "the top level of the config"
    listed = f": the keys of {where} are {', '.join(map(str, keys))}" if keys else ""
    return f"{key}: not a key of the config{listed}. Check its spelling."


def _parse_failure(overrides: list[str]) -> str | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for item in overrides:
        try:
            parser.parse_overrides([item])
        except Exception as err:
            reason = str(err).splitlines()[0]
            key = item.partition("=")[0].lstrip("+~")
            return f"{key}: the override {item!r} cannot be parsed ({reason})."
    return None


def composition_error_message(err: BaseException, overrides: list[str]) -> str:
    """One paragraph for an override that does not compose, naming the key and what is allowed."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    text = str(err)
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if isinstance(err, MissingConfigException) and missing:
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", text, flags=re.M)
        allowed = f": choose one of {', '.join(options)}" if options else ""
        return f"{group}={option} is not an option of {group}{allowed}."
    cause = err.__cause__
    key = getattr(cause, "full_key", None) if cause is not None else None
    if key and isinstance(cause, ConfigAttributeError | ConfigKeyError):
        return _unknown_key_message(str(key), overrides)
    if key:
        reason = str(getattr(cause, "msg", cause)).splitlines()[0]
        hint = next((h for needle, h in _TYPE_HINTS if needle in reason), reason)
        return f"{key}={_override_value(overrides, str(key))}: {hint} ({reason})."
    parsed = _parse_failure(overrides)
    return parsed or " ".join(text.split())
