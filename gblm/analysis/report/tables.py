"""The report's tables: methods x sparsity pivots (with the published numbers beside ours), one
per ablation axis, stage timings, zero-shot per task, mask structure, per-block sparsity, and
every run with its status.

Every number has one format (:func:`fmt_number`: two decimals below 1000, thousands separated
above); shares and accuracies are in percent, times in seconds. A cell that averages repeats
(seeds) is a :class:`Stat`: ``mean ± std (n=k)``, the sample standard deviation.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from gblm.analysis.report.axes import axis_rows, axis_values, fmt_value
from gblm.analysis.report.runs import RunRecord, is_baseline, number
from gblm.names import MODULE_TYPES

DENSE_ROW = "dense"  # the label of the unpruned model's row in the pivots
Value = Callable[[RunRecord], "float | None"]


def fmt_number(value: float | None) -> str:
    """``452.88``, ``49,541``: two decimals below 1000, whole and thousands-separated above;
    ``nan`` and ``inf`` as such (a diverged run), None as nothing (not measured)."""
    if value is None:
        return ""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if round(abs(value), 2) < 1000 else f"{value:,.0f}"


@dataclass(frozen=True)
class Stat:
    """The mean of ``n`` repeats and their sample standard deviation (None for one run, or
    when a repeat is not finite)."""

    mean: float
    std: float | None = None
    n: int = 1

    def __str__(self) -> str:
        if self.n < 2:
            return fmt_number(self.mean)
        if self.std is None:
            return f"{fmt_number(self.mean)} (n={self.n})"
        return f"{fmt_number(self.mean)} ± {fmt_number(self.std)} (n={self.n})"


Cell = str | float | Stat | None


def stat(values: Sequence[float | None], scale: float = 1.0) -> Stat | None:
    """The :class:`Stat` of the numbers among ``values`` (times ``scale``); None if there are none.
    A NaN or inf counts (a diverged repeat makes the mean so), only None is missing."""
    present = [scale * v for v in values if v is not None]
    if not present:
        return None
    finite = all(math.isfinite(v) for v in present)
    std = statistics.stdev(present) if len(present) > 1 and finite else None
    return Stat(statistics.fmean(present), std, len(present))


@dataclass
class Table:
    """A table of the report; ``name`` is the file stem of its CSV and LaTeX exports."""

    name: str
    headers: list[str]
    rows: list[list[Cell]]
    note: str = ""  # a sentence under the table (sources, what a merged column holds)

    def text(self) -> list[list[str]]:
        """The cells as printed: text and a Stat as they read, a number (or None) by fmt_number."""
        return [
            [str(c) if isinstance(c, (str, Stat)) else fmt_number(c) for c in row]
            for row in self.rows
        ]

    def numbers(self) -> pd.DataFrame:
        """The table for a CSV: numbers unformatted, a column of repeats with its std and n."""
        columns: dict[str, list[Any]] = {}
        for j, header in enumerate(self.headers):
            cells = [row[j] for row in self.rows]
            columns[header] = [c.mean if isinstance(c, Stat) else c for c in cells]
            if any(isinstance(c, Stat) and c.n > 1 for c in cells):
                columns[f"{header} std"] = [getattr(c, "std", None) for c in cells]
                columns[f"{header} n"] = [getattr(c, "n", None) for c in cells]
        return pd.DataFrame(columns)


def labels(runs: Sequence[RunRecord]) -> list[str]:
    """The sparsity labels of ``runs`` in column order: unstructured ratios ascending, then N:M."""
    in_order = sorted(runs, key=lambda r: (r.m > 0, -1.0 if math.isnan(r.ratio) else r.ratio, r.n))
    return list(dict.fromkeys(r.label for r in in_order))


def ordered(runs: Sequence[RunRecord], attr: str) -> list[str]:
    """The distinct ``series`` (or ``row``) names of ``runs`` in their sort order."""
    in_order = sorted(runs, key=lambda r: getattr(r, attr + "_key"))
    return list(dict.fromkeys(getattr(r, attr) for r in in_order))


def _grid(runs: Sequence[RunRecord], value: Value, key, scale: float) -> dict[Any, Stat | None]:
    """The :class:`Stat` of ``value`` over the runs of each ``key(run)``: repeats only."""
    groups: dict[Any, list[float | None]] = {}
    for r in runs:
        groups.setdefault(key(r), []).append(value(r))
    return {k: stat(v, scale) for k, v in groups.items()}


def dense_baseline(runs: Sequence[RunRecord]) -> tuple[float | None, float | None, str]:
    """Dense perplexity (median over runs) and zero-shot (from baseline runs), with a note."""
    dense_ppl = [r.ppl_dense for r in runs if r.ppl_dense is not None]
    dense_ppl += [r.ppl_pruned for r in runs
                  if is_baseline(r.base) and r.ppl_pruned is not None and r.ppl_dense is None]  # fmt: skip
    ppl = statistics.median(dense_ppl) if dense_ppl else None
    zeroshot = stat([r.zeroshot for r in runs if is_baseline(r.base)])
    note = ""
    if dense_ppl and max(dense_ppl) - min(dense_ppl) > 1e-3 * max(1.0, abs(ppl or 1.0)):
        note = (f"The dense perplexity differs across runs ({fmt_number(min(dense_ppl))} to "
                f"{fmt_number(max(dense_ppl))}): the runs did not evaluate the same model on the "
                "same text.")  # fmt: skip
    return ppl, zeroshot.mean if zeroshot else None, note


def pivot(
    name: str,
    runs: Sequence[RunRecord],
    value: Value,
    dense: float | None,
    scale: float = 1.0,
    published: dict[tuple[str, str], float] | None = None,
) -> Table:
    """Rows (each run's ``series``) x sparsity labels: the :class:`Stat` of ``value`` over the
    repeats; a dense row on top; ``published`` ``{(row, label): value}`` as a column beside
    each sparsity that has one."""
    pruned = [r for r in runs if not is_baseline(r.base)]
    grid = _grid(pruned, value, lambda r: (r.series, r.label), scale)
    columns, published = labels(pruned) or labels(runs), published or {}
    headers, rows = ["method"], []
    for label in columns:
        headers += [label] + (
            [f"{label} published"] if any(k[1] == label for k in published) else []
        )
    if dense is not None:
        rows.append([DENSE_ROW] + [published.get((DENSE_ROW, None)) if h.endswith("published")
                                   else scale * dense for h in headers[1:]])  # fmt: skip
    for series in ordered(pruned, "series"):
        rows.append([series] + [published.get((series, h.split()[0])) if h.endswith("published")
                                else grid.get((series, h)) for h in headers[1:]])  # fmt: skip
    return Table(name, headers, rows)


def axis_table(
    name: str,
    runs: Sequence[RunRecord],
    key: str,
    axes: Sequence[str],
    value: Value,
    scale: float = 1.0,
) -> Table | None:
    """(method, sparsity) rows x the values of ablation axis ``key``: the :class:`Stat` of ``value``."""
    runs = axis_rows(runs, key, axes)
    if not runs:
        return None
    columns = axis_values(runs, key)
    grid = _grid(runs, value, lambda r: (r.row, r.label, r.settings[key]), scale)
    rows = [[row, label, *(grid.get((row, label, v)) for v in columns)]
            for label in labels(runs) for row in ordered([r for r in runs if r.label == label], "row")]  # fmt: skip
    return Table(name, ["method", "sparsity", *(f"{key}={fmt_value(v)}" for v in columns)], rows)


def by_series(
    name: str, runs: Sequence[RunRecord], columns: dict[str, tuple[Value, float]]
) -> Table:
    """One row per (series, sparsity): the :class:`Stat` of each named ``(value, scale)``."""
    grids = [_grid(runs, v, lambda r: (r.series, r.label), s) for v, s in columns.values()]
    rows = []
    for label in labels(runs):
        for series in ordered([r for r in runs if r.label == label], "series"):
            rows.append([series, label, *(grid[(series, label)] for grid in grids)])
    return Table(name, ["method", "sparsity", *columns], [r for r in rows if any(r[2:])])


def timings_table(name: str, runs: Sequence[RunRecord]) -> Table:
    """Seconds per stage, and in all, for each (series, sparsity); after the prune stage, the
    weight update's share of it where a run has one (``reconstruct=...``)."""
    stages = list(dict.fromkeys(k for r in runs for k in r.timings if k != "total"))
    updated = any(r.update_seconds is not None for r in runs)
    columns = {}
    for s in stages:
        columns[f"{s} (s)"] = (lambda r, s=s: r.timings.get(s), 1.0)
        if s == "prune" and updated:
            columns["of which update (s)"] = (lambda r: r.update_seconds, 1.0)
    return by_series(name, runs, {**columns, "total (s)": (lambda r: r.total_time, 1.0)})


def zeroshot_table(name: str, runs: Sequence[RunRecord]) -> Table | None:
    """Accuracy (%) per task for each (series, sparsity); None when no run has zero-shot."""
    tasks = sorted({t for r in runs for t in r.zeroshot_tasks})
    if not tasks:
        return None
    columns = {t: (lambda r, t=t: r.zeroshot_tasks.get(t), 100.0) for t in tasks}
    return by_series(name, runs, {**columns, "mean": (lambda r: r.zeroshot, 100.0)})


def _weighted(rows: Sequence[dict], key: str, module_type: str | None = None) -> float | None:
    """The size-weighted mean of ``key`` over the Linears (of one module type)."""
    rows = [x for x in rows if module_type is None or x.get("type") == module_type]
    total = sum(x.get("total") or 0 for x in rows)
    return sum((x.get(key) or 0.0) * (x.get("total") or 0) for x in rows) / total if total else None


def structure_table(name: str, runs: Sequence[RunRecord]) -> Table | None:
    """Size-weighted ``column_structure`` per module type for each (series, sparsity)."""
    runs = [r for r in runs if r.mask_rows]
    types = [t for t in MODULE_TYPES if any(x.get("type") == t for r in runs for x in r.mask_rows)]
    columns = {t or "all": (lambda r, t=t: _weighted(r.mask_rows, "column_structure", t), 1.0)
               for t in [None, *types]}  # fmt: skip
    return by_series(name, runs, columns) if runs else None


def block_sparsity_table(name: str, runs: Sequence[RunRecord]) -> Table | None:
    """Achieved share of zeros (%) per decoder block (rows) of each run (columns), a per-block
    schedule's targets beside them; columns with equal values are one column naming all."""
    runs = sorted((r for r in runs if r.per_block), key=lambda r: r.series_key)
    if not runs:
        return None
    merged: dict[tuple, tuple[list[str], list[str]]] = {}  # values -> achieved by, target of
    for r in runs:
        for values, kind in ((r.per_block, 0), (r.per_block_target, 1)):
            if values:
                column = merged.setdefault(tuple(fmt_number(100 * v) for v in values), ([], []))
                column[kind].append(run_title(r, runs))
    headers = ["; ".join([", ".join(a)] * bool(a) + [f"target of {', '.join(t)}"] * bool(t))
               for a, t in merged.values()]  # fmt: skip
    rows = [
        [str(b), *(c[b] if b < len(c) else "" for c in merged)]
        for b in range(max(map(len, merged)))
    ]
    return Table(name, ["block", *headers], rows)


def run_title(run: RunRecord, among: Sequence[RunRecord] = ()) -> str:
    """How plots and tables name one run among several: its series, or ``series (folder)``
    when another run of ``among`` has the same series (a repeat)."""
    if sum(other.series == run.series for other in among) <= 1:
        return run.series
    return f"{run.series} ({run.name})"


def runs_table(name: str, runs: Sequence[RunRecord]) -> Table:
    """Every run folder with its status and headline numbers."""

    def pct(v):
        return None if v is None else 100 * v

    rows = [[r.name, r.status, r.method, r.label, r.model, r.ppl_dense, r.ppl_pruned, pct(r.achieved),
             pct(r.zeroshot), r.total_time, r.peak_memory_bytes / 2**30 if number(r.peak_memory_bytes) else None]
            for r in runs]  # fmt: skip
    headers = ["run", "status", "method", "sparsity", "model", "dense ppl", "ppl", "zeros (%)",
               "zero-shot (%)", "time (s)", "peak memory (GiB)"]  # fmt: skip
    return Table(name, headers, rows)


def failed_table(name: str, runs: Sequence[RunRecord]) -> Table:
    """The failed and unfinished runs, with the first line of their error."""
    rows = [[r.name, r.status, r.method, r.label, r.model, r.error.splitlines()[0] if r.error else ""]
            for r in runs]  # fmt: skip
    return Table(name, ["run", "status", "method", "sparsity", "model", "error"], rows)
