"""The Python API: prune a model object and evaluate it, from a notebook or a script.

>>> import gblm
>>> result = gblm.prune(model, tokenizer, method="wanda", sparsity=0.5,
...                     calibration=texts, nsamples=32, seqlen=256)
>>> result.overall["sparsity"], gblm.evaluate(model, tokenizer, eval_texts, seqlen=256)

The pipeline's own pruning stages and perplexity, without the files, caches and loggers of a run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gblm import pipeline
from gblm.config import CalibrationSettings
from gblm.data.sources import STREAM_SEPARATOR
from gblm.methods.base import Pruner, RunContext
from gblm.methods.plans import PerBlockPlan, SparsityPlan, UniformPlan
from gblm.methods.registry import build_method, build_reconstruct, compose
from gblm.options import positive_int
from gblm.pruning.sparsity import Sparsity
from gblm.pruning.storage import PackedMasks
from gblm.utils import StageTimer

log = logging.getLogger("gblm.api")


@dataclass
class PruneResult:
    """What :func:`prune` did: the masks (True = pruned) and their statistics."""

    masks: PackedMasks  # full Linear name -> (d_out, d_in) bool mask, held as bits
    per_linear: list[dict] = field(default_factory=list)
    per_block: list[dict] = field(default_factory=list)
    overall: dict = field(default_factory=dict)  # e.g. overall["sparsity"]
    seconds: dict[str, float] = field(default_factory=dict)  # per stage


def as_sparsity_plan(sparsity: float | str | Sparsity | Sequence[float] | SparsityPlan):
    """A plan from ``0.5``, ``"2:4"``, a :class:`Sparsity`, per-block ratios or a plan."""
    if isinstance(sparsity, SparsityPlan):
        return sparsity
    if isinstance(sparsity, Sparsity):
        return UniformPlan(sparsity)
    if isinstance(sparsity, str):
        n, sep, m = sparsity.partition(":")
        if not sep or not (n.isdigit() and m.isdigit()):
            raise ValueError(f"sparsity={sparsity!r}: write N:M patterns as 'N:M', e.g. '2:4'.")
        if not 0 < int(n) < int(m):
            raise ValueError(f"sparsity={sparsity!r}: an N:M pattern needs 0 < N < M, e.g. '2:4'.")
        return UniformPlan(Sparsity(int(n) / int(m), int(n), int(m)))
    if isinstance(sparsity, (int, float)):
        return UniformPlan(Sparsity(float(sparsity)))
    return PerBlockPlan(Sparsity(0.0), [float(r) for r in sparsity])


def _check_token_ids(key: str, ids: Tensor, model: nn.Module) -> None:
    """Refuse ids the model's embedding has no row for (before they reach it: on a GPU such an
    index is a device-side assert that spoils the process's CUDA context)."""
    vocab = model.get_input_embeddings().num_embeddings
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"{key}: token ids must lie in [0, {vocab}) (the model's vocabulary); found "
            f"{int(ids.min())}..{int(ids.max())}."
        )


