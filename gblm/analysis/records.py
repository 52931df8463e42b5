"""The mask-statistics records of a run, written atomically: ``mask_stats.csv`` (one row per
pruned Linear: :data:`LINEAR_FIELDS` first, then any extra keys sorted; None as an empty cell) and
``mask_stats_blocks.json`` (``{"per_block": [...], "per_type": [...]}``)."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from gblm.analysis.stats import LINEAR_FIELDS
from gblm.utils import atomic_write_json, atomic_write_text

MASK_STATS_CSV = "mask_stats.csv"
_TEXT_FIELDS = ("name", "type")  # kept as strings when read back


def write_mask_stats_csv(per_linear: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write the per-Linear rows as CSV (columns :data:`LINEAR_FIELDS` first), atomically."""
    rows = list(per_linear)
    fields = list(LINEAR_FIELDS) + sorted({k for r in rows for k in r} - set(LINEAR_FIELDS))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fields)  # None and a missing key: an empty cell
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def _parse_cell(value: str):
    """A CSV cell back to None, bool, int, float or (failing those) the string itself."""
    if value == "":
        return None
    if value in ("True", "False"):
        return value == "True"
    for parse in (int, float):
        try:
            return parse(value)
        except ValueError:
            pass
    return value


def read_mask_stats_csv(path: str | os.PathLike) -> list[dict]:
    """Read :func:`write_mask_stats_csv` output back, with numbers and booleans restored."""
    with open(path, newline="") as handle:
        return [
            {k: (v if k in _TEXT_FIELDS else _parse_cell(v)) for k, v in row.items()}
            for row in csv.DictReader(handle)
        ]


def write_mask_stats_blocks(
    per_block: Sequence[dict], per_type: Sequence[dict], path: str | os.PathLike
) -> Path:
    """Write the per-block and per-type summaries as ``{"per_block", "per_type"}`` JSON."""
    return atomic_write_json(path, {"per_block": list(per_block), "per_type": list(per_type)})
