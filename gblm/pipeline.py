"""One pruning run, stage by stage: the path that ``python -m gblm``, ``gblm.prune`` and the
benchmarks share.

    inputs          checks that need no weights, the texts and the tokenizer   (:func:`inputs`)
    load model      the model in its dtype on its device                       (:func:`execute`)
    calibration windows                    (N, T) token ids, cached by content
    perplexity dense
    <plan pass>     the plan's pass over the dense model (OWL's outlier ratios)   (:func:`prune`)
    <method pass>   the method's pass over the dense model (GBLM's gradients)
    prune           the layer walk: per block, statistics -> per Linear: score -> mask -> zero
                    (-> the weight update of the kept weights, ``reconstruct=...``)
    mask statistics
    perplexity pruned
    zero-shot       lm-eval on the live model
    save model

Which of them a run needs is decided once, by :func:`planned_stages` (the progress estimate,
:class:`gblm.utils.OverallEstimate`, weighs the same list); each is timed under its name by a
:class:`gblm.utils.StageTimer`, and fills the typed :class:`Result`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gblm import devices
from gblm.config import MASK_IMAGES, RunConf
from gblm.errors import ConfigError, OutputError
from gblm.methods.base import Pruner, RunContext
from gblm.methods.plans import SparsityPlan
from gblm.models import loading
from gblm.models.layers import decoder_layers
from gblm.names import block_index, in_block_name
from gblm.paths import cache_dir, configure_offline
from gblm.pruning.storage import PackedMasks
from gblm.utils import StageTimer, content_hash, file_digest, writable_dir

log = logging.getLogger("gblm")

PRUNE = "prune"
#: Work per zero-shot item in forward-pass tokens: 4 choices x a ~160-token passage, which lm-eval
#: scores at about 0.6 of a perplexity pass's time per token (measured on the demo).
ZEROSHOT_TOKENS_PER_ITEM = 400
ZEROSHOT = "zero-shot"
SAVED_MODEL = "model"  # save_model=true writes <run dir>/model


def perplexity_stage(tag: str) -> str:
    return f"perplexity {tag}"


@dataclass
class MaskStats:
    """The masks' statistics (:func:`gblm.analysis.stats.model_mask_stats`)."""

    per_linear: list[dict]
    per_block: list[dict]
    per_type: list[dict]
    overall: dict


@dataclass
class Result:
    """What a run produced; each field is filled by the stage that makes it."""

    device: str = ""
    dtype: str = ""
    ppl: dict[str, float] = field(default_factory=dict)
    eval_tokens: int | None = None
    masks: PackedMasks | None = None
    mask_stats: MaskStats | None = None
    plan: dict[str, Any] = field(default_factory=dict)  # SparsityPlan.record()
    sparsity_check: dict | None = None  # the zeros found in the weights
    zeroshot: dict | None = None
    saved_model: str | None = None
    saved_dtype: str | None = None
    pushed_to: str | None = None
    push_to_hub_error: str | None = None
    peak_memory_bytes: int | None = None
    reconstruct_seconds: float | None = None  # the weight update's share of the prune stage


def needs_calibration(method: Pruner | None, plan: SparsityPlan) -> bool:
    """Whether the method (or its weight update) or the plan runs the model on calibration."""
    return method is not None and (method.walk_calibrates or plan.needs_calibration)


def _documents(conf: RunConf, method: Pruner | None, plan: SparsityPlan) -> dict[str, tuple]:
    """The documents the run reads, by use: ``(source, split, paths, key naming the source)``."""
    c, p = conf.calibration, conf.eval.perplexity
    used: dict[str, tuple] = {}
    if needs_calibration(method, plan):
        used["calibration"] = (c.source, c.split, c.paths, "calibration.source")
    if p.enabled:
        used["eval"] = (p.dataset, p.split, p.paths, "eval.perplexity.dataset")
    return used


