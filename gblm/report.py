"""Sweep report: tables and plots comparing every run under a sweep directory.

``python -m gblm.report SWEEP_DIR [--out DIR]`` (default ``SWEEP_DIR/report``) reads each run
folder (any folder with a ``metrics.json``; a folder with a ``.hydra/`` but no ``metrics.json``
is an unfinished run) and writes:

- ``report.md``: per model, methods x sparsity tables of perplexity, zero-shot mean accuracy and
  wall time, the stage timings, the mask-structure measures of :mod:`gblm.pruning.stats`, and
  every run with its status (failed and unfinished runs are listed, never silently dropped);
- PNG plots: perplexity (log scale) and zero-shot accuracy against sparsity per method, the
  per-block share of zeros of each run, and the same Linear's mask side by side across methods;
- ``report.html``: the same content in one self-contained file (images embedded as base64), for
  readers without a W&B server.

Several runs in one cell (seeds, calibration sizes) are averaged and the cell says how many.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METRICS_FILE = "metrics.json"
METHOD_ORDER = ("dense", "magnitude", "sparsegpt", "wanda", "gblm")
MAX_MASK_LAYERS = 4  # mask comparisons per (model, sparsity)
TYPE_ORDER = ("q", "k", "v", "o", "gate", "up", "down", "fc1", "fc2", "other")


@dataclass
class RunRecord:
    """What the report needs from one run folder."""

    path: Path
    name: str  # the folder relative to the sweep directory
    status: str  # finished | failed | running | unfinished | unreadable
    method: str = "?"
    model: str = "?"
    label: str = "?"
    ratio: float = float("nan")
    n: int = 0
    m: int = 0
    ppl_dense: float | None = None
    ppl_pruned: float | None = None
    zeroshot: float | None = None  # mean acc over tasks
    zeroshot_norm: float | None = None
    zeroshot_tasks: dict[str, float] = field(default_factory=dict)  # task -> acc
    achieved: float | None = None  # share of zeros over the pruned Linears
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    per_block: list[float] = field(default_factory=list)
    mask_images: dict[str, Path] = field(default_factory=dict)  # file name -> path
    mask_rows: list[dict] = field(default_factory=list)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def total_time(self) -> float | None:
        if "total" in self.timings:
            return self.timings["total"]
        return sum(self.timings.values()) if self.timings else None


# ----------------------------------------------------------------------------- reading runs


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _from_config(record: RunRecord, config: Any) -> None:
    """Fill method / model / sparsity from the resolved Hydra config (for runs without metrics)."""
    if not isinstance(config, dict):
        return
    method, model, sparsity = config.get("method"), config.get("model"), config.get("sparsity")
    if isinstance(method, dict) and method.get("name"):
        record.method = str(method["name"])
    if isinstance(model, dict) and model.get("name"):
        record.model = str(model["name"])
    if isinstance(sparsity, dict) and "ratio" in sparsity:
        _set_sparsity(record, sparsity)


def _set_sparsity(record: RunRecord, sparsity: dict) -> None:
    record.ratio = float(sparsity.get("ratio", float("nan")))
    record.n, record.m = int(sparsity.get("n") or 0), int(sparsity.get("m") or 0)
    record.label = str(
        sparsity.get("label") or (f"{record.n}:{record.m}" if record.m else f"{record.ratio:g}")
    )


def _per_block(check: Any) -> list[float]:
    """``sparsity_check.per_block`` as floats in block order (floats or ``{"zero_share"}`` dicts)."""
    if not isinstance(check, dict) or not isinstance(check.get("per_block"), list):
        return []
    values = []
    for item in check["per_block"]:
        value = item.get("zero_share") if isinstance(item, dict) else item
        if _number(value) is not None:
            values.append(float(value))
    return values


def _mask_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    from gblm.pruning.stats import read_mask_stats_csv

    try:
        return read_mask_stats_csv(path)
    except (OSError, ValueError, KeyError):
        return []


def read_run(run_dir: Path, sweep_dir: Path) -> RunRecord:
    """One run folder -> :class:`RunRecord` (never raises on a damaged folder)."""
    record = RunRecord(
        path=run_dir, name=run_dir.relative_to(sweep_dir).as_posix() or ".", status="unfinished"
    )
    _from_config(record, _read_yaml(run_dir / ".hydra" / "config.yaml"))
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.exists():
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            record.status, record.error = "unreadable", f"{METRICS_FILE}: {err}"
            return record
        record.status = str(metrics.get("status", "unknown"))
        record.method = str(metrics.get("method", record.method))
        record.model = str(metrics.get("model", record.model))
        if isinstance(metrics.get("sparsity"), dict):
            _set_sparsity(record, metrics["sparsity"])
        ppl = metrics.get("ppl") or {}
        record.ppl_dense, record.ppl_pruned = _number(ppl.get("dense")), _number(ppl.get("pruned"))
        zeroshot = metrics.get("zeroshot") or {}
        record.zeroshot = _number(zeroshot.get("mean_acc"))
        record.zeroshot_norm = _number(zeroshot.get("mean_acc_norm"))
        record.zeroshot_tasks = {
            str(task): float(row["acc"])
            for task, row in zeroshot.items()
            if isinstance(row, dict) and _number(row.get("acc")) is not None
        }
        check = metrics.get("sparsity_check") or {}
        record.achieved = _number(check.get("overall")) if isinstance(check, dict) else None
        record.per_block = _per_block(check)
        record.timings = {
            str(k): float(v)
            for k, v in (metrics.get("timings") or {}).items()
            if _number(v) is not None
        }
        record.peak_memory_bytes = metrics.get("peak_memory_bytes")
        record.error = metrics.get("error")
    masks = run_dir / "masks"
    if masks.is_dir():
        record.mask_images = {p.name: p for p in sorted(masks.glob("*.png"))}
    record.mask_rows = _mask_rows(run_dir / "mask_stats.csv")
    return record


def find_runs(sweep_dir: str | Path, exclude: Iterable[Path] = ()) -> list[RunRecord]:
    """Every run folder under ``sweep_dir``, sorted by folder name; ``exclude`` folders skipped."""
    sweep_dir = Path(sweep_dir).resolve()
    skip = {Path(p).resolve() for p in exclude}
    runs = []
    stack = [sweep_dir]
    while stack:
        folder = stack.pop()
        if folder in skip:
            continue
        if (folder / METRICS_FILE).exists() or (folder / ".hydra").is_dir():
            runs.append(read_run(folder, sweep_dir))
            continue  # a run's own sub-folders (masks, model, wandb) hold no runs
        stack.extend(
            p
            for p in folder.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name != "wandb"
        )
    return sorted(runs, key=lambda r: r.name)


# ----------------------------------------------------------------------------- ordering and tables


def _method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _sparsity_key(run: RunRecord) -> tuple[int, float, int]:
    return (1 if run.m else 0, run.ratio if not math.isnan(run.ratio) else -1.0, run.n)


def _labels(runs: Sequence[RunRecord]) -> list[str]:
    by_label = {r.label: r for r in sorted(runs, key=_sparsity_key)}
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
    return f"{value / 2**30:.2f} GiB" if _number(value) is not None else ""


def _cell(values: Iterable[float | None], fmt: Callable[[float | None], str]) -> str:
    value, count = _mean(values)
    if value is None:
        return ""
    return fmt(value) + (f" (n={count})" if count > 1 else "")


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


def dense_baseline(runs: Sequence[RunRecord]) -> tuple[float | None, float | None, str]:
    """Dense perplexity (median over runs) and zero-shot (from method=dense runs), with a note."""
    dense_ppl = [r.ppl_dense for r in runs if r.ppl_dense is not None]
    dense_ppl += [
        r.ppl_pruned
        for r in runs
        if r.method == "dense" and r.ppl_pruned is not None and r.ppl_dense is None
    ]
    ppl = statistics.median(dense_ppl) if dense_ppl else None
    zeroshot, _ = _mean(r.zeroshot for r in runs if r.method == "dense")
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
    labels = _labels(runs)
    methods = sorted({r.method for r in runs if r.method != "dense"}, key=_method_key)
    rows = []
    if dense is not None:
        rows.append(["dense", *[fmt(dense)] * len(labels)])
    for method in methods:
        cells = [
            _cell((value(r) for r in runs if r.method == method and r.label == lab), fmt)
            for lab in labels
        ]
        rows.append([method, *cells])
    return Table(["method", *labels], rows)


def timings_table(runs: Sequence[RunRecord]) -> Table:
    """Mean seconds per stage for each (method, sparsity)."""
    stages = list(dict.fromkeys(k for r in runs for k in r.timings if k != "total"))
    keys = sorted({(r.method, r.label) for r in runs}, key=lambda k: (_method_key(k[0]), k[1]))
    rows = []
    for method, label in keys:
        group = [r for r in runs if r.method == method and r.label == label]
        cells = [_cell((r.timings.get(s) for r in group), fmt_seconds) for s in [*stages, "total"]]
        rows.append([method, label, *cells])
    return Table(["method", "sparsity", *stages, "total"], rows)


def zeroshot_table(runs: Sequence[RunRecord]) -> Table | None:
    """Mean accuracy (%) per task for each (method, sparsity); None when no run has zero-shot."""
    tasks = sorted({t for r in runs for t in r.zeroshot_tasks})
    if not tasks:
        return None
    keys = sorted(
        {(r.method, r.label) for r in runs if r.zeroshot_tasks},
        key=lambda k: (_method_key(k[0]), k[1]),
    )
    rows = []
    for method, label in keys:
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
        t for t in TYPE_ORDER if any(row.get("type") == t for r in with_rows for row in r.mask_rows)
    ]
    rows = []
    for run in sorted(with_rows, key=lambda r: (_method_key(r.method), _sparsity_key(r))):
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


def runs_table(runs: Sequence[RunRecord]) -> Table:
    rows = []
    for r in runs:
        rows.append(
            [
                r.name,
                r.status,
                r.method,
                r.label,
                r.model,
                fmt_ppl(r.ppl_dense),
                fmt_ppl(r.ppl_pruned),
                "" if r.achieved is None else f"{r.achieved:.4f}",
                fmt_acc(r.zeroshot),
                fmt_seconds(r.total_time),
                fmt_bytes(r.peak_memory_bytes),
            ]
        )
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


# ----------------------------------------------------------------------------- plots


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    points = [(r, value(r)) for r in runs if r.method != "dense" and value(r) is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=100)
    markers = ("s", "^", "D", "v", "P", "X")
    patterns = sorted({(r.n, r.m) for r, _ in points if r.m}, key=lambda p: (p[1], p[0]))
    for i, method in enumerate(sorted({r.method for r, _ in points}, key=_method_key)):
        color = f"C{i}"
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
                    markers[j % len(markers)],
                    color=color,
                    markerfacecolor="none",
                    markersize=9,
                    label=f"{method} {n}:{m}",
                )
    if dense is not None:
        ax.axhline(dense, color="grey", linestyle="--", linewidth=1, label="dense")
    if log_y:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda y, _: f"{y:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("sparsity (share of weights pruned)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_block_sparsity(runs: Sequence[RunRecord], title: str, path: Path) -> Path | None:
    """The share of zeros per decoder block, one line per run."""
    runs = [r for r in runs if r.per_block]
    if not runs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=100)
    from matplotlib.ticker import MaxNLocator

    for i, r in enumerate(sorted(runs, key=lambda r: _method_key(r.method))):
        style = "os^Dv"[i % 5] + "-"
        ax.plot(
            range(len(r.per_block)),
            r.per_block,
            style,
            markersize=4,
            label=f"{r.method} ({r.name})",
        )
    targets = sorted({r.ratio for r in runs if not math.isnan(r.ratio)})
    for target in targets:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    low = min([*targets, *(min(r.per_block) for r in runs)])
    high = max([*targets, *(max(r.per_block) for r in runs)])
    ax.set_ylim(low - 0.02, high + 0.02)  # a small deviation from the target stays small
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder block")
    ax.set_ylabel("share of zero weights")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_mask_comparison(
    runs: Sequence[RunRecord], image_name: str, title: str, path: Path
) -> Path | None:
    """The mask image of one Linear from each run, side by side."""
    runs = [
        r for r in sorted(runs, key=lambda r: _method_key(r.method)) if image_name in r.mask_images
    ]
    if not runs:
        return None
    plt = _pyplot()
    import matplotlib.image as mpimg

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), dpi=100, squeeze=False)
    for ax, r in zip(axes[0], runs):
        ax.imshow(mpimg.imread(r.mask_images[image_name]))
        ax.set_title(
            r.method if sum(x.method == r.method for x in runs) == 1 else f"{r.method} ({r.name})",
            fontsize=10,
        )
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- rendering


@dataclass
class Section:
    """A heading and its content in order: paragraphs (str), tables, and images (PNG paths)."""

    title: str
    level: int = 2
    blocks: list[str | Table | Path] = field(default_factory=list)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(title: str, sections: Sequence[Section], out_dir: Path) -> str:
    """The report as Markdown; images are linked by their path relative to ``out_dir``."""
    lines = [f"# {title}", ""]
    for s in sections:
        lines += ["#" * s.level + " " + s.title, ""]
        for block in s.blocks:
            if isinstance(block, Table):
                lines.append("| " + " | ".join(_md_escape(h) for h in block.headers) + " |")
                lines.append("|" + "---|" * len(block.headers))
                lines += [
                    "| " + " | ".join(_md_escape(c) for c in row) + " |" for row in block.rows
                ]
            elif isinstance(block, Path):
                lines.append(f"![{block.stem}]({block.relative_to(out_dir).as_posix()})")
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
"""


