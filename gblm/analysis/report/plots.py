"""The report's figures, drawn from its tables so that both always say the same: dot charts of
a metric per sparsity (:func:`plot_pivot`) and per value of an ablation axis (:func:`plot_axis`),
the share of zeros per decoder block (:func:`plot_block_sparsity`), and one Linear's mask image of
each run (:func:`plot_mask_comparison`). :class:`Styles` gives each method one colour and marker
and each variant of it one fill, the same in every figure; legends sit outside the axes."""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

from gblm.analysis.plots import pyplot
from gblm.analysis.report.runs import RunRecord, is_baseline
from gblm.analysis.report.tables import DENSE_ROW, Stat, Table, fmt_number, run_title
from gblm.methods.registry import method_names

#: Paul Tol's "muted" scheme, then Okabe and Ito's orange, blue, vermillion and black.
PALETTE = ("#CC6677", "#332288", "#DDCC77", "#117733", "#88CCEE", "#882255", "#44AA99",
           "#999933", "#AA4499", "#E69F00", "#0072B2", "#D55E00", "#000000")  # fmt: skip
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "h", "<", ">", "p", "*")  # 12: with the 13
# colours, no two of the first 156 methods share both
FILLS = ("full", "none", "left", "bottom", "right", "top")
SAME_CURVE = 0.005  # per-block shares closer than this in every block are one line
DENSE_STYLE = {"color": "0.35", "linestyle": "--", "linewidth": 1.0}


def slug(text: str) -> str:
    """``text`` made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def family(series: str) -> str:
    """The method a series is a variant of: ``gblm`` for ``gblm+owl`` or ``gblm, method.norm=l2``."""
    return re.split(r"[+,]", series, maxsplit=1)[0].strip()


class Styles:
    """One colour and marker per method (:func:`family`) and one fill per variant: a registered
    method's by its place in the registry (the same in every report), the others' (``dsnot(wanda)``)
    and the variants in the order first asked."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.families = {
            m: i for i, m in enumerate(m for m in method_names() if not is_baseline(m))
        }
        self.variants: dict[str, int] = {"": 0}
        for name in names:
            self(name)

    def distinct(self, names: Sequence[str]) -> bool:
        """Whether no two of ``names`` look alike (a method with more variants than fills fails)."""
        looks = {tuple(self(n)[k] for k in ("color", "marker", "fillstyle")) for n in names}
        return len(looks) == len(set(names))

    def __call__(self, series: str) -> dict:
        head = family(series)
        i = self.families.setdefault(head, len(self.families))
        j = self.variants.setdefault(series[len(head) :].strip(), len(self.variants))
        return {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)],
                "fillstyle": FILLS[j % len(FILLS)], "markeredgewidth": 1.3}  # fmt: skip