def planned_stages(conf: RunConf, method: Pruner | None, plan: SparsityPlan) -> dict[str, float]:
    """The stages of this run that push tokens through the model, in order, each with its work
    in forward-pass tokens: a perplexity pass its windows x T (all windows: weighed as 64); the
    walk and the plan's dense walk 2 x N x T (the capture and the re-forward of every block); the
    method's dense pass (GBLM's gradients; a backward is about two forwards) 3 x N x T; zero-shot
    its items x :data:`ZEROSHOT_TOKENS_PER_ITEM`. Everything else weighs nothing.
    """
    c, p = conf.calibration, conf.eval.perplexity
    calibration = c.nsamples * c.seqlen if needs_calibration(method, plan) else 0
    evaluation = (p.max_windows or 64) * p.seqlen
    stages: dict[str, float] = {}
    if p.enabled and (p.dense or method is None):
        stages[perplexity_stage("dense")] = evaluation
    if method is not None:
        for stage, passes in ((plan, 2), (method, 3)):
            if stage.dense_pass and calibration:
                stages[stage.dense_pass] = passes * calibration
        if calibration:
            stages[PRUNE] = 2 * calibration
        if p.enabled:
            stages[perplexity_stage("pruned")] = evaluation
    if conf.eval.zeroshot.enabled:
        stages[ZEROSHOT] = conf.eval.zeroshot.cloze_items * ZEROSHOT_TOKENS_PER_ITEM
    return stages


# Inputs: everything that needs no weights -------------------------------------------------------
@dataclass
class Inputs:
    """What :func:`inputs` checked and loaded: texts by use, the tokenizer, device and dtype."""

    texts: dict[str, list[str]]
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype


def inputs(
    conf: RunConf,
    method: Pruner | None,
    plan: SparsityPlan,
    timer: StageTimer | None = None,
    check_device: bool = True,
) -> Inputs:
    """Every check that needs no weights, cheapest first (the model's files and context length,
    the device, the task names, the data files, the tokenizer, enough tokens in the texts);
    raises :class:`gblm.errors.UserError`. A sweep's preflight skips the device check (the
    launching machine may lack the jobs' GPUs).
    """
    from gblm.analysis.plots import check_mask_images
    from gblm.data import checks
    from gblm.data.sources import load_documents

    timer = timer or StageTimer()
    c, p, z = conf.calibration, conf.eval.perplexity, conf.eval.zeroshot
    loading.check_model_available(conf.model)
    if conf.mask_images and conf.mask_images != list(MASK_IMAGES):  # the default draws nothing
        check_mask_images(conf.mask_images, conf.model)  # on a model without those Linears
    device, dtype = torch.device("cpu"), torch.float32
    if check_device:
        try:
            device = devices.resolve_device(conf.device)
            dtype = devices.resolve_dtype(conf.model.dtype, device)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(str(err)) from None
    calibrating = needs_calibration(method, plan)
    seqlens = {"calibration.seqlen": c.seqlen} if calibrating else {}
    seqlens.update({"eval.perplexity.seqlen": p.seqlen} if p.enabled else {})
    checks.check_context(loading.max_positions(conf.model), seqlens)
    if method is not None:  # the plan against the model's block count, from its config
        try:
            plan.check_config(loading.block_count(conf.model), method.needs_calibration)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if conf.model.offload_folder is not None:
        writable_dir(conf.model.offload_folder, "model.offload_folder")
    if z.enabled:
        from gblm.eval.zeroshot import validate_task_names

        try:
            validate_task_names(z.tasks, z.include_path)
        except ValueError as err:
            raise ConfigError(str(err)) from None  # the message names the key
    configure_offline()
    with timer.stage("load data"):  # an unavailable dataset fails before the model loads
        texts = {use: load_documents(*doc) for use, doc in _documents(conf, method, plan).items()}
    with timer.stage("load tokenizer"):
        tokenizer = loading.load_tokenizer(conf.model)
    if calibrating:
        checks.check_calibration_text(tokenizer, texts["calibration"], c)
    if p.enabled:
        checks.check_eval_text(tokenizer, texts["eval"], p)
    return Inputs(texts=texts, tokenizer=tokenizer, device=device, dtype=dtype)


