"""Zero-shot accuracy through lm-evaluation-harness, on the live (pruned) model.

The model object is handed to lm-eval's Hugging Face wrapper (``HFLM(pretrained=model)``), so
what is scored is exactly the model in memory: no fork of the harness, no save and reload. Every
task is scored 0-shot by log-likelihood of each choice; ``acc`` picks the choice with the highest
summed log-likelihood and ``acc_norm`` the highest per-byte log-likelihood (lm-eval's
definitions). Local tasks (``austen_cloze``, see :mod:`gblm.eval.cloze`) come in through
``include_path``.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gblm.devices import input_device
from gblm.errors import ConfigError

log = logging.getLogger(__name__)

# The GBLM-Pruner / Wanda zero-shot suite.
DEFAULT_TASKS = (
    "boolq",
    "rte",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)
TASKS_KEY = "eval.zeroshot.tasks"  # the config key named in error messages


def _task_manager(include_path: str | os.PathLike | Sequence[str | os.PathLike] | None, tasks):
    """A TaskManager that knows ``tasks``; the built-in index (~10 s to build) only if needed."""
    from lm_eval.tasks import TaskManager

    paths = None
    if include_path is not None:
        paths = (
            [str(p) for p in include_path]
            if not isinstance(include_path, (str, os.PathLike))
            else str(include_path)
        )
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=paths)


def check_tasks(tasks: Sequence[str], task_manager: Any) -> None:
    """Raise a ValueError naming ``eval.zeroshot.tasks`` for any task lm-eval does not know."""
    if not tasks:
        raise ValueError(f"{TASKS_KEY} is empty: name at least one lm-eval task.")
    known = task_manager.all_tasks
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = []
        for task in unknown:
            close = difflib.get_close_matches(task, known, n=5, cutoff=0.6)
            hints.append(f"{task!r} (similar: {', '.join(close) if close else 'none'})")
        raise ValueError(
            f"{TASKS_KEY}: unknown lm-eval task(s) {'; '.join(hints)}. The defaults are "
            f"{', '.join(DEFAULT_TASKS)}; local tasks (austen_cloze) need their include path."
        )


def check_limit(limit: Any) -> None:
    """``eval.zeroshot.limit`` as lm-eval reads it (below 1: a share of each task's items, else
    a count), or the refusal: null, or a finite number > 0."""
    if limit is not None and not (type(limit) in (int, float) and 0 < limit < math.inf):
        raise ConfigError(
            f"eval.zeroshot.limit={limit!r}: allowed values are null (every item), an integer "
            ">= 1 (items per task) or a fraction in (0, 1) (that share of each task's items)."
        )


def validate_task_names(
    tasks: Sequence[str],
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> None:
    """Fail fast, before any model is loaded, on a task name lm-eval will not know.

    ``austen_cloze`` counts as known without an include path: its task folder is generated on
    demand (:func:`gblm.eval.cloze.ensure_austen_cloze_task`). Building lm-eval's task index takes
    about 10 s, so this is called once per run, only when zero-shot evaluation is enabled.
    """
    from gblm.eval.cloze import TASK_NAME

    others = [t for t in tasks if not (t == TASK_NAME and include_path is None)]
    if not tasks:
        check_tasks(tasks, None)
    if others:
        check_tasks(others, _task_manager(include_path, others))


def summarize_results(results: dict) -> dict:
    """lm-eval's ``results`` dict -> ``{task: {"acc", "acc_norm", their stderrs, ..., "samples"}}``
    and the means. Every numeric metric of a leaf task is kept under its name (a filter other than
    ``none`` as ``name@filter``).

    Only leaf tasks are kept (group aggregates are dropped) and means are unweighted over them.
    A task without ``acc_norm`` reports its ``acc`` there (``acc_norm_is_acc: True``), so
    ``mean_acc_norm`` always averages over the same tasks as ``mean_acc``.
    """
    groups = set(results.get("groups", {}))
    samples = results.get("n-samples", {})
    per_task: dict[str, dict[str, Any]] = {}
    for task, metrics in results["results"].items():
        if task in groups or "acc,none" not in metrics:
            continue
        row: dict[str, Any] = {}
        for key, value in metrics.items():  # every metric and stderr: "acc,none", "acc_stderr,none"
            name, _, kind = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value):
                    continue  # lm-eval writes "N/A" or nan for a stderr it could not compute
                row[name if kind in ("", "none") else f"{name}@{kind}"] = float(value)
        if "acc_norm" not in row:
            row["acc_norm"], row["acc_norm_is_acc"] = row["acc"], True
        if task in samples:
            row["samples"] = int(samples[task].get("effective", 0))
        per_task[task] = row
    if not per_task:
        raise ValueError("lm-eval returned no task with an accuracy (acc) metric.")
    summary: dict[str, Any] = dict(per_task)
    summary["mean_acc"] = sum(r["acc"] for r in per_task.values()) / len(per_task)
    summary["mean_acc_norm"] = sum(r["acc_norm"] for r in per_task.values()) / len(per_task)
    return summary


def _place(model: nn.Module, device: torch.device | str | None) -> None:
    """Move a model not dispatched by accelerate to ``device`` (None: leave it where it is)."""
    if device is not None and getattr(model, "hf_device_map", None) is None:
        device = torch.device(device)
        if input_device(model) != device:
            model.to(device)


def zeroshot_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    device: torch.device | str | None = None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    num_fewshot: int = 0,
    seed: int = 1234,
    results_dir: str | os.PathLike | None = None,
    log_samples: bool = False,
) -> dict:
    """Score ``model`` on lm-eval ``tasks`` and return accuracies.

    Args:
        model: a causal LM (``transformers.PreTrainedModel``), pruned or not; used as it is.
        tokenizer: its tokenizer object.
        tasks: lm-eval task names; checked before anything runs.
        limit: at most this many examples per task (a fraction when < 1); None = all.
        batch_size: lm-eval batch size (``"auto"`` lets lm-eval pick on CUDA).
        device: where to evaluate. A model not dispatched with a ``device_map`` is moved there
            (in place) if it lives elsewhere; a dispatched model is left as accelerate placed it.
            None = where the model already is.
        include_path: folder(s) of local task YAMLs (see :func:`gblm.eval.cloze.write_task_dir`).
        num_fewshot: examples in context (0 for the published protocol).
        seed: lm-eval's python/numpy/torch seeds (lm-eval reseeds the global generators).
        results_dir: where to keep lm-eval's own output: ``lm_eval_results.json`` (every metric
            with its stderr, the task configs and versions) and, with ``log_samples``,
            ``lm_eval_samples_<task>.jsonl`` (every item with its choices' log-likelihoods).
        log_samples: keep the per-item log (needs ``results_dir``).

    Returns:
        ``{task: {"acc", "acc_norm", "acc_stderr", "samples"}, ..., "mean_acc", "mean_acc_norm"}``
        (see :func:`summarize_results`).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    task_manager = _task_manager(include_path, tasks)
    check_tasks(tasks, task_manager)

    _place(model, device)
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=task_manager,
            log_samples=log_samples and results_dir is not None,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    if out is None:  # only non-zero ranks get None; gblm runs one process
        raise RuntimeError("lm-eval returned no results (not rank 0?).")
    if results_dir is not None:
        write_lm_eval_output(out, Path(results_dir))
    return summarize_results(out)


def write_lm_eval_output(out: dict, directory: Path) -> list[Path]:
    """lm-eval's results (without the samples) as JSON, and each task's samples as JSON lines."""
    from gblm.utils import atomic_write_text

    samples = out.get("samples") or {}
    results = {k: v for k, v in out.items() if k != "samples"}
    written = [directory / "lm_eval_results.json"]
    atomic_write_text(written[0], json.dumps(results, indent=1, default=str))
    for task, items in samples.items():
        path = directory / f"lm_eval_samples_{task}.jsonl"
        atomic_write_text(path, "".join(json.dumps(i, default=str) + "\n" for i in items))
        written.append(path)
    return written
