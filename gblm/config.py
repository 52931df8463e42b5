"""The config schema, written once: every key, its type, its default and its checks.

:class:`RunConf` is stored in Hydra's ConfigStore as ``schema`` and heads the defaults list of
``conf/config.yaml``, so every group file merges onto a typed node (a value of the wrong type
fails at composition, naming its key). Each node's ``check`` refuses a value that is not allowed,
naming the key and the allowed values; :func:`validate` runs them all before anything loads.

``method`` and ``reconstruct`` are dicts, the plug-in class's keyword arguments, checked against
its declarations (:mod:`gblm.options`). ``sparsity`` holds the target, the ``allocator`` and
every allocator's options, typed from their declarations, so that a sweep over allocators with
shared options composes. Only :mod:`gblm.run` sees a ``DictConfig``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    InterpolationToMissingValueError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from gblm.data.sources import SAMPLINGS, SOURCES
from gblm.devices import DTYPE_NAMES
from gblm.errors import ConfigError
from gblm.methods import registry
from gblm.models.loading import KINDS, ModelSpec
from gblm.options import choice, positive_int
from gblm.pruning.sparsity import Sparsity

log = logging.getLogger("gblm")

#: The Linears whose masks are drawn by default (those of LLaMA-like models; others have none).
MASK_IMAGES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")


# The schema ---------------------------------------------------------------------------------------
@dataclass
class ModelConf(ModelSpec):
    """The ``model`` group: what to load (:class:`gblm.models.loading.ModelSpec`)."""

    name: str | None = II("model.name_or_path")  # a short name for run records
    kind: str = "hf"  # hf | smollm2 | tiny
    # kind=hf: a hub id or a local save_pretrained directory (required); null for the other kinds
    name_or_path: str | None = MISSING
    dtype: str = II("dtype")
    run_dir: str | None = None  # model=saved: the run dir whose model/ a run saved (required)

    def check(self) -> None:
        choice("model.kind", self.kind, KINDS)
        choice("model.dtype", self.dtype, DTYPE_NAMES)
        self.name = str(self.name or self.kind)
        if self.onload and self.device_map is not None:
            raise ConfigError(
                "model.onload=true keeps the weights on the CPU itself; it cannot be combined "
                f"with model.device_map={self.device_map!r} (set model.device_map=null)."
            )
        if self.offload_folder is not None and self.device_map is None:
            raise ConfigError(
                f"model.offload_folder={self.offload_folder!r} needs a model.device_map that "
                "places some modules on 'disk' (set model.offload_folder=null otherwise)."
            )
        placed = self.device_map.values() if isinstance(self.device_map, Mapping) else ()
        if "disk" in placed and self.offload_folder is None:
            raise ConfigError(
                "model.device_map puts modules on 'disk': set model.offload_folder to a folder "
                "for accelerate's offloaded weights (the pruned ones of those modules are "
                "written there)."
            )
        if self.kind == "hf" and not self.name_or_path:
            raise ConfigError("model.kind=hf needs model.name_or_path (a hub id or a folder).")


def _allocator_fields() -> list[tuple[str, Any, Any]]:
    """``(name, type, field)`` of every allocator's options, from the classes' declarations."""
    from hydra.utils import get_class

    fields: dict[str, tuple[str, Any, Any]] = {}
    for entry in registry.allocator_entries():
        hints = typing.get_type_hints(get_class(entry.target).__init__)
        for name, param in registry.allocator_options(entry).items():
            default = entry.options.get(name, None if param.required else param.default)
            kind = hints[name] if default is not None else hints[name] | None
            factory = (lambda d=default: list(d)) if isinstance(default, list) else None
            spec = field(default_factory=factory) if factory else field(default=default)
            fields.setdefault(name, (name, kind, spec))
    return list(fields.values())


@dataclass
class _SparsityBase:
    """The ``sparsity`` group: the target and who allocates it over the blocks."""

    allocator: str = "uniform"  # a registered allocator: conf/sparsity/*.yaml with a _target_
    _target_: str | None = None  # the allocator's class, as its file names it
    ratio: float = 0.5  # unstructured: the share of pruned weights; N:M: N/M
    n: int = 0  # N:M: N of every M consecutive weights of a row are pruned (0: unstructured)
    m: int = 0

    def target(self) -> Sparsity:
        """The run's target, or the refusal naming the allowed forms."""
        try:
            return Sparsity(ratio=self.ratio, n=self.n, m=self.m)
        except ValueError as err:
            raise ConfigError(
                f"{err} Allowed: sparsity.ratio in [0, 1) for unstructured; N:M with 0 < N < M "
                "and sparsity.ratio = N/M (sparsity=nm_2_4 or nm_4_8)."
            ) from None

    def options(self) -> dict[str, Any]:
        """The chosen allocator's options (:meth:`check` checks them)."""
        mine = registry.allocator_options(registry.allocator_entry(self.allocator))
        return {k: getattr(self, k) for k in mine}

    def check(self) -> None:
        """The target, the allocator and its options. Another allocator's option is refused where
        it has no default (``per_block``), else warned about and ignored (a sweep over allocators
        may share one: ``lmbda``)."""
        self.target()
        choice("sparsity.allocator", self.allocator, registry.allocator_names())
        chosen = registry.allocator_entry(self.allocator)
        mine = registry.allocator_options(chosen)
        for entry in registry.allocator_entries():
            for name, param in registry.allocator_options(entry).items():
                value, default = getattr(self, name), entry.options.get(name, param.default)
                if name in mine or value == default:
                    continue
                if param.required or param.default is None:
                    raise ConfigError(
                        f"sparsity.{name} is an option of sparsity.allocator={entry.name}, not of "
                        f"{self.allocator}: add sparsity={entry.name} (or sparsity.allocator="
                        f"{entry.name})."
                    )
                log.warning(
                    "sparsity.%s=%r is an option of sparsity.allocator=%s, not of %s: ignored",
                    name, value, entry.name, self.allocator,
                )  # fmt: skip
        registry.check_options("sparsity", chosen.target, self.options(), registry.ALLOCATOR_INPUTS)