# Inputs fingerprinted since runs were recorded without them: such a record compares the rest.
LATER_FINGERPRINTS = ("tokenizer", "model code", "device and dtype", "zero-shot tasks")


def model_fingerprints(spec: loading.ModelSpec) -> dict[str, str]:
    """The fingerprints of the model's weights, its tokenizer's files and its own (remote) code."""
    found = {"model": loading.files_fingerprint(spec),
             "tokenizer": loading.files_fingerprint(spec, loading.TOKENIZER_FILES)}  # fmt: skip
    if spec.trust_remote_code:  # the model's architecture is its own code
        found["model code"] = loading.code_fingerprint(spec)
    return found


def fingerprints(conf: RunConf, method: Pruner | None, plan: SparsityPlan) -> dict[str, str]:
    """The content fingerprints of the model's and its tokenizer's files, the device and dtype
    ``auto`` gives here, where the run uses them the calibration and evaluation documents (memoised
    per file), how lm-eval is asked and the files of ``eval.zeroshot.include_path``: its identity."""
    from gblm.data.calibration import source_fingerprint
    from gblm.data.sources import STREAM_SEPARATOR, calibration_separator

    memo = cache_dir() / "fingerprints"
    found = model_fingerprints(conf.model)
    found["device and dtype"] = devices.resolved(conf.device, conf.model.dtype)
    for use, (source, split, paths, key) in _documents(conf, method, plan).items():
        found[use] = source_fingerprint(source, split, paths, memo, key=key)
    separator = calibration_separator(conf.calibration.source)
    if "calibration" in found and separator != STREAM_SEPARATOR:  # the windows follow it
        found["calibration"] += f" joined by {separator!r}"
    if (z := conf.eval.zeroshot).enabled:
        from gblm.eval.zeroshot import REQUESTS

        found["zero-shot"] = content_hash(REQUESTS, length=16)
        if z.include_path:  # the user's task YAMLs and whatever lies beside them
            folder = Path(z.include_path).expanduser()
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            tasks = {str(p.relative_to(folder)): file_digest(p, memo) for p in files}
            found["zero-shot tasks"] = "files:" + content_hash(tasks, length=32)
    return found


# The pruning stages, shared with the API -----------------------------------------------------------
def check_model(model: nn.Module, method: Pruner, plan: SparsityPlan) -> None:
    """The plan's check of the loaded model; a ConfigError names the problem."""
    try:
        plan.check_config(len(decoder_layers(model)), method.needs_calibration)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def prune(
    model: nn.Module,
    method: Pruner,
    plan: SparsityPlan,
    windows: Tensor | None,
    context: RunContext,
    timer: StageTimer,
    offload_inputs: bool = False,
) -> PackedMasks:
    """The plan's and the method's passes over the dense model, then the layer walk; the masks."""
    from gblm.calibration.sequential import prune_model

    for stage in (plan, method):  # a pass over the dense model is a stage of its own
        with timer.stage(stage.dense_pass) if stage.dense_pass else contextlib.nullcontext():
            stage.prepare(model, windows, context)
    try:
        with timer.stage(PRUNE):
            return prune_model(
                model, method, plan, windows if method.walk_calibrates else None,
                device=context.device, batch_size=context.batch_size, progress=context.progress,
                offload_inputs=offload_inputs, onload=context.onload,
            )  # fmt: skip
    finally:
        method.release()


