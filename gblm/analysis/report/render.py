"""Rendering the report's sections as Markdown (images linked) and as one self-contained HTML
page (images inlined)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gblm.analysis.report.tables import Table


@dataclass
class Section:
    """A heading and its content in order: paragraphs (str), tables, and images (PNG paths)."""

    title: str
    level: int = 2
    blocks: list[str | Table | Path] = field(default_factory=list)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(table: Table) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in table.headers) + " |"]
    lines.append("|" + "---|" * len(table.headers))
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in table.rows]
    return lines


def render_markdown(title: str, sections: Sequence[Section], out_dir: Path) -> str:
    """The report as Markdown; images are linked by their path relative to ``out_dir``."""
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
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
"""


def _html_block(block: str | Table | Path) -> list[str]:
    esc = html.escape
    if isinstance(block, Table):
        parts = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in block.headers) + "</tr>"]
        parts += [
            "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows
        ]
        parts.append("</table>")
        return parts
    if isinstance(block, Path):
        data = base64.b64encode(block.read_bytes()).decode("ascii")
        return [f"<img alt='{esc(block.stem)}' src='data:image/png;base64,{data}'>"]
    return [f"<p>{esc(block)}</p>"]


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
            parts += _html_block(block)
    parts.append("</body></html>")
    return "\n".join(parts)
