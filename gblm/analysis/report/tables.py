"""The report's tables: methods x sparsity pivots, stage timings, zero-shot per task, mask
structure per module type, per-block sparsity, and every run with its status."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gblm.analysis.report.runs import RunRecord, is_baseline, method_key, number, sparsity_key
from gblm.names import MODULE_TYPES

DENSE_ROW = "dense"  # the label of the unpruned model's row in the pivots


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


# ----------------------------------------------------------------------------- cells


def labels(runs: Sequence[RunRecord]) -> list[str]:
    """The sparsity labels of ``runs`` in column order (see :func:`sparsity_key`)."""
    by_label = {r.label: r for r in sorted(runs, key=sparsity_key)}
    return list(by_label)


def _mean(values: Iterable[float | None]) -> tuple[float | None, int]:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return (statistics.fmean(present), len(present)) if present else (None, 0)


def fmt_ppl(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if abs(value) < 1e4 else f"{value:.3g}"


def fmt_acc(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.2f} h"


def fmt_bytes(value: Any) -> str:
    return f"{value / 2**30:.2f} GiB" if number(value) is not None else ""


def fmt_share(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _cell(values: Iterable[float | None], fmt: Callable[[float | None], str]) -> str:
    value, count = _mean(values)
    if value is None:
        return ""
    return fmt(value) + (f" (n={count})" if count > 1 else "")


def _method_label_keys(runs: Iterable[RunRecord]) -> list[tuple[str, str]]:
    """The distinct ``(method, label)`` pairs, in method order then label."""
    return sorted({(r.method, r.label) for r in runs}, key=lambda k: (method_key(k[0]), k[1]))


# ----------------------------------------------------------------------------- tables


def dense_baseline(runs: Sequence[RunRecord]) -> tuple[float | None, float | None, str]:
    """Dense perplexity (median over runs) and zero-shot (from baseline runs), with a note."""
    dense_ppl = [r.ppl_dense for r in runs if r.ppl_dense is not None]
    dense_ppl += [
        r.ppl_pruned
        for r in runs
        if is_baseline(r.method) and r.ppl_pruned is not None and r.ppl_dense is None
    ]
    ppl = statistics.median(dense_ppl) if dense_ppl else None
    zeroshot, _ = _mean(r.zeroshot for r in runs if is_baseline(r.method))
    note = ""
    if dense_ppl and max(dense_ppl) - min(dense_ppl) > 1e-3 * max(1.0, abs(ppl or 1.0)):
        note = (
            f"The dense perplexity differs across runs ({min(dense_ppl):.4g} to {max(dense_ppl):.4g}): "
            "the runs did not evaluate the same model on the same text."
        )
    return ppl, zeroshot, note


def pivot(
    runs: Sequence[RunRecord],
    value: Callable[[RunRecord], float | None],
    fmt: Callable[[float | None], str],
    dense: float | None,
) -> Table:
    """Methods (rows) x sparsity labels (columns) of the mean of ``value``; a dense row on top."""
    columns = labels(runs)
    methods = sorted({r.method for r in runs if not is_baseline(r.method)}, key=method_key)
    rows = []
    if dense is not None:
        rows.append([DENSE_ROW, *[fmt(dense)] * len(columns)])
    for method in methods:
        cells = [
            _cell((value(r) for r in runs if r.method == method and r.label == lab), fmt)
            for lab in columns
        ]
        rows.append([method, *cells])
    return Table(["method", *columns], rows)


def timings_table(runs: Sequence[RunRecord]) -> Table:
    """Mean seconds per stage for each (method, sparsity)."""
    stages = list(dict.fromkeys(k for r in runs for k in r.timings if k != "total"))
    rows = []
    for method, label in _method_label_keys(runs):
        group = [r for r in runs if r.method == method and r.label == label]
        cells = [_cell((r.timings.get(s) for r in group), fmt_seconds) for s in [*stages, "total"]]
        rows.append([method, label, *cells])
    return Table(["method", "sparsity", *stages, "total"], rows)


def zeroshot_table(runs: Sequence[RunRecord]) -> Table | None:
    """Mean accuracy (%) per task for each (method, sparsity); None when no run has zero-shot."""
    tasks = sorted({t for r in runs for t in r.zeroshot_tasks})
    if not tasks:
        return None
    rows = []
    for method, label in _method_label_keys(r for r in runs if r.zeroshot_tasks):
        group = [r for r in runs if r.method == method and r.label == label]
        cells = [_cell((r.zeroshot_tasks.get(t) for r in group), fmt_acc) for t in [*tasks]]
        rows.append([method, label, *cells, _cell((r.zeroshot for r in group), fmt_acc)])
    return Table(["method", "sparsity", *tasks, "mean"], rows)


def _weighted(rows: Sequence[dict], key: str) -> float | None:
    total = sum(r.get("total") or 0 for r in rows)
    if not total:
        return None
    return sum((r.get(key) or 0.0) * (r.get("total") or 0) for r in rows) / total


def structure_table(runs: Sequence[RunRecord]) -> Table | None:
    """Size-weighted ``column_structure`` per module type for every run with mask statistics."""
    with_rows = [r for r in runs if r.mask_rows]
    if not with_rows:
        return None
    types = [
        t
        for t in MODULE_TYPES
        if any(row.get("type") == t for r in with_rows for row in r.mask_rows)
    ]
    rows = []
    for run in sorted(with_rows, key=lambda r: (method_key(r.method), sparsity_key(r))):
        overall = _weighted(run.mask_rows, "column_structure")
        per_type = [
            _weighted([x for x in run.mask_rows if x.get("type") == t], "column_structure")
            for t in types
        ]
        rows.append(
            [
                run.method,
                run.label,
                run.name,
                *(f"{v:.2f}" if v is not None else "" for v in [overall, *per_type]),
            ]
        )
    return Table(["method", "sparsity", "run", "all", *types], rows)


def run_title(run: RunRecord, among: Sequence[RunRecord] = ()) -> str:
    """How plots and tables name one run among several: its method, or ``method (folder)``
    when another run of ``among`` has the same method."""
    if among and sum(other.method == run.method for other in among) == 1:
        return run.method
    return f"{run.method} ({run.name})"


def block_sparsity_table(runs: Sequence[RunRecord]) -> Table | None:
    """Achieved share of zeros per decoder block (rows) of each run (columns).

    A run whose metrics hold a per-block target (``sparsity.per_block_target``, written when a
    schedule sets the sparsity per block) gets a target column beside its achieved one.
    """
    runs = sorted((r for r in runs if r.per_block), key=lambda r: method_key(r.method))
    if not runs:
        return None
    headers, columns = ["block"], []
    for r in runs:
        headers.append(run_title(r, runs))
        columns.append(r.per_block)
        if r.per_block_target:
            headers.append(f"{run_title(r, runs)} target")
            columns.append(r.per_block_target)
    blocks = max(len(c) for c in columns)
    rows = [
        [str(b), *(fmt_share(c[b]) if b < len(c) else "" for c in columns)] for b in range(blocks)
    ]
    return Table(headers, rows)


def runs_table(runs: Sequence[RunRecord]) -> Table:
    """Every run folder with its status and headline numbers."""
    rows = [
        [
            r.name,
            r.status,
            r.method,
            r.label,
            r.model,
            fmt_ppl(r.ppl_dense),
            fmt_ppl(r.ppl_pruned),
            fmt_share(r.achieved),
            fmt_acc(r.zeroshot),
            fmt_seconds(r.total_time),
            fmt_bytes(r.peak_memory_bytes),
        ]
        for r in runs
    ]
    headers = [
        "run",
        "status",
        "method",
        "sparsity",
        "model",
        "dense ppl",
        "ppl",
        "zeros",
        "zero-shot",
        "time",
        "peak memory",
    ]
    return Table(headers, rows)


def failed_table(runs: Sequence[RunRecord]) -> Table:
    """The failed and unfinished runs, with the first line of their error."""
    rows = [
        [r.name, r.status, r.method, r.label, r.model, r.error.splitlines()[0] if r.error else ""]
        for r in runs
    ]
    return Table(["run", "status", "method", "sparsity", "model", "error"], rows)


def axis_table(
    runs: Sequence[RunRecord],
    key: str,
    value: Callable[[RunRecord], float | None],
    fmt: Callable[[float | None], str],
) -> Table:
    """(method, sparsity) rows x the values of ablation axis ``key`` (columns): mean of ``value``."""
    from gblm.analysis.report.axes import axis_values, fmt_value

    runs = [r for r in runs if key in r.settings and not is_baseline(r.method)]
    columns = axis_values(runs, key)
    rows = []
    for method, label in _method_label_keys(runs):
        group = [r for r in runs if (r.method, r.label) == (method, label)]
        if len({r.settings[key] for r in group}) < 2:
            continue  # this pair did not sweep the axis
        cells = [_cell((value(r) for r in group if r.settings[key] == v), fmt) for v in columns]
        rows.append([method, label, *cells])
    return Table(["method", "sparsity", *[f"{key}={fmt_value(v)}" for v in columns]], rows)