def mask_statistics(masks: PackedMasks, plan: SparsityPlan) -> MaskStats:
    """Every mask's statistics, each Linear checked against its own target's N:M."""
    from gblm.analysis.stats import model_mask_stats

    targets = {name: plan.target(block_index(name), in_block_name(name)) for name in masks}
    n_of = {name: t.n for name, t in targets.items()}
    m = next((t.m for t in targets.values() if t.structured), 0)
    return MaskStats(*model_mask_stats(masks, 0, m, n_of))


# The whole run --------------------------------------------------------------------------------------
def calibration_windows(
    conf: RunConf, tokenizer: Any, texts: list[str], timer: StageTimer
) -> Tensor:
    """The (N, T) calibration windows, from the cache when the same ones were drawn before."""
    from gblm.data import calibration as cal
    from gblm.data.sources import calibration_separator

    c = conf.calibration
    separator = calibration_separator(c.source)
    with timer.stage("calibration windows"):
        key = cal.windows_cache_key(
            tokenizer_id=cal.tokenizer_digest(tokenizer), vocab_size=len(tokenizer),
            documents_sha256=cal.documents_digest(texts), nsamples=c.nsamples, seqlen=c.seqlen,
            seed=c.seed, sampling=c.sampling, separator=separator,
        )  # fmt: skip
        return cal.cached_windows(
            cache_dir(),
            key,
            lambda: cal.sample_windows(
                tokenizer, texts, c.nsamples, c.seqlen, c.seed, c.sampling, separator
            ),
        )


def execute(
    conf: RunConf,
    method: Pruner | None,
    plan: SparsityPlan,
    given: Inputs,
    timer: StageTimer,
    out_dir: Path,
    on_update: Callable[[Result], Mapping[str, Any]] = lambda result: {},
) -> Result:
    """Load the model, then run every stage :func:`planned_stages` names; returns the result.

    ``out_dir`` receives lm-eval's output and the saved model; ``on_update`` sees the result after
    each stage that adds to it, and returns the run's record as it then stands (saved with the
    model).
    """
    device, dtype = given.device, given.dtype
    result = Result(device=str(device), dtype=devices.dtype_name(dtype))
    devices.reset_peak_memory(device)
    torch.manual_seed(conf.seed)
    with timer.stage("load model"):
        model = loading.load_model(conf.model, device, dtype, given.tokenizer)
    log.info("model %s: %s, %.1fM parameters, %s on %s", conf.model.name, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, result.dtype, device)  # fmt: skip
    if method is not None:  # before any evaluation
        check_model(model, method, plan)
    stages = planned_stages(conf, method, plan)
    tokens: list[Tensor] = []  # the evaluation text, tokenized at its first use

    def evaluate(tag: str) -> None:
        from gblm.data.sources import join_and_tokenize
        from gblm.eval.perplexity import perplexity

        p = conf.eval.perplexity
        if not tokens:
            with timer.stage("tokenize eval"):
                tokens.append(join_and_tokenize(given.tokenizer, given.texts["eval"]))
            result.eval_tokens = int(tokens[0].numel())
        with timer.stage(perplexity_stage(tag)):
            result.ppl[tag] = perplexity(
                model, tokens[0], p.seqlen, device=devices.input_device(model, device),
                batch_size=p.batch_size, max_windows=p.max_windows, progress=conf.progress,
                desc=f"perplexity ({tag})",
            )  # fmt: skip
        log.info("perplexity %s: %.3f", tag, result.ppl[tag])

    if method is not None:  # the windows first: then the time estimate knows what is cached
        windows = None
        if needs_calibration(method, plan):
            windows = calibration_windows(conf, given.tokenizer, given.texts["calibration"], timer)
        context = RunContext(
            device=device,
            model_dtype=dtype,
            model_id=conf.model.model_id,
            cache_dir=cache_dir(),
            progress=conf.progress,
            fingerprint=lambda: (
                loading.files_fingerprint(conf.model) + loading.code_fingerprint(conf.model)
            ),
            onload=conf.model.onload,
            batch_size=conf.batch_size,
            method_calibrates=method.needs_calibration,
        )
        if method.dense_pass and method.dense_pass_cached(windows, context):
            timer.note("cached", method.dense_pass)
    if perplexity_stage("dense") in stages:
        evaluate("dense")
        on_update(result)
    if method is not None:
        result.masks = prune(model, method, plan, windows, context, timer, conf.offload_inputs)
        result.plan = plan.record()  # a plan computed from the dense model knows it only now
        result.reconstruct_seconds = method.update.seconds if method.update else None
        with timer.stage("mask statistics"):
            from gblm.models.zeros import weight_zero_share

            result.mask_stats = mask_statistics(result.masks, plan)
            result.sparsity_check = weight_zero_share(model, list(result.masks))
        if perplexity_stage("pruned") in stages:
            evaluate("pruned")
        on_update(result)
    if ZEROSHOT in stages:
        _zeroshot(conf, model, given, result, timer, out_dir)
        on_update(result)
    if conf.save_model:
        _save(conf, model, given.tokenizer, result, timer, out_dir, on_update(result))
    result.peak_memory_bytes = devices.peak_memory_bytes(device)
    return result


