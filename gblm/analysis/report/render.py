"""Rendering the report's sections: Markdown (images and table exports linked), one
self-contained HTML page (images inlined), and each table as CSV (numbers unformatted, a
repeat's std and n in columns of their own) and LaTeX (booktabs) in ``tables/``."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from gblm.analysis.report.tables import Table
from gblm.utils import atomic_write_text

TABLES_DIR = "tables"


@dataclass
class Section:
    """A heading and its content in order: paragraphs (str), tables, and images (PNG paths)."""

    title: str
    level: int = 2
    blocks: list[str | Table | Path] = field(default_factory=list)


def _frame(table: Table) -> pd.DataFrame:
    return pd.DataFrame(table.text(), columns=table.headers)


def write_exports(table: Table, out_dir: Path) -> None:
    """``tables/<name>.csv`` and ``tables/<name>.tex`` (booktabs rules, ``±`` as ``$\\pm$``)."""
    folder = out_dir / TABLES_DIR
    folder.mkdir(exist_ok=True)
    atomic_write_text(folder / f"{table.name}.csv", table.numbers().to_csv(index=False))
    align = "".join("r" if any(c and c[0].isdigit() for c in col) else "l"
                    for col in zip(*table.text()))  # fmt: skip
    latex = _frame(table).to_latex(index=False, escape=True, column_format=align or None)
    atomic_write_text(folder / f"{table.name}.tex", latex.replace("±", "$\\pm$"))


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in table.headers) + " |"]
    lines.append("|" + "---|" * len(table.headers))
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in table.text()]
    exports = f"{TABLES_DIR}/{table.name}"
    lines += [
        "",
        f"{table.note + ' ' if table.note else ''}([CSV]({exports}.csv), [LaTeX]({exports}.tex))",
    ]
    return lines


def render_markdown(title: str, sections: Sequence[Section], out_dir: Path) -> str:
    """The report as Markdown; images and exports are linked relative to ``out_dir``."""
    lines = [f"# {title}", ""]
    for s in sections:
        lines += ["#" * s.level + " " + s.title, ""]
        for block in s.blocks:
            if isinstance(block, Table):
                lines += _md_table(block)
            elif isinstance(block, Path):
                lines.append(f"![{block.stem}]({block.relative_to(out_dir).as_posix()})")
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 0.3em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
.note { font-size: 0.85em; color: #555; margin-bottom: 1.5em; }
"""


def _html_block(block: str | Table | Path) -> str:
    if isinstance(block, Table):
        note = f"<p class='note'>{html.escape(block.note)}</p>" if block.note else ""
        return _frame(block).to_html(index=False, border=0) + note
    if isinstance(block, Path):
        data = base64.b64encode(block.read_bytes()).decode("ascii")
        return f"<img alt='{html.escape(block.stem)}' src='data:image/png;base64,{data}'>"
    return f"<p>{html.escape(block)}</p>"


def render_html(title: str, sections: Sequence[Section]) -> str:
    """The report as one self-contained HTML page (images inlined as base64 data URIs)."""
    esc = html.escape
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>",
    ]
    for s in sections:
        parts.append(f"<h{s.level}>{esc(s.title)}</h{s.level}>")
        parts += [_html_block(block) for block in s.blocks]
    parts.append("</body></html>")
    return "\n".join(parts)