def _log_axis(ax, values: Sequence[float]) -> None:
    """A log y axis when the values span 3x or more: major ticks at 1, 2, 5 x 10^k (1, 1.5, 2, 3, 5, 7
    within a decade, decades over three), labelled in the tables' number format; minor unlabelled."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    values = [v for v in values if math.isfinite(v)]  # a diverged run's inf or NaN: no scale
    span = max(values) / min(values) if values and min(values) > 0 else 0.0
    if span < 3:
        return
    subs = (
        (1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if span < 10 else (1.0, 2.0, 5.0) if span < 1e3 else (1.0,)
    )
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: fmt_number(y).removesuffix(".00")))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _figure(panels: int, series: Sequence[str], width: float, height: float = 4.2):
    """A constrained-layout figure of ``panels`` axes sharing y, wide and tall enough for the
    legend of ``series`` beside them."""
    lines = [line for s in series for line in s.splitlines()]
    legend = 0.9 + 0.075 * max(map(len, lines), default=0)
    height = max(height, 0.9 + 0.2 * len(lines))
    return pyplot().subplots(1, panels, sharey=True, squeeze=False, layout="constrained",
                             figsize=(width * panels + legend, height), dpi=110)  # fmt: skip


def save_figure(fig, axes, title: str, path: Path) -> Path:
    """Title, one legend for all ``axes`` (outside them, right), the PNG; the figure is closed."""
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8,
                   frameon=False)  # fmt: skip
    if len(axes) == 1 and not axes[0].get_title():  # over its axes, not over axes and legend
        axes[0].set_title(title, fontsize=11)
    else:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path)
    pyplot().close(fig)
    return path


def _dots(
    ax, categories: Sequence[str], values: dict[str, dict[str, Stat]], styles: Styles
) -> None:
    """Each series' value in each category, side by side within the category, std as bars."""
    step = 0.8 / max(1, len(values))
    for i, (series, cells) in enumerate(values.items()):
        offset = (i - (len(values) - 1) / 2) * step
        xs = [k + offset for k, c in enumerate(categories) if cells.get(c)]
        stats = [cells[c] for c in categories if cells.get(c)]
        style = styles(series)
        ax.plot(xs, [s.mean for s in stats], linestyle="none", markersize=7, label=series, **style)
        if any(s.std for s in stats):  # error bars only where a cell averages repeats
            errors = [s.std or math.nan for s in stats]
            ax.errorbar(xs, [s.mean for s in stats], yerr=errors, fmt="none",
                        ecolor=style["color"], capsize=3)  # fmt: skip
    ax.set_xticks(range(len(categories)), categories)
    ax.set_xlim(-0.6, len(categories) - 0.4)
    ax.grid(True, axis="y", which="major", alpha=0.3)


def _dot_figure(panels: dict[str, dict[str, dict[str, Stat]]], categories: Sequence[str],
                styles: Styles, labels: tuple[str, str, str], path: Path, log_y: bool,
                dense: float | None = None) -> Path | None:  # fmt: skip
    """Dot charts, one panel per key of ``panels`` (``{series: {category: Stat}}`` each) sharing
    y; ``labels``: x label, y label, title."""
    panels = {k: {s: c for s, c in p.items() if c} for k, p in panels.items()}
    panels = {k: p for k, p in panels.items() if p}
    if not panels:
        return None
    if not styles.distinct([s for p in panels.values() for s in p]):
        return None  # its series could not be told apart: the axes' own figures show them
    most = max(len(p) for p in panels.values())
    names = list(dict.fromkeys(s for p in panels.values() for s in p)) + [DENSE_ROW]
    width = max(3.2, 0.8 * len(categories) + 0.15 * most * len(categories))
    fig, axes = _figure(len(panels), names, width)
    for ax, (panel, values) in zip(axes[0], panels.items()):
        _dots(ax, categories, values, styles)
        if dense is not None:
            ax.axhline(dense, label=DENSE_ROW, **DENSE_STYLE)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(labels[0])
    axes[0][0].set_ylabel(labels[1])
    if log_y:
        shown = [s.mean for p in panels.values() for cells in p.values() for s in cells.values()]
        _log_axis(axes[0][0], shown + ([dense] if dense else []))
    return save_figure(fig, axes[0], labels[2], path)


def plot_pivot(table: Table, styles: Styles, ylabel: str, title: str, path: Path,
               log_y: bool = False) -> Path | None:  # fmt: skip
    """A :func:`.tables.pivot` table as a dot chart: one column per sparsity label."""
    columns = [(j, h) for j, h in enumerate(table.headers) if j and not h.endswith("published")]
    values = {row[0]: {h: row[j] for j, h in columns if isinstance(row[j], Stat)}
              for row in table.rows if row[0] != DENSE_ROW}  # fmt: skip
    dense = next((row[1] for row in table.rows if row[0] == DENSE_ROW), None)
    return _dot_figure({"": values}, [h for _, h in columns], styles, ("sparsity", ylabel, title),
                       path, log_y, dense)  # fmt: skip


