"""Local run records: written first, atomically, so no remote logger failure can lose them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gblm.utils import atomic_write_json

METRICS_FILE = "metrics.json"


class LocalLogger:
    """Writes ``metrics.json`` (and other records) into the run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        path = self.run_dir / METRICS_FILE
        atomic_write_json(path, metrics)
        return path

    def write_json(self, name: str, data: Any) -> Path:
        path = self.run_dir / name
        atomic_write_json(path, data)
        return path


def read_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())
