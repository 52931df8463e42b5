"""The swept axes of a sweep, and the rows they give the report's tables.

The model (the sections) and the sparsity (the columns) are the main axes. Any other setting
with two or more values among the runs of one registered method at one sparsity is an ablation
axis (``calibration.nsamples``, ``method.norm``, ``sparsity.allocator``, ``reconstruct``, ...),
unless another axis fixes it (an update's options, fixed by the update). Seeds are repeats,
averaged; settings that cannot change a result are never axes. A row never averages over an
axis: a headline row (``run.series``) is the method label with the value of each axis that
tells runs of that label apart (``gblm, method.norm=l2``); an axis's own table has one row per
method and setting of the other axes, one column per value of the axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gblm.analysis.report.runs import RunRecord, is_baseline, number
from gblm.methods.registry import method_order, reconstruct_names

#: Keys that are not ablation axes, nor is any key under them; the seeds are repeats.
NOT_AXES = (
    "method.name", "sparsity.ratio", "sparsity.n", "sparsity.m", "sparsity.label", "model",
    "logger", "hydra", "experiment", "progress", "skip_finished", "overwrite", "mask_images",
    "save_model", "save_dtype", "push_to_hub", "seed", "calibration.seed", "calibration.paths",
    "eval.perplexity.paths", "eval.perplexity.batch_size", "eval.perplexity.enabled",
    "eval.perplexity.dense", "eval.zeroshot.enabled", "eval.zeroshot.include_path",
    "eval.zeroshot.batch_size", "eval.zeroshot.log_samples", "batch_size", "offload_inputs",
    "device",
)  # fmt: skip
#: Axes shown first when a sweep has several, in this order; others follow by name.
PREFERRED = ("calibration.nsamples", "calibration.seqlen", "calibration.source", "method.norm",
             "method.scale", "method.score", "method.comparison_group")  # fmt: skip


def is_axis_key(key: str) -> bool:
    return not any(key == p or key.startswith(p + ".") for p in NOT_AXES)


def _groups(runs: Sequence[RunRecord]) -> list[list[RunRecord]]:
    """The pruned runs by (registered method, sparsity)."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in runs:
        if not is_baseline(r.base):
            groups.setdefault((r.base, r.label), []).append(r)
    return list(groups.values())


def _fixes(groups: Sequence[list[RunRecord]], key: str, other: str) -> bool:
    """Whether the value of ``key`` fixes that of ``other`` in every group (where it is set)."""
    for group in groups:
        seen: dict[Any, Any] = {}  # value of key -> value of other
        for r in (r for r in group if other in r.settings):
            if seen.setdefault(r.settings.get(key), r.settings[other]) != r.settings[other]:
                return False
    return True


def _rank(key: str) -> tuple:
    """Which of two axes that fix each other is kept: a preferred key, a ``.name``, not a
    ``._target_`` (an update with no name is still found by its class), the shorter."""
    preferred = PREFERRED.index(key) if key in PREFERRED else len(PREFERRED)
    return (preferred, not key.endswith(".name"), key.endswith("._target_"), key.count("."), key)


def swept_axes(runs: Sequence[RunRecord]) -> list[str]:
    """The keys that take two or more values within the runs of one (method, sparsity) pair."""
    groups = _groups(runs)
    found = set()
    for group in groups:
        for key in {k for r in group for k in r.settings if is_axis_key(k)}:
            if len({value_key(r.settings[key]) for r in group if key in r.settings}) > 1:
                found.add(key)
    axes = sorted(found, key=_rank)
    kept: list[str] = []
    for key in axes:  # drop an axis that an axis kept before it fixes
        if not any(_fixes(groups, k, key) for k in kept):
            kept.append(key)
    return kept


def value_key(value: Any) -> tuple:
    """Sort key of a setting's values: numbers ascending, then the others by their text."""
    return (0, value, "") if number(value) is not None else (1, 0, str(value))


def axis_values(runs: Sequence[RunRecord], key: str) -> list[Any]:
    """The values ``key`` takes: numbers ascending, then the others in the order of the runs'
    series (so the plain method's value, ``uniform`` or ``none``, before its variants')."""
    ordered = sorted(runs, key=lambda r: r.series_key)
    values = dict.fromkeys(r.settings[key] for r in ordered if key in r.settings)
    return sorted(values, key=lambda v: value_key(v)[:2])  # stable: the others keep their order


def fmt_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _name(runs: list[RunRecord], axes: Sequence[str], head, attr: str) -> None:
    """Set ``attr`` of each run to ``head(run)`` plus ``, key=value`` for each of ``axes`` that
    takes several values among the runs of the same head; ``attr + "_key"`` sorts them."""
    heads: dict[str, list[RunRecord]] = {}
    for r in runs:
        heads.setdefault(head(r), []).append(r)
    for name, group in heads.items():
        keys = [k for k in axes if len({value_key(r.settings.get(k)) for r in group}) > 1]
        for r in group:
            suffix = "".join(f", {k}={fmt_value(r.settings.get(k))}" for k in keys)
            setattr(r, attr, name + suffix)
            setattr(r, attr + "_key", (method_order(r.base), update_order(r), name,
                                       tuple(value_key(r.settings.get(k)) for k in keys)))  # fmt: skip


def update_order(run: RunRecord) -> int:
    """A run's weight update in registry order (``none``, ``obs``, ``admm``), unknown ones last."""
    names, update = reconstruct_names(), run.settings.get("reconstruct.name", "none")
    return names.index(update) if update in names else len(names)


def name_series(runs: Sequence[RunRecord], axes: Sequence[str]) -> None:
    """Each run's row in the headline tables (``run.series``): its method label, and the value
    of each axis that takes several values among the runs of that label."""
    _name(list(runs), axes, lambda r: r.method, "series")


def axis_rows(runs: Sequence[RunRecord], key: str, axes: Sequence[str]) -> list[RunRecord]:
    """The runs that sweep ``key``, each with its row in the table of ``key`` (``run.row``): its
    registered method and the values of the other axes that tell its runs apart."""
    runs = [r for r in runs if key in r.settings and not is_baseline(r.base)]
    _name(runs, [k for k in axes if k != key], lambda r: r.base, "row")
    pairs: dict[tuple[str, str], set] = {}
    for r in runs:
        pairs.setdefault((r.row, r.label), set()).add(value_key(r.settings[key]))
    return [r for r in runs if len(pairs[(r.row, r.label)]) > 1]