def plot_axis(table: Table, styles: Styles, ylabel: str, title: str, path: Path,
              log_y: bool = False) -> Path | None:  # fmt: skip
    """An :func:`.tables.axis_table` as dot charts: the axis's values as x, one series per
    method row, one panel per sparsity."""
    key = table.headers[2].split("=", 1)[0]
    categories = [h.split("=", 1)[1] for h in table.headers[2:]]
    panels: dict[str, dict[str, dict[str, Stat]]] = {}
    for row in table.rows:
        cells = {c: v for c, v in zip(categories, row[2:]) if isinstance(v, Stat)}
        panels.setdefault(f"sparsity {row[1]}", {})[row[0]] = cells
    return _dot_figure(panels, categories, styles, (key, ylabel, title), path, log_y)


def _curves(items: Sequence[tuple[str, list[float]]]) -> list[tuple[list[float], list[str]]]:
    """Equal-length curves within :data:`SAME_CURVE` of one another in every point, merged."""
    curves: list[tuple[list[float], list[str]]] = []
    for name, values in items:
        same = next((c for c in curves if len(c[0]) == len(values)
                     and max(abs(a - b) for a, b in zip(c[0], values)) <= SAME_CURVE), None)  # fmt: skip
        if same is None:
            curves.append((values, [name]))
        else:
            same[1].append(name)
    return curves


def plot_block_sparsity(
    runs: Sequence[RunRecord], styles: Styles, title: str, path: Path
) -> Path | None:
    """The achieved share of zeros per decoder block, each distinct curve once; a schedule's
    per-block targets dashed; a uniform target as a dotted line."""
    runs = sorted((r for r in runs if r.per_block), key=lambda r: r.series_key)
    if not runs:
        return None
    achieved = _curves([(run_title(r, runs), r.per_block) for r in runs])
    targets = [(run_title(r, runs), r.per_block_target) for r in runs if r.per_block_target]
    targets = _curves(targets)
    names = [textwrap.fill(", ".join(n), 40) for _, n in achieved + targets]
    fig, axes = _figure(1, names, width=6.5, height=4.0)
    ax = axes[0][0]
    for k, (values, members) in enumerate(achieved):
        style = styles(members[0]) if len(members) == 1 else {
            "color": "0.2", "marker": MARKERS[k % len(MARKERS)], "fillstyle": "none"}  # fmt: skip
        label = textwrap.fill(", ".join(members), 40)
        ax.plot(range(len(values)), values, markersize=4, linewidth=1.2, label=label, **style)
    for k, (values, members) in enumerate(targets):
        ax.plot(range(len(values)), values, "x--", color="0.45", linewidth=1, markersize=4,
                label=textwrap.fill("target of " + ", ".join(members), 40), dashes=(4, 1 + k))  # fmt: skip
    uniform = {r.ratio for r in runs if not r.per_block_target and not math.isnan(r.ratio)}
    for ratio in sorted(uniform):
        ax.axhline(ratio, color="0.45", linestyle=":", linewidth=1, label=f"target {ratio:g}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("share of zero weights")
    return save_figure(fig, axes[0], title, path)


def plot_mask_comparison(
    runs: Sequence[RunRecord], image_name: str, title: str, path: Path
) -> Path | None:
    """The mask image of one Linear from each run, side by side."""
    runs = sorted((r for r in runs if image_name in r.mask_images), key=lambda r: r.series_key)
    if not runs:
        return None
    import matplotlib.image as mpimg

    fig, axes = pyplot().subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), dpi=100,
                                  squeeze=False, layout="constrained")  # fmt: skip
    for ax, r in zip(axes[0], runs):
        ax.imshow(mpimg.imread(r.mask_images[image_name]))
        ax.set_title(textwrap.fill(run_title(r, runs), 40), fontsize=9)
        ax.axis("off")
    return save_figure(fig, axes[0], title, path)
