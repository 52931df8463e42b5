"""Assembling the report: the sections of each model and the summary (:func:`build_report`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from gblm.analysis.report import plots, tables
from gblm.analysis.report.axes import name_series, swept_axes
from gblm.analysis.report.render import Section, render_html, render_markdown, write_exports
from gblm.analysis.report.runs import RunRecord, find_runs, is_baseline
from gblm.utils import atomic_write_text, writable_dir

MAX_MASK_LAYERS = 4  # mask comparisons per (model, sparsity)
PUBLISHED = Path(__file__).with_name("published.yaml")

_STRUCTURE_NOTE = (
    "column_structure: the std of the per-column share pruned relative to that of a random mask "
    "of the same sparsity (1 = no structure; larger = whole input channels pruned together), "
    "size-weighted over the Linears of each type."
)
_FAILED_NOTE = (
    "Runs without a metrics.json (still running, killed, or crashed before writing it) or whose "
    "status is not finished. They are left out of every table and plot above."
)
_PPL = ("perplexity", lambda r: r.ppl_pruned, 1.0)
_ZEROSHOT = ("zero-shot mean accuracy (%)", lambda r: r.zeroshot, 100.0)


def published_ppl(model: str, runs: Sequence[RunRecord]) -> tuple[dict, str]:
    """The published perplexities of ``model`` (``{(method label or "dense", sparsity label or
    None): value}``) when its runs evaluated the dataset they were published on, and their sources."""
    data = yaml.safe_load(PUBLISHED.read_text(encoding="utf-8"))
    if not any(r.settings.get("eval.perplexity.dataset") == data["eval_dataset"] for r in runs):
        return {}, ""
    shown = {r.series for r in runs if not is_baseline(r.base)} | {tables.DENSE_ROW}
    labels = set(tables.labels(runs)) | {None}
    rows = [row for row in data["ppl"] if row[0] == model and row[1] in shown and row[2] in labels]
    sources = "; ".join(data["sources"][s] for s in dict.fromkeys(row[4] for row in rows))
    published = {(row[1], row[2]): float(row[3]) for row in rows}
    return published, f"Published: {sources}." if rows else ""


def _metric(name: str, runs: Sequence[RunRecord], metric: tuple, dense: float | None, title: str,
            styles: plots.Styles, out_dir: Path, published: tuple[dict, str] = ({}, ""),
            log_y: bool = False) -> list:  # fmt: skip
    """A metric's methods x sparsity table (published numbers beside ours) and its dot chart."""
    label, value, scale = metric
    table = tables.pivot(name, runs, value, dense, scale, published[0])
    table.note = published[1]
    figure = plots.plot_pivot(table, styles, label, title, out_dir / f"{name}.png", log_y)
    return [table, figure]


def _headline_section(
    model: str, runs: Sequence[RunRecord], axes: list[str], styles: plots.Styles, out_dir: Path
) -> Section:
    """Perplexity, zero-shot accuracy and wall time: methods x sparsity, with their figures."""
    slug = plots.slug(model)
    dense_ppl, dense_zeroshot, note = tables.dense_baseline(runs)
    main = Section(f"Model {model}")
    main.blocks.append(
        f"{len(runs)} finished run(s). Rows: methods; columns: sparsity. A cell averages repeats "
        "(seeds) only and then reads mean ± std (n=runs); numbers have two decimals below 1,000."
    )
    if axes:
        main.blocks.append(
            "This sweep also varies " + ", ".join(axes) + ". A row names the value of each of "
            "them that tells apart runs of one method; each has its own table and figure below."
        )
    if note:
        main.blocks.append(note)
    main.blocks += ["Perplexity (lower is better):"]
    main.blocks += _metric(f"ppl_{slug}", runs, _PPL, dense_ppl, f"{model}: perplexity", styles,
                           out_dir, published_ppl(model, runs), log_y=True)  # fmt: skip
    if any(r.zeroshot is not None for r in runs):
        main.blocks += ["Zero-shot mean accuracy over tasks (%):"]
        main.blocks += _metric(f"zeroshot_{slug}", runs, _ZEROSHOT, dense_zeroshot,
                               f"{model}: zero-shot accuracy", styles, out_dir)  # fmt: skip
    main.blocks += [
        "Wall time of the whole run (s):",
        tables.pivot(f"time_{slug}", runs, lambda r: r.total_time, None),
    ]
    main.blocks = [b for b in main.blocks if b is not None]
    return main


def _block_section(
    model: str, runs: Sequence[RunRecord], styles: plots.Styles, out_dir: Path
) -> Section | None:
    """Per sparsity label: the per-block sparsity plot and table, and the mask comparisons."""
    slug = plots.slug(model)
    section = Section("Per-block sparsity and masks", level=3)
    for label in tables.labels(runs):
        group = [r for r in runs if r.label == label and not is_baseline(r.base)]
        name = f"blocks_{slug}_{plots.slug(label)}"
        section.blocks.append(plots.plot_block_sparsity(
            group, styles, f"{model}, sparsity {label}: zeros per block", out_dir / f"{name}.png"))  # fmt: skip
        per_block = tables.block_sparsity_table(name, group)
        if per_block is not None:
            section.blocks += [
                f"Share of zero weights per decoder block (%), sparsity {label} (achieved; a "
                "per-block schedule's target beside it; runs with equal values share a column):",
                per_block,
            ]
        for image in sorted({name for r in group for name in r.mask_images})[:MAX_MASK_LAYERS]:
            layer = image.removesuffix(".png")
            section.blocks.append(plots.plot_mask_comparison(
                group, image, f"{model}, sparsity {label}: {layer}",
                out_dir / f"masks_{slug}_{plots.slug(label)}_{plots.slug(layer)}.png"))  # fmt: skip
    section.blocks = [b for b in section.blocks if b is not None]
    return section if section.blocks else None