SparsityConf = dataclasses.make_dataclass(
    "SparsityConf", _allocator_fields(), bases=(_SparsityBase,)
)


@dataclass
class CalibrationSettings:
    """The ``calibration`` group."""

    source: str = "austen"  # austen | kjv | wikitext2 | c4 | local
    paths: list[str] | None = None  # local files, or an offline copy of the source
    split: str = "train"
    sampling: str = "stream"  # stream | documents (one document at a time, as published for C4)
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def check(self) -> None:
        choice("calibration.source", self.source, SOURCES)
        choice("calibration.sampling", self.sampling, SAMPLINGS)
        positive_int("calibration.nsamples", self.nsamples)
        positive_int("calibration.seqlen", self.seqlen, minimum=2)
        if self.source == "local" and not self.paths:
            raise ConfigError(
                "calibration.source=local needs calibration.paths=[file.txt, file.jsonl, ...]."
            )


@dataclass
class PerplexitySettings:
    """``eval.perplexity``."""

    enabled: bool = True
    dataset: str = "austen"
    split: str = "test"
    paths: list[str] | None = None
    seqlen: int = II("calibration.seqlen")
    batch_size: int = 1
    max_windows: int | None = None  # None: every window, as published
    dense: bool = True  # also evaluate the dense model first

    def check(self) -> None:
        choice("eval.perplexity.dataset", self.dataset, SOURCES)
        positive_int("eval.perplexity.seqlen", self.seqlen, minimum=2)
        positive_int("eval.perplexity.batch_size", self.batch_size)
        if self.max_windows is not None:
            positive_int("eval.perplexity.max_windows", self.max_windows)
        if self.enabled and self.dataset == "local" and not self.paths:
            raise ConfigError(
                "eval.perplexity.dataset=local needs eval.perplexity.paths=[file.txt, ...]."
            )


@dataclass
class ZeroshotSettings:
    """``eval.zeroshot``."""

    enabled: bool = False
    # a local multiple-choice task built from Persuasion (gblm/eval/cloze.py)
    tasks: list[str] = field(default_factory=lambda: ["austen_cloze"])
    # typed Any here (and batch_size at the top): check()'s refusal names the allowed values
    limit: Any = None  # null | an integer >= 1 | a fraction in (0, 1)
    batch_size: Any = 8  # an integer, or auto
    include_path: str | None = None  # a folder of extra lm-eval task YAMLs
    cloze_items: int = 100
    log_samples: bool = False  # keep lm-eval's per-item log in the run dir

    def check(self) -> None:
        positive_int("eval.zeroshot.batch_size", self.batch_size, auto=True)
        positive_int("eval.zeroshot.cloze_items", self.cloze_items)
        limit = self.limit  # as lm-eval reads it: below 1, a share of each task's items
        whole = type(limit) in (int, float) and limit >= 1 and float(limit).is_integer()
        if limit is not None and not (whole or type(limit) is float and 0 < limit < 1):
            raise ConfigError(
                f"eval.zeroshot.limit={limit!r}: allowed values are null (every item), an integer "
                ">= 1 (items per task) or a fraction in (0, 1) (that share of each task's items)."
            )
        if self.enabled and not self.tasks:
            raise ConfigError("eval.zeroshot.enabled=true needs eval.zeroshot.tasks=[...].")