def prune(
    model: nn.Module,
    tokenizer: Any = None,
    *,
    method: str | Pruner = "gblm",
    sparsity: float | str | Sparsity | Sequence[float] | SparsityPlan = 0.5,
    calibration: Tensor | Sequence[str] | None = None,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    sampling: str = CalibrationSettings.sampling,
    separator: str = STREAM_SEPARATOR,
    device: str | torch.device | None = None,
    batch_size: int | str = "auto",
    progress: bool = True,
    options: Mapping[str, Any] | None = None,
    onload: bool = False,
    reconstruct: str = "none",
    reconstruct_options: Mapping[str, Any] | None = None,
) -> PruneResult:
    """Prune ``model`` in place with a registered method; returns the masks and statistics.

    Args:
        model: a causal LM (LLaMA, Mistral, Qwen2, OPT, ...), on the device it is to run on.
        tokenizer: its tokenizer; needed when ``calibration`` is text.
        method: a name from ``conf/method`` (``magnitude``, ``wanda``, ``sparsegpt``, ``gblm``,
            ...) or a method object.
        sparsity: a ratio (``0.5``), an N:M pattern (``"2:4"``), one ratio per decoder block, or a
            :class:`gblm.methods.plans.SparsityPlan`.
        calibration: texts (``nsamples`` windows of ``seqlen`` tokens are drawn with ``seed``) or
            (N, T) token ids; not needed by magnitude.
        sampling: how windows are drawn from texts, as ``calibration.sampling``: ``stream`` (a
            run's default) or ``documents`` (one document at a time, C4's published protocol).
        separator: what ``stream`` joins the texts with: ``"\n\n"``, or ``" "`` for WikiText-2
            train rows as ``calibration=wikitext2`` joins them (the published loaders).
        device: where each block is computed; default the device of the model's embeddings.
        batch_size: calibration windows per forward in the walk; ``auto`` is one, as published.
        progress: tqdm bars.
        options: the method's options, as in its yaml (``{"norm": "l2"}``); with a name only.
        onload: the model's weights stay where they are (e.g. the CPU) and each decoder block is
            moved to ``device`` for its work, GBLM's gradient stage included (block by block;
            the same masks as with the model on ``device``; ``docs/onload.md``).
        reconstruct: the weight update after each mask, a name from ``conf/reconstruct``
            (``none``, ``obs``, ``admm``), with ``reconstruct_options`` as in its yaml.

    Returns:
        :class:`PruneResult`.
    """
    name = method if isinstance(method, str) else type(method).__name__
    if isinstance(method, str):
        method = build_method(method, **dict(options or {}))
    elif options:
        raise ValueError("options: give them with a method name, not with a method object.")
    plan = as_sparsity_plan(sparsity)
    update = build_reconstruct(reconstruct, **dict(reconstruct_options or {}))
    method = compose(name, method, update, plan.sparsity)
    if method is None:
        raise ValueError(f"method={name} prunes nothing: choose a pruning method.")
    device = (
        torch.device(device) if device is not None else model.get_input_embeddings().weight.device
    )
    windows = calibration  # (N, T) token ids, or drawn from texts as the run draws them
    if not pipeline.needs_calibration(method, plan):
        windows = None
    elif calibration is None:
        raise ValueError(f"{type(method).__name__} needs calibration: texts or token ids.")
    elif isinstance(calibration, Tensor):
        if calibration.ndim != 2 or calibration.dtype != torch.long:
            raise ValueError("calibration: a tensor must be (N, T) int64 token ids.")
        _check_token_ids("calibration", calibration, model)
    elif tokenizer is None:
        raise ValueError("calibration texts need the tokenizer: prune(model, tokenizer, ...).")
    else:
        from gblm.data.calibration import sample_windows

        windows = sample_windows(
            tokenizer, list(calibration), nsamples, seqlen, seed, sampling, separator
        )
    pipeline.check_model(model, method, plan)
    context = RunContext(
        device=device,
        model_dtype=next(model.parameters()).dtype,
        progress=progress,
        onload=onload,
        batch_size=batch_size,
        method_calibrates=method.needs_calibration,
    )
    timer = StageTimer()
    masks = pipeline.prune(model, method, plan, windows, context, timer)
    stats = pipeline.mask_statistics(masks, plan)
    log.info(
        "pruned to %.4f sparsity in %.1f s", stats.overall["sparsity"], sum(timer.timings.values())
    )
    return PruneResult(masks, stats.per_linear, stats.per_block, stats.overall, timer.timings)


def evaluate(
    model: nn.Module,
    tokenizer: Any = None,
    data: Tensor | Sequence[str] | None = None,
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``data``: texts (joined with blank lines, as published) or
    (1, numel) token ids, cut into windows of ``seqlen`` tokens."""
    from gblm.data.sources import join_and_tokenize
    from gblm.devices import input_device
    from gblm.eval.perplexity import perplexity

    positive_int("seqlen", seqlen, minimum=2)
    positive_int("batch_size", batch_size)
    if max_windows is not None:
        positive_int("max_windows", max_windows)
    if data is None:
        raise ValueError("evaluate: give the evaluation texts or token ids as data.")
    if isinstance(data, Tensor):
        tokens = data.reshape(1, -1)
        _check_token_ids("data", tokens, model)
    else:
        if tokenizer is None:
            raise ValueError(
                "evaluation texts need the tokenizer: evaluate(model, tokenizer, ...)."
            )
        tokens = join_and_tokenize(tokenizer, list(data))
    device = input_device(model, device)
    return perplexity(model, tokens, seqlen, device=device, batch_size=batch_size,
                      max_windows=max_windows, progress=progress)  # fmt: skip
