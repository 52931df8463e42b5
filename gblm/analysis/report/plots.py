"""The report's PNG plots: a metric against sparsity per method, the share of zeros per block of
each run (with a schedule's per-block targets), and one Linear's mask across methods."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from gblm.analysis.plots import pyplot
from gblm.analysis.report.runs import RunRecord, is_baseline, method_key
from gblm.analysis.report.tables import run_title

_MARKERS = ("s", "^", "D", "v", "P", "X")  # N:M patterns in plot_vs_sparsity


def slug(text: str) -> str:
    """``text`` made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def _plot_method(ax, method, color, points, patterns) -> None:
    """One method's line over the unstructured ratios and its N:M markers."""
    unstructured: dict[float, list[float]] = {}
    for r, v in points:
        if r.method == method and not r.m:
            unstructured.setdefault(r.ratio, []).append(v)
    if unstructured:
        xs = sorted(unstructured)
        ax.plot(
            xs, [statistics.fmean(unstructured[x]) for x in xs], "o-", color=color, label=method
        )
    for j, (n, m) in enumerate(patterns):
        ys = [v for r, v in points if r.method == method and (r.n, r.m) == (n, m)]
        if ys:
            ax.plot(
                [n / m],
                [statistics.fmean(ys)],
                _MARKERS[j % len(_MARKERS)],
                color=color,
                markerfacecolor="none",
                markersize=9,
                label=f"{method} {n}:{m}",
            )


def _log_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda y, _: f"{y:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)


LEGEND_INSIDE = 6  # a legend of more entries goes beside the axes


def _save(fig, ax, title: str, path: Path, legend_size: int, grid: str = "major") -> Path:
    """Title, grid and legend of a line plot, then the PNG; the figure is closed."""
    ax.set_title(title)
    ax.grid(True, which=grid, alpha=0.3)
    if len(ax.get_legend_handles_labels()[1]) > LEGEND_INSIDE:  # beside the plot, not over it
        width, height = fig.get_size_inches()
        fig.set_size_inches(width + 3.2, height)
        ax.legend(fontsize=legend_size, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return path


def plot_vs_sparsity(
    runs: Sequence[RunRecord],
    value: Callable[[RunRecord], float | None],
    dense: float | None,
    ylabel: str,
    title: str,
    path: Path,
    log_y: bool = False,
) -> Path | None:
    """One line per method over the unstructured ratios; N:M runs as separate markers."""
    points = [(r, value(r)) for r in runs if not is_baseline(r.method) and value(r) is not None]
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=100)
    patterns = sorted({(r.n, r.m) for r, _ in points if r.m}, key=lambda p: (p[1], p[0]))
    for i, method in enumerate(sorted({r.method for r, _ in points}, key=method_key)):
        _plot_method(ax, method, f"C{i}", points, patterns)
    if dense is not None:
        ax.axhline(dense, color="grey", linestyle="--", linewidth=1, label="dense")
    if log_y:
        _log_axis(ax)
    ax.set_xlabel("sparsity (share of weights pruned)")
    ax.set_ylabel(ylabel)
    return _save(fig, ax, title, path, legend_size=8, grid="both")


def _block_limits(
    runs: Sequence[RunRecord], uniform_targets: Sequence[float]
) -> tuple[float, float]:
    """The y range of the per-block plot: every achieved value and every target, padded a little
    so that a small deviation from the target stays small."""
    values = [*uniform_targets]
    for r in runs:
        values += [*r.per_block, *r.per_block_target]
    return min(values) - 0.02, max(values) + 0.02


def plot_block_sparsity(runs: Sequence[RunRecord], title: str, path: Path) -> Path | None:
    """The achieved share of zeros per decoder block, one line per run.

    A run with per-block targets (a schedule) gets its targets as a dashed line of its colour;
    the runs with one target for every block share a grey dashed line per target.
    """
    runs = [r for r in runs if r.per_block]
    if not runs:
        return None
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=100)
    for i, r in enumerate(sorted(runs, key=lambda r: method_key(r.method))):
        style = "os^Dv"[i % 5] + "-"
        line = ax.plot(
            range(len(r.per_block)), r.per_block, style, markersize=4, label=run_title(r, runs)
        )
        if r.per_block_target:
            ax.plot(
                range(len(r.per_block_target)),
                r.per_block_target,
                "x--",
                color=line[0].get_color(),
                linewidth=1,
                markersize=5,
                label=f"{run_title(r, runs)} target",
            )
    uniform = sorted({r.ratio for r in runs if not r.per_block_target and not math.isnan(r.ratio)})
    for target in uniform:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(*_block_limits(runs, uniform))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder block")
    ax.set_ylabel("share of zero weights")
    return _save(fig, ax, title, path, legend_size=7)


def plot_mask_comparison(
    runs: Sequence[RunRecord], image_name: str, title: str, path: Path
) -> Path | None:
    """The mask image of one Linear from each run, side by side."""
    runs = [
        r for r in sorted(runs, key=lambda r: method_key(r.method)) if image_name in r.mask_images
    ]
    if not runs:
        return None
    plt = pyplot()
    import matplotlib.image as mpimg

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), dpi=100, squeeze=False)
    for ax, r in zip(axes[0], runs):
        ax.imshow(mpimg.imread(r.mask_images[image_name]))
        ax.set_title(run_title(r, runs), fontsize=10)
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_axis(
    runs: Sequence[RunRecord],
    key: str,
    value: Callable[[RunRecord], float | None],
    ylabel: str,
    title: str,
    path: Path,
    log_y: bool = False,
) -> Path | None:
    """``value`` against the values of ablation axis ``key``: one line per (method, sparsity),
    a colour per method and a marker per sparsity; a numeric axis spanning 8x or more is log."""
    from gblm.analysis.report.axes import axis_values, fmt_value

    runs = [r for r in runs if key in r.settings and not is_baseline(r.method)]
    values = axis_values(runs, key)
    if len(values) < 2:
        return None
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    x_of = {v: (v if numeric else i) for i, v in enumerate(values)}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=100)
    methods = sorted({r.method for r in runs}, key=method_key)
    labels = sorted({r.label for r in runs})
    for method in methods:
        for label in labels:
            xs, ys = [], []
            for v in values:
                got = [value(r) for r in runs if (r.method, r.label) == (method, label)
                       and r.settings[key] == v and value(r) is not None]  # fmt: skip
                if got:
                    xs.append(x_of[v])
                    ys.append(statistics.fmean(got))
            if len(xs) > 1:
                marker = "os^Dv"[labels.index(label) % 5]
                ax.plot(xs, ys, marker + "-", color=f"C{methods.index(method)}",
                        label=f"{method} {label}")  # fmt: skip
    if not ax.lines:
        plt.close(fig)
        return None
    if numeric and min(values) > 0 and max(values) >= 8 * min(values):
        ax.set_xscale("log", base=2)
    ax.set_xticks(values if numeric else range(len(values)),
                  [fmt_value(v) for v in values])  # fmt: skip
    if log_y:
        _log_axis(ax)
    ax.set_xlabel(key)
    ax.set_ylabel(ylabel)
    return _save(fig, ax, title, path, legend_size=8, grid="both")