@dataclass
class EvalConf:
    """The ``eval`` group."""

    perplexity: PerplexitySettings = field(default_factory=PerplexitySettings)
    zeroshot: ZeroshotSettings = field(default_factory=ZeroshotSettings)


@dataclass
class LoggerConf:
    """The ``logger`` group: local files only, or Weights & Biases after them (its keys with
    ``name=local`` are warned about and ignored: a machine's own config may hold them)."""

    name: str = "local"  # local | wandb
    project: str = "gblm"
    entity: str | None = None
    group: str | None = None  # None: the sweep directory's name
    tags: list[str] = field(default_factory=list)
    run_name: str | None = None  # None: method_sparsity_model
    mode: str = "auto"  # auto (online when logged in, else offline) | online | offline | disabled

    def check(self) -> None:
        choice("logger.name", self.name, ("local", "wandb"))
        choice("logger.mode", self.mode, ("auto", "online", "offline", "disabled"))
        default = vars(LoggerConf())
        unused = [f"logger.{k}={v!r}" for k, v in vars(self).items() if v != default[k]]
        if self.name == "local" and unused:
            log.warning("%s: W&B settings, ignored with logger=local", ", ".join(unused))


@dataclass
class RunConf:
    """The whole run config: the groups and the top-level keys."""

    model: ModelConf = field(default_factory=ModelConf)
    method: dict[str, Any] = field(default_factory=dict)  # untyped: the method class checks it
    reconstruct: dict[str, Any] = field(default_factory=dict)  # the same, for the weight update
    sparsity: SparsityConf = field(default_factory=SparsityConf)  # type: ignore[valid-type]
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    eval: EvalConf = field(default_factory=EvalConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    seed: int = 0  # torch's seed, set before the model loads (the windows have calibration.seed)
    device: str = "auto"  # auto (first CUDA device, else CPU) | cpu | cuda | cuda:N
    # model dtype: auto (float16 on CUDA as published, float32 on CPU) | float32 | float16 | bfloat16
    dtype: str = "auto"
    # calibration windows per forward in the layer walk: auto (one, as published) | an integer
    # (faster on a CPU, but a batched product may change the last bits of some shapes)
    batch_size: Any = "auto"
    offload_inputs: bool = False  # keep the walk's (N, T, hidden) block inputs on the CPU
    save_model: bool = False  # save_pretrained the pruned model with its masks into the run dir
    # dtype of the saved weights: original (the checkpoint's) | float32 | float16 | bfloat16
    save_dtype: str = "original"
    push_to_hub: str | None = None  # a hub repo id: upload the saved model there (save_model=true)
    # PNG images of these Linears' masks (names of the model's prunable Linears)
    mask_images: list[str] = field(default_factory=lambda: list(MASK_IMAGES))
    progress: bool = True  # progress bars while the model runs
    skip_finished: bool = True  # a run dir finished with the same config is not redone
    overwrite: bool = False  # replace a run dir's finished run of another config (else refused)

    @property
    def method_name(self) -> str:
        return self.method.get("name")

    @property
    def method_options(self) -> dict[str, Any]:
        """The method node less the registry's keys: the class's keyword arguments."""
        return {k: v for k, v in self.method.items() if k not in registry.ENTRY_KEYS}

    @property
    def reconstruct_name(self) -> str:
        return self.reconstruct.get("name") or "none"

    def check(self) -> None:
        """Every node's checks, then those across nodes."""
        self.model.check()
        self.calibration.check()
        self.eval.perplexity.check()
        self.eval.zeroshot.check()
        self.logger.check()
        self.sparsity.check()
        choice("method.name", self.method_name, registry.method_names())
        target = self.method.get("_target_") or registry.method_entry(self.method_name).target
        if target is not None:
            registry.check_options("method", target, self.method_options)
        choice("reconstruct.name", self.reconstruct_name, registry.reconstruct_names())
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(
                f"device={self.device!r}: allowed values are auto, cpu, cuda, cuda:N."
            )
        if not -(2**63) <= self.seed < 2**64:  # torch.manual_seed's range
            raise ConfigError(f"seed={self.seed}: allowed values are integers in [-2**63, 2**64).")
        positive_int("batch_size", self.batch_size, auto=True)
        choice("save_dtype", self.save_dtype, ("original", *DTYPE_NAMES[1:]))
        for key, default in (("save_dtype", "original"), ("push_to_hub", None)):
            value = getattr(self, key)
            if value != default and not self.save_model:
                raise ConfigError(f"{key}={value!r} needs save_model=true (the saved model's).")
        repo = self.push_to_hub
        if repo is not None and (repo.count("/") != 1 or " " in repo):
            raise ConfigError(f"push_to_hub={repo!r}: give a hub repo id as owner/name.")


def _require(value: Any, key: str) -> Any:
    """``${gblm.require:${a.b},a.b}``: the value of ``a.b``, which an option needs set (``???``
    in a group file never replaces a schema default in a merge)."""
    if value is None or value == "":
        raise ConfigError(f"{key} must be set (it has no default)")
    return value


def _named(overrides: str) -> str:
    """``${gblm.named:${hydra.job.override_dirname}}``: ``_<overrides>`` after a run folder's
    time, or nothing for a run without any (``experiment=demo`` alone names no folder)."""
    return f"_{overrides}" if overrides else ""


ConfigStore.instance().store(name="schema", node=RunConf)  # heads conf/config.yaml's defaults
OmegaConf.register_new_resolver("gblm.require", _require, replace=True)
OmegaConf.register_new_resolver("gblm.named", _named, replace=True)


# From a composed config to checked values ---------------------------------------------------------
def _missing_key(err: Exception) -> str:
    found = re.search(r"Missing mandatory value: ([\w.\[\]]+)", str(getattr(err, "msg", err)))
    return found.group(1) if found else str(err.full_key)


def to_plain(cfg: Any) -> dict[str, Any]:
    """A resolved plain dict of a DictConfig; a missing mandatory value (``???``) is a ConfigError."""
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
        cause: BaseException | None = err  # the ConfigError a resolver raised, wrapped
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise ConfigError(f"{str(cause)[:-1]}; {err.full_key} refers to it).") from None
    plain.pop("hydra", None)
    return plain


def unknown_key_message(key: str, parent: Any) -> str:
    """The refusal of ``key``, no key of the config, naming the keys of its ``parent`` node (a
    mapping; a plug-in's registry keys, ``name``, ``_target_`` and ``order``, left out)."""
    where = key.rpartition(".")[0]
    hidden = registry.ENTRY_KEYS if where in ("method", "reconstruct") else ()
    names = parent if isinstance(parent, Mapping) else ()
    keys = [str(k) for k in names if not str(k).startswith("_") and k not in hidden]
    listed = f": the keys of {where or 'the top level'} are {', '.join(keys)}" if keys else ""
    return f"{key}: not a key of the config{listed}. Check its spelling."


def validate(cfg: dict[str, Any]) -> RunConf:
    """``cfg`` merged onto the schema and checked: defaults filled in, every value of its type
    and allowed; raises ConfigError naming the key otherwise."""
    try:
        conf = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConf), cfg))
    except MissingMandatoryValue as err:
        raise ConfigError(f"{_missing_key(err)} must be set (it has no default).") from None
    except OmegaConfBaseException as err:
        reason = str(getattr(err, "msg", err)).splitlines()[0]
        if isinstance(err, ConfigKeyError | ConfigAttributeError):
            key = str(err.full_key)
            schema = OmegaConf.select(OmegaConf.structured(RunConf), key.rpartition(".")[0])
            raise ConfigError(unknown_key_message(key, schema)) from None
        raise ConfigError(f"{err.full_key}: {reason}") from None
    conf.check()
    return conf


def build_method(conf: RunConf):
    """The configured method (None for the dense baseline) with its weight update; an option
    refused by its declaration, or a method and update that do not compose, are a ConfigError."""
    method = registry.build_method(
        conf.method_name, conf.method.get("_target_"), **conf.method_options
    )
    options = {k: v for k, v in conf.reconstruct.items() if k not in registry.ENTRY_KEYS}
    update = registry.build_reconstruct(conf.reconstruct_name, **options)
    return registry.compose(conf.method_name, method, update, conf.sparsity.target())


def build_plan(conf: RunConf):
    """The configured sparsity plan; refuses a plan that prunes nothing for a pruning method."""
    sp = conf.sparsity
    plan = registry.build_allocator(sp.allocator, sp.target(), **sp.options())
    pruning = registry.method_entry(conf.method_name).target is not None
    if pruning and not any(plan.block_targets() or [sp.ratio]):
        baselines = [n for n in registry.method_names() if registry.method_entry(n).target is None]
        raise ConfigError(
            f"sparsity {plan.block_targets() or sp.ratio} with method={conf.method_name}: nothing "
            f"to prune; use method={' or method='.join(baselines)}."
        )
    return plan