def _axis_section(model: str, runs: Sequence[RunRecord], key: str, axes: list[str],
                  styles: plots.Styles, out_dir: Path) -> Section:  # fmt: skip
    """One ablation axis: perplexity (and zero-shot accuracy) per (method, sparsity) x value."""
    section = Section(f"Ablation: {key}", level=3)
    for (ylabel, value, scale), what in (
        (_PPL, "Pruned perplexity"),
        (_ZEROSHOT, "Zero-shot mean accuracy (%)"),
    ):
        name = f"{ylabel.split()[0].replace('-', '')}_{plots.slug(model)}_{plots.slug(key)}"
        table = tables.axis_table(name, runs, key, axes, value, scale)
        if table is None or not any(isinstance(c, tables.Stat) for row in table.rows for c in row):
            continue
        title, path = f"{model}: {ylabel} vs {key}", out_dir / f"{name}.png"
        section.blocks += [
            f"{what} for each value of {key} (rows: the methods and sparsities that swept it, "
            "with the other axes' values that tell their runs apart; repeats averaged):",
            table,
            plots.plot_axis(table, styles, ylabel, title, path, log_y=value is _PPL[1]),
        ]
    section.blocks = [b for b in section.blocks if b is not None]
    return section


def model_sections(model: str, runs: Sequence[RunRecord], out_dir: Path) -> list[Section]:
    """Tables and plots of one model's finished runs."""
    axes = swept_axes(runs)
    name_series(runs, axes)
    styles = plots.Styles(tables.ordered([r for r in runs if not is_baseline(r.base)], "series"))
    slug = plots.slug(model)
    sections = [_headline_section(model, runs, axes, styles, out_dir)]
    sections += [_axis_section(model, runs, key, axes, styles, out_dir) for key in axes]
    per_task = tables.zeroshot_table(f"zeroshot_tasks_{slug}", runs)
    if per_task is not None:
        sections.append(Section("Zero-shot accuracy per task (%)", level=3, blocks=[per_task]))
    sections.append(
        Section("Stage timings", level=3, blocks=[tables.timings_table(f"stages_{slug}", runs)])
    )
    structure = tables.structure_table(f"structure_{slug}", runs)
    if structure is not None:
        sections.append(Section("Mask structure", level=3, blocks=[_STRUCTURE_NOTE, structure]))
    blocks = _block_section(model, runs, styles, out_dir)
    if blocks is not None:
        sections.append(blocks)
    return sections


def counted_once(runs: Sequence[RunRecord]) -> tuple[list[RunRecord], str]:
    """The runs, each set of settings once (the first folder of each ``config_hash``: the same
    job found in two sweeps under one folder), and a sentence naming the copies left out."""
    kept: dict[str, RunRecord] = {}
    unique, copies = [], []
    for r in runs:
        first = kept.setdefault(r.config_hash, r) if r.config_hash else r
        (unique if first is r else copies).append(r if first is r else f"{r.name} (= {first.name})")
    if not copies:
        return unique, ""
    return unique, (f"{len(copies)} run folder(s) repeat the settings of another (the same job in "
                    "two sweeps) and are counted once: " + "; ".join(copies) + ".")  # fmt: skip


def _shown(path: Path) -> str:
    """A sweep folder as the report names it: relative to the working directory, else its name."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.resolve().name


def build_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md``, ``report.html``, the figures and ``tables/`` for ``sweep_dir``;
    returns ``out_dir`` (default ``sweep_dir/report``)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"Sweep directory {sweep_dir} does not exist.")
    out = writable_dir(out_dir if out_dir is not None else sweep_dir / "report", "--out")
    runs = find_runs(sweep_dir)  # the report's own folder holds no run
    finished, copies = counted_once([r for r in runs if r.finished])
    others = [r for r in runs if not r.finished]

    summary = (f"Sweep {_shown(sweep_dir)}: {len(runs)} run folder(s), "
               f"{sum(r.finished for r in runs)} finished, {len(others)} failed or unfinished.")  # fmt: skip
    sections = [Section("Summary", blocks=[summary] + ([copies] if copies else []))]
    for model in sorted({r.model for r in finished}):
        sections += model_sections(model, [r for r in finished if r.model == model], out)
    if others:
        failed = tables.failed_table("failed", others)
        sections.append(Section("Failed and unfinished runs", blocks=[_FAILED_NOTE, failed]))
    sections.append(Section("All runs", blocks=[tables.runs_table("runs", runs)]))

    for block in (b for s in sections for b in s.blocks if isinstance(b, tables.Table)):
        write_exports(block, out)
    title = f"gblm sweep report: {sweep_dir.resolve().name}"
    atomic_write_text(out / "report.md", render_markdown(title, sections, out))
    atomic_write_text(out / "report.html", render_html(title, sections))
    return out
