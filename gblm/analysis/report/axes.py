"""The swept axes of a sweep: the settings that differ between runs of one method and sparsity.

The method and the sparsity are the report's main axes, and the model its sections. Any other
setting that takes two or more values among the runs of one (method, sparsity) pair is an
ablation axis: ``calibration.nsamples``, ``method.norm``, ``method.scale``,
``calibration.source``, ``calibration.seqlen``, an allocator's settings, ... Seeds are repeats
(their runs are averaged, the cell says n=), and keys that cannot change a result (loggers,
progress bars, file locations, batching) are never axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gblm.analysis.report.runs import RunRecord, is_baseline

#: Top-level keys and prefixes that are not ablation axes.
NOT_AXES = (
    "method.name", "method._target_", "method.order", "sparsity.", "model.", "logger", "hydra",
    "experiment", "progress", "skip_finished", "mask_images", "save_model", "seed",
    "calibration.seed", "calibration.paths", "eval.perplexity.paths", "eval.zeroshot.include_path",
    "batch_size", "offload_inputs", "device",
)  # fmt: skip
#: Axes shown first when a sweep has several, in this order; others follow by name.
PREFERRED = ("calibration.nsamples", "calibration.seqlen", "calibration.source", "method.norm",
             "method.scale", "method.score", "method.comparison_group")  # fmt: skip


def _is_axis_key(key: str) -> bool:
    return not any(key == p or key.startswith(p if p.endswith(".") else p + ".")
                   for p in NOT_AXES)  # fmt: skip


def swept_axes(runs: Sequence[RunRecord]) -> list[str]:
    """The keys that take two or more values within the runs of one (method, sparsity) pair."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in runs:
        if not is_baseline(r.method):
            groups.setdefault((r.method, r.label), []).append(r)
    axes = set()
    for group in groups.values():
        keys = {k for r in group for k in r.settings if _is_axis_key(k)}
        for key in keys:
            values = {r.settings[key] for r in group if key in r.settings}
            if len(values) > 1:
                axes.add(key)
    first = [k for k in PREFERRED if k in axes]
    return first + sorted(axes - set(first))


def axis_values(runs: Sequence[RunRecord], key: str) -> list[Any]:
    """The values ``key`` takes, numbers ascending, then the others by their text."""
    values = {r.settings[key] for r in runs if key in r.settings}
    numbers = sorted(v for v in values if _numeric(v))
    return numbers + sorted((v for v in values if not _numeric(v)), key=str)


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fmt_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)
