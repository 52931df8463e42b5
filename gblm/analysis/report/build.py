"""Assembling the report: the sections of each model, the summary, and ``python -m gblm.report``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gblm.analysis.report import plots, tables
from gblm.analysis.report.axes import swept_axes
from gblm.analysis.report.render import Section, render_html, render_markdown
from gblm.analysis.report.runs import RunRecord, find_runs, is_baseline
from gblm.utils import atomic_write_text

DESCRIPTION = "Sweep report: tables and plots comparing every run under a sweep directory."
MAX_MASK_LAYERS = 4  # mask comparisons per (model, sparsity)

_STRUCTURE_NOTE = (
    "column_structure: the std of the per-column share pruned relative to that of a random mask "
    "of the same sparsity (1 = no structure; larger = whole input channels pruned together), "
    "size-weighted over the Linears of each type."
)
_FAILED_NOTE = (
    "Runs without a metrics.json (still running, killed, or crashed before writing it) or whose "
    "status is not finished. They are left out of every table and plot above."
)


def _metric_blocks(
    runs: Sequence[RunRecord],
    value,
    fmt,
    dense: float | None,
    texts: tuple[str, str, str],
    path: Path,
    log_y: bool = False,
) -> list:
    """A metric's caption, its methods x sparsity table and its plot against sparsity.

    ``texts``: the caption, the plot's y label and the plot's title (before "vs sparsity").
    """
    caption, ylabel, title = texts
    return [
        caption,
        tables.pivot(runs, value, fmt, dense),
        plots.plot_vs_sparsity(runs, value, dense, ylabel, f"{title} vs sparsity", path, log_y),
    ]


def _headline_section(model: str, runs: Sequence[RunRecord], out_dir: Path) -> Section:
    """Perplexity, zero-shot accuracy and wall time: methods x sparsity, with their plots."""
    slug = plots.slug(model)
    dense_ppl, dense_zeroshot, note = tables.dense_baseline(runs)
    main = Section(f"Model {model}")
    main.blocks.append(
        f"{len(runs)} finished run(s). Rows: methods; columns: sparsity. A cell averaging several "
        "runs (seeds, calibration settings) says how many (n=)."
    )
    if note:
        main.blocks.append(note)
    main.blocks += _metric_blocks(
        runs,
        lambda r: r.ppl_pruned,
        tables.fmt_ppl,
        dense_ppl,
        ("Perplexity (lower is better):", "perplexity (log scale)", f"{model}: perplexity"),
        out_dir / f"ppl_vs_sparsity_{slug}.png",
        log_y=True,
    )
    if any(r.zeroshot is not None for r in runs):
        main.blocks += _metric_blocks(
            runs,
            lambda r: r.zeroshot,
            tables.fmt_acc,
            dense_zeroshot,
            (
                "Zero-shot mean accuracy over tasks (%):",
                "zero-shot mean accuracy",
                f"{model}: zero-shot accuracy",
            ),
            out_dir / f"zeroshot_vs_sparsity_{slug}.png",
        )
    main.blocks += [
        "Wall time of the whole run:",
        tables.pivot(runs, lambda r: r.total_time, tables.fmt_seconds, None),
    ]
    main.blocks = [b for b in main.blocks if b is not None]
    return main


def _block_section(model: str, runs: Sequence[RunRecord], out_dir: Path) -> Section | None:
    """Per sparsity label: the per-block sparsity plot and table, and the mask comparisons."""
    slug = plots.slug(model)
    section = Section("Per-block sparsity and masks", level=3)
    for label in tables.labels(runs):
        group = [r for r in runs if r.label == label and not is_baseline(r.method)]
        section.blocks.append(
            plots.plot_block_sparsity(
                group,
                f"{model}, sparsity {label}: zeros per block",
                out_dir / f"block_sparsity_{slug}_{plots.slug(label)}.png",
            )
        )
        per_block = tables.block_sparsity_table(group)
        if per_block is not None:
            section.blocks += [
                f"Share of zero weights per decoder block, sparsity {label} (achieved; a "
                "per-block schedule's target beside it):",
                per_block,
            ]
        for name in sorted({name for r in group for name in r.mask_images})[:MAX_MASK_LAYERS]:
            layer = name.removesuffix(".png")
            section.blocks.append(
                plots.plot_mask_comparison(
                    group,
                    name,
                    f"{model}, sparsity {label}: {layer}",
                    out_dir / f"masks_{slug}_{plots.slug(label)}_{plots.slug(layer)}.png",
                )
            )
    section.blocks = [b for b in section.blocks if b is not None]
    return section if section.blocks else None


def _axis_section(model: str, runs: Sequence[RunRecord], key: str, out_dir: Path) -> Section:
    """One ablation axis: perplexity (and zero-shot accuracy) per (method, sparsity) x value."""
    slug = f"{plots.slug(model)}_{plots.slug(key)}"
    section = Section(f"Ablation: {key}", level=3)
    section.blocks += [
        f"Pruned perplexity for each value of {key} (rows: the method and sparsity pairs that "
        "swept it; other settings as in their runs, seeds averaged):",
        tables.axis_table(runs, key, lambda r: r.ppl_pruned, tables.fmt_ppl),
        plots.plot_axis(
            runs,
            key,
            lambda r: r.ppl_pruned,
            "perplexity (log scale)",
            f"{model}: perplexity vs {key}",
            out_dir / f"ppl_vs_{slug}.png",
            log_y=True,
        ),  # fmt: skip
    ]
    if any(r.zeroshot is not None for r in runs):
        section.blocks += [
            f"Zero-shot mean accuracy (%) for each value of {key}:",
            tables.axis_table(runs, key, lambda r: r.zeroshot, tables.fmt_acc),
        ]
    section.blocks = [b for b in section.blocks if b is not None]
    return section


def model_sections(model: str, runs: Sequence[RunRecord], out_dir: Path) -> list[Section]:
    """Tables and plots of one model's finished runs."""
    sections = [_headline_section(model, runs, out_dir)]
    axes = swept_axes(runs)
    if axes:
        sections[0].blocks.insert(1, (
            "This sweep also varies " + ", ".join(axes) + ": the cells above average over those "
            "values; each has its own ablation table and plot below."
        ))  # fmt: skip
    sections += [_axis_section(model, runs, key, out_dir) for key in axes]
    per_task = tables.zeroshot_table(runs)
    if per_task is not None:
        sections.append(Section("Zero-shot accuracy per task (%)", level=3, blocks=[per_task]))
    sections.append(Section("Stage timings", level=3, blocks=[tables.timings_table(runs)]))
    structure = tables.structure_table(runs)
    if structure is not None:
        sections.append(Section("Mask structure", level=3, blocks=[_STRUCTURE_NOTE, structure]))
    blocks = _block_section(model, runs, out_dir)
    if blocks is not None:
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

    summary = (
        f"Sweep {sweep_dir.resolve().name}: {len(runs)} run folder(s), {len(finished)} finished, "
        f"{len(others)} failed or unfinished."
    )
    sections = [Section("Summary", blocks=[summary])]
    for model in sorted({r.model for r in finished}):
        sections += model_sections(model, [r for r in finished if r.model == model], out)
    if others:
        failed = tables.failed_table(others)
        sections.append(Section("Failed and unfinished runs", blocks=[_FAILED_NOTE, failed]))
    sections.append(Section("All runs", blocks=[tables.runs_table(runs)]))

    title = f"gblm sweep report: {sweep_dir.resolve().name}"
    atomic_write_text(out / "report.md", render_markdown(title, sections, out))
    atomic_write_text(out / "report.html", render_html(title, sections))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gblm.report SWEEP_DIR [--out DIR]``; 2 when the sweep folder is missing."""
    parser = argparse.ArgumentParser(prog="python -m gblm.report", description=DESCRIPTION)
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