def _zeroshot(conf: RunConf, model, given: Inputs, result: Result, timer, out_dir: Path) -> None:
    """lm-eval on the live model; its results JSON (and per-item log) kept in ``out_dir``."""
    from gblm.eval.zeroshot import zeroshot_eval

    z = conf.eval.zeroshot
    include_path = z.include_path
    if include_path is None and "austen_cloze" in z.tasks:  # the local task, exported with data
        from gblm.eval.cloze import ensure_austen_cloze_task, export_task

        built = ensure_austen_cloze_task(n_items=z.cloze_items)
        include_path = str(export_task(built, out_dir / "lm_eval_tasks"))
    with timer.stage(ZEROSHOT):
        result.zeroshot = zeroshot_eval(
            model, given.tokenizer, z.tasks, limit=z.limit, batch_size=z.batch_size,
            include_path=include_path, results_dir=out_dir, log_samples=z.log_samples,
        )  # fmt: skip


def _save(conf: RunConf, model, tokenizer, result: Result, timer, out_dir: Path, record) -> None:
    """The pruned model into ``<out_dir>/model`` in ``save_dtype``; then to the hub if asked (a
    failed push is kept in the result: the saved model and the numbers stay)."""
    from gblm.models.saving import HubPushError, push_saved_model, save_pruned_model

    if conf.save_dtype == "original":  # the checkpoint's dtype, as the loader recorded it
        dtype = getattr(model, "gblm_source_dtype", None)
    else:
        dtype = devices.resolve_dtype(conf.save_dtype, torch.device("cpu"))
    p = conf.eval.perplexity
    card = {"base_model": conf.model.hub_id, "evaluation": {"dataset": p.dataset, "split": p.split,
            "seqlen": p.seqlen, "max_windows": p.max_windows}}  # fmt: skip
    record = {**record, "status": "finished"}  # saving is the last stage: every number is final
    with timer.stage("save model"):
        try:
            saved = save_pruned_model(
                model, tokenizer, result.masks or {}, out_dir / SAVED_MODEL, record, dtype, card
            )
        except OSError as err:  # nothing half-written is left (an atomic folder write)
            raise OutputError(
                f"save_model=true: the pruned model could not be written to {out_dir / SAVED_MODEL} "
                f"({err.strerror or err}); the run's numbers are kept in metrics.json. Free "
                "space (or choose another run dir) and relaunch, or set save_model=false."
            ) from None
    result.saved_model = str(saved)
    result.saved_dtype = devices.dtype_name(dtype or next(model.parameters()).dtype)
    if conf.push_to_hub:
        try:
            with timer.stage("push to hub"):
                result.pushed_to = push_saved_model(saved, conf.push_to_hub)
        except HubPushError as err:
            log.warning("%s", err)
            result.push_to_hub_error = str(err)
