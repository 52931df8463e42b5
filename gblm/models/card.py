"""The model card (``README.md``) of a saved pruned model, from the run's record.

Its YAML header is the Hub's metadata (base model, tags, the scores as ``model-index`` results);
its text says how the model was pruned, what it scored, and the command that made it.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

#: An absolute path in an override's value (``key=/data/x/model``, ``key=[~/a.txt, '/b.txt']``,
#: ``key=~user/model``).
_ABSOLUTE_PATH = re.compile(r"(?<=[=\[,\s'\"])(~[\w.-]*)?/[^\s,\]'\"]+")


def portable_path(text: str) -> str:
    """An absolute path (``/data/x/model``, ``~/model``) as ``<path>/model``, so that no machine's
    folders end up in a card or a published record; anything else (a hub id, a name) as it is."""
    return f"<path>/{PurePath(text).name}" if text.startswith(("/", "~")) else text


def portable_command(overrides: Sequence[str]) -> str:
    """``python -m gblm <overrides>``, with every absolute path cut to its last component."""
    shown = [_ABSOLUTE_PATH.sub(lambda m: portable_path(m.group()), o) for o in overrides]
    return shlex.join(["python", "-m", "gblm", *shown])


def _settings(settings: Mapping[str, Any] | None) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in (settings or {}).items()) or "(none)"


def _target(sparsity: Mapping[str, Any]) -> str:
    """``50% unstructured`` or ``2:4 semi-structured``."""
    if sparsity.get("m"):
        return f"{sparsity['n']}:{sparsity['m']} semi-structured"
    return f"{100 * float(sparsity.get('ratio') or 0):g}% unstructured"


def _tags(metrics: Mapping[str, Any]) -> list[str]:
    sparsity = metrics.get("sparsity") or {}
    pattern = (
        f"{sparsity['n']}-{sparsity['m']}-sparsity"
        if sparsity.get("m")
        else "unstructured-sparsity"
    )
    label = str(metrics.get("method_label") or metrics.get("method") or "")
    methods = [m for m in re.split(r"[+()]", label) if m]
    return list(dict.fromkeys(["gblm", "pruning", "sparsity", pattern, *methods]))


def _eval_results(metrics: Mapping[str, Any], evaluation: Mapping[str, Any]) -> list:
    """The run's numbers as the Hub's ``model-index`` results: pruned perplexity, zero-shot acc."""
    from huggingface_hub import EvalResult

    results = []
    pruned = (metrics.get("ppl") or {}).get("pruned")  # a diverged one (inf, nan) is no result
    if pruned is not None and math.isfinite(float(pruned)) and evaluation.get("dataset"):
        results.append(EvalResult(
            task_type="text-generation", dataset_type=str(evaluation["dataset"]),
            dataset_name=str(evaluation["dataset"]), dataset_split=evaluation.get("split"),
            metric_type="perplexity", metric_value=round(float(pruned), 4),
            metric_name=f"perplexity ({evaluation.get('seqlen')}-token windows)",
        ))  # fmt: skip
    for task, row in (metrics.get("zeroshot") or {}).items():
        if isinstance(row, Mapping) and row.get("acc") is not None:
            results.append(EvalResult(
                task_type="text-generation", dataset_type=task, dataset_name=task,
                metric_type="accuracy", metric_value=round(float(row["acc"]), 4),
                metric_name="acc (lm-eval, zero-shot)",
            ))  # fmt: skip
    return results


def _evaluation_rows(metrics: Mapping[str, Any], evaluation: Mapping[str, Any]) -> list[str]:
    ppl = metrics.get("ppl") or {}
    where = f"{evaluation.get('dataset')} {evaluation.get('split')}"
    windows = evaluation.get("max_windows")
    scope = f"{windows} windows" if windows else "every window"
    rows = [
        f"| perplexity, {tag} model | {ppl[tag]:.4f} | {where}, {evaluation.get('seqlen')}-token "
        f"windows ({scope}) |"
        for tag in ("dense", "pruned")
        if tag in ppl
    ]
    for task, row in (metrics.get("zeroshot") or {}).items():
        if isinstance(row, Mapping) and row.get("acc") is not None:
            stderr = row.get("acc_stderr")
            spread = f" ± {stderr:.4f}" if isinstance(stderr, float) else ""
            rows.append(f"| {task} acc | {row['acc']:.4f}{spread} | lm-eval, zero-shot, "
                        f"{row.get('samples', '?')} items |")  # fmt: skip
    return rows


def model_card(
    metrics: Mapping[str, Any],
    achieved: float,
    base_model: str | None = None,
    evaluation: Mapping[str, Any] | None = None,
) -> str:
    """The ``README.md`` of a saved model: ``metrics`` is the run's record so far, ``achieved``
    the share of zeros in the masks, ``base_model`` a Hub id (None: not on the Hub) and
    ``evaluation`` the perplexity setting (``dataset``, ``split``, ``seqlen``, ``max_windows``)."""
    from huggingface_hub import ModelCard, ModelCardData

    from gblm import __version__

    evaluation = evaluation or {}
    sparsity = metrics.get("sparsity") or {}
    label = metrics.get("method_label") or metrics.get("method")
    model = PurePath(str(metrics.get("model"))).name  # a local folder's last component only
    name = f"{model}-{label}-{sparsity.get('label')}".replace(":", "of")
    data = ModelCardData(
        base_model=base_model, library_name="transformers", pipeline_tag="text-generation",
        tags=_tags(metrics), model_name=name, eval_results=_eval_results(metrics, evaluation) or None,
        pruning={"tool": f"gblm {__version__}", "method": metrics.get("method"),
                 "method_label": label, "settings": dict(metrics.get("method_settings") or {}),
                 "target_sparsity": sparsity.get("label"), "achieved_sparsity": round(achieved, 6)},
    )  # fmt: skip
    calibration = metrics.get("calibration") or {}
    source = base_model or f"{model} (not a Hub model)"
    lines = [
        f"# {name}",
        "",
        f"{source} pruned with **{label}** to {_target(sparsity)} sparsity by gblm "
        f"{__version__}. The pruned weights are stored as zeros in a dense checkpoint, so it loads "
        "and runs as any transformers model; `pruning_masks.safetensors` holds the masks "
        "(bit-packed) and `pruning.json` the run's record.",
        "",
        "## Pruning",
        "",
        "| | |",
        "|---|---|",
        f"| method | {label} |",
        f"| method settings | {_settings(metrics.get('method_settings'))} |",
        f"| target sparsity | {_target(sparsity)} |",
        f"| achieved sparsity | {achieved:.4f} of the pruned Linears' weights are zero |",
        f"| calibration | {calibration.get('source')}: {calibration.get('nsamples')} windows of "
        f"{calibration.get('seqlen')} tokens, seed {calibration.get('seed')} |",
    ]
    rows = _evaluation_rows(metrics, evaluation)
    if rows:
        lines += ["", "## Evaluation", "", "| | value | on |", "|---|---|---|", *rows]
    if metrics.get("command"):
        lines += ["", "## How it was made", "", "```bash", metrics["command"], "```"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>")',
        "```",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))
