"""Zero-shot accuracy through lm-evaluation-harness, on the live (pruned) model.

The model object is handed to lm-eval's Hugging Face wrapper (``HFLM(pretrained=model)``), so what
is scored is exactly the model in memory. Every task is scored 0-shot by the log-likelihood of
each choice: ``acc`` picks the highest sum, ``acc_norm`` the highest per character (lm-eval's
definitions). As in Wanda's ``eval_zero_shot`` (which GBLM-Pruner's numbers follow), requests
are tokenized without special tokens (``add_bos_token=False``): no BOS, whatever the tokenizer
and lm-eval version (lm-eval's default is the tokenizer's since late 2025: a BOS for LLaMA). Local
tasks (``austen_cloze``, :mod:`gblm.eval.cloze`) come in through ``include_path``.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from gblm.eval.cloze import TASK_NAME
from gblm.utils import atomic_write_json, atomic_write_text, evaluating

# The GBLM-Pruner / Wanda zero-shot suite.
DEFAULT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                 "openbookqa")  # fmt: skip
TASKS_KEY = "eval.zeroshot.tasks"  # the config key named in error messages
SEED = 1234  # lm-eval's python/numpy/torch seeds (it reseeds the global generators)


#: How lm-eval is asked, part of a run's identity (:func:`gblm.pipeline.fingerprints`): a finished
#: run scored another way runs again.
REQUESTS = {"num_fewshot": 0, "add_bos_token": False}


def _task_manager(include_path: str | os.PathLike | None, tasks: Sequence[str]):
    """A TaskManager that knows ``tasks``; the built-in index (~10 s to build) only if needed."""
    from lm_eval.tasks import TaskManager

    path = None if include_path is None else str(include_path)
    if path is not None:
        local = TaskManager(include_path=path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=path)


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


def validate_task_names(
    tasks: Sequence[str], include_path: str | os.PathLike | None = None
) -> None:
    """Fail before any model loads on a task name lm-eval will not know; ``austen_cloze`` without
    an include path is known (it is generated on demand)."""
    if include_path is not None and not os.path.isdir(include_path):
        raise ValueError(
            f"eval.zeroshot.include_path={str(include_path)!r} is not a folder: give the folder "
            "of the extra lm-eval task YAMLs, or null."
        )
    others = [t for t in tasks if not (t == TASK_NAME and include_path is None)]
    if not tasks:
        check_tasks(tasks, None)  # the empty list's message, before any index is built
    if others:
        check_tasks(others, _task_manager(include_path, others))


def summarize_results(results: dict) -> dict:
    """lm-eval's results -> ``{task: {"acc", "acc_norm", ..., "samples"}, "mean_acc",
    "mean_acc_norm"}``: every finite numeric metric of a leaf task (a filter other than ``none``
    as ``name@filter``), and the unweighted means over the leaf tasks that have an ``acc`` (a task
    scored otherwise, e.g. by perplexity, keeps its own metrics and stays out of the means). A task
    without ``acc_norm`` reports its ``acc`` there (``acc_norm_is_acc: True``)."""
    groups = set(results.get("groups", {}))
    samples = results.get("n-samples", {})
    per_task: dict[str, dict[str, Any]] = {}
    for task, metrics in results["results"].items():
        if task in groups:
            continue
        row: dict[str, Any] = {}
        for key, value in metrics.items():  # every metric and stderr: "acc,none", "acc_stderr,none"
            name, _, kind = key.partition(",")
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if number and math.isfinite(value):  # not a stderr lm-eval could not compute (nan)
                row[name if kind in ("", "none") else f"{name}@{kind}"] = float(value)
        if "acc" in row and "acc_norm" not in row:
            row["acc_norm"], row["acc_norm_is_acc"] = row["acc"], True
        if task in samples:
            row["samples"] = int(samples[task].get("effective", 0))
        per_task[task] = row
    if not per_task:
        raise ValueError("lm-eval returned no results for the requested tasks.")
    summary: dict[str, Any] = dict(per_task)
    scored = [r for r in per_task.values() if "acc" in r]
    if scored:
        summary["mean_acc"] = sum(r["acc"] for r in scored) / len(scored)
        summary["mean_acc_norm"] = sum(r["acc_norm"] for r in scored) / len(scored)
    return summary


def zeroshot_eval(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    include_path: str | os.PathLike | None = None,
    results_dir: str | os.PathLike | None = None,
    log_samples: bool = False,
) -> dict:
    """Score ``model`` 0-shot on lm-eval ``tasks``; returns :func:`summarize_results`.

    Args:
        limit: at most this many items per task (a share of them when < 1); None = all.
        batch_size: lm-eval's batch size (``"auto"`` lets lm-eval pick on CUDA).
        include_path: a folder of local task YAMLs.
        results_dir: where to keep lm-eval's output: ``lm_eval_results.json`` and, with
            ``log_samples``, each task's per-item log ``lm_eval_samples_<task>.jsonl``.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    task_manager = _task_manager(include_path, tasks)
    check_tasks(tasks, task_manager)
    with evaluating(model):  # HFLM puts the model in eval mode; its own mode comes back
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  add_bos_token=REQUESTS["add_bos_token"])  # fmt: skip
        out = simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=REQUESTS["num_fewshot"], limit=limit,
            task_manager=task_manager, log_samples=log_samples and results_dir is not None,
            random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED,
            fewshot_random_seed=SEED,
        )  # fmt: skip
    if out is None:  # only non-zero ranks get None; gblm runs one process
        raise RuntimeError("lm-eval returned no results (not rank 0?).")
    if results_dir is not None:
        results = {k: v for k, v in out.items() if k != "samples"}
        atomic_write_json(Path(results_dir, "lm_eval_results.json"), results)
        for task, items in (out.get("samples") or {}).items():
            text = "".join(json.dumps(i, default=str) + "\n" for i in items)
            atomic_write_text(Path(results_dir, f"lm_eval_samples_{task}.jsonl"), text)
    return summarize_results(out)