def render_html(title: str, sections: Sequence[Section]) -> str:
    """The report as one self-contained HTML page (images inlined as base64 data URIs)."""
    esc = html.escape
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>",
    ]
    for s in sections:
        parts.append(f"<h{s.level}>{esc(s.title)}</h{s.level}>")
        for block in s.blocks:
            if isinstance(block, Table):
                parts.append(
                    "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in block.headers) + "</tr>"
                )
                parts += [
                    "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                    for row in block.rows
                ]
                parts.append("</table>")
            elif isinstance(block, Path):
                data = base64.b64encode(block.read_bytes()).decode("ascii")
                parts.append(f"<img alt='{esc(block.stem)}' src='data:image/png;base64,{data}'>")
            else:
                parts.append(f"<p>{esc(block)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the report


def _model_sections(model: str, runs: Sequence[RunRecord], out_dir: Path) -> list[Section]:
    """Tables and plots of one model's finished runs."""
    slug = _slug(model)
    dense_ppl, dense_zeroshot, note = dense_baseline(runs)
    main = Section(f"Model {model}")
    main.blocks.append(
        f"{len(runs)} finished run(s). Rows: methods; columns: sparsity. A cell averaging several "
        "runs (seeds, calibration settings) says how many (n=)."
    )
    if note:
        main.blocks.append(note)
    main.blocks += [
        "Perplexity (lower is better):",
        pivot(runs, lambda r: r.ppl_pruned, fmt_ppl, dense_ppl),
    ]
    main.blocks.append(
        plot_vs_sparsity(
            runs,
            lambda r: r.ppl_pruned,
            dense_ppl,
            "perplexity (log scale)",
            f"{model}: perplexity vs sparsity",
            out_dir / f"ppl_vs_sparsity_{slug}.png",
            log_y=True,
        )
    )
    if any(r.zeroshot is not None for r in runs):
        main.blocks += [
            "Zero-shot mean accuracy over tasks (%):",
            pivot(runs, lambda r: r.zeroshot, fmt_acc, dense_zeroshot),
        ]
        main.blocks.append(
            plot_vs_sparsity(
                runs,
                lambda r: r.zeroshot,
                dense_zeroshot,
                "zero-shot mean accuracy",
                f"{model}: zero-shot accuracy vs sparsity",
                out_dir / f"zeroshot_vs_sparsity_{slug}.png",
            )
        )
    main.blocks += [
        "Wall time of the whole run:",
        pivot(runs, lambda r: r.total_time, fmt_seconds, None),
    ]
    main.blocks = [b for b in main.blocks if b is not None]

    sections = [main]
    per_task = zeroshot_table(runs)
    if per_task is not None:
        sections.append(Section("Zero-shot accuracy per task (%)", level=3, blocks=[per_task]))
    sections.append(Section("Stage timings", level=3, blocks=[timings_table(runs)]))
    structure = structure_table(runs)
    if structure is not None:
        sections.append(
            Section(
                "Mask structure",
                level=3,
                blocks=[
                    "column_structure: the std of the per-column share pruned relative to that of a random mask "
                    "of the same sparsity (1 = no structure; larger = whole input channels pruned together), "
                    "size-weighted over the Linears of each type.",
                    structure,
                ],
            )
        )
    blocks = Section("Per-block sparsity and masks", level=3)
    for label in _labels(runs):
        group = [r for r in runs if r.label == label and r.method != "dense"]
        blocks.blocks.append(
            plot_block_sparsity(
                group,
                f"{model}, sparsity {label}: zeros per block",
                out_dir / f"block_sparsity_{slug}_{_slug(label)}.png",
            )
        )
        for name in sorted({name for r in group for name in r.mask_images})[:MAX_MASK_LAYERS]:
            layer = name.removesuffix(".png")
            blocks.blocks.append(
                plot_mask_comparison(
                    group,
                    name,
                    f"{model}, sparsity {label}: {layer}",
                    out_dir / f"masks_{slug}_{_slug(label)}_{_slug(layer)}.png",
                )
            )
    blocks.blocks = [b for b in blocks.blocks if b is not None]
    if blocks.blocks:
        sections.append(blocks)
    return sections


def build_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and the plots for ``sweep_dir``; returns ``out_dir``."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"Sweep directory {sweep_dir} does not exist.")
    out = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    runs = find_runs(sweep_dir, exclude=[out])
    finished = [r for r in runs if r.finished]
    others = [r for r in runs if not r.finished]

    sections = [
        Section(
            "Summary",
            blocks=[
                f"Sweep {sweep_dir.resolve()}: {len(runs)} run folder(s), {len(finished)} finished, "
                f"{len(others)} failed or unfinished."
            ],
        )
    ]
    for model in sorted({r.model for r in finished}):
        sections += _model_sections(model, [r for r in finished if r.model == model], out)
    if others:
        rows = [
            [
                r.name,
                r.status,
                r.method,
                r.label,
                r.model,
                r.error.splitlines()[0] if r.error else "",
            ]
            for r in others
        ]
        sections.append(
            Section(
                "Failed and unfinished runs",
                blocks=[
                    "Runs without a metrics.json (still running, killed, or crashed before writing it) or whose "
                    "status is not finished. They are left out of every table and plot above.",
                    Table(["run", "status", "method", "sparsity", "model", "error"], rows),
                ],
            )
        )
    sections.append(Section("All runs", blocks=[runs_table(runs)]))

    title = f"gblm sweep report: {sweep_dir.resolve().name}"
    (out / "report.md").write_text(render_markdown(title, sections, out), encoding="utf-8")
    (out / "report.html").write_text(render_html(title, sections), encoding="utf-8")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gblm.report", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "sweep_dir", type=Path, help="a sweep directory (or any folder of run folders)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default SWEEP_DIR/report)"
    )
    args = parser.parse_args(argv)
    try:
        out = build_report(args.sweep_dir, args.out)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"Wrote {out / 'report.md'} and {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
