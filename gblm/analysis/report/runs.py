"""Reading the run folders of a sweep into :class:`RunRecord` objects."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gblm.analysis.records import MASK_STATS_CSV, read_mask_stats_csv
from gblm.loggers.local import METRICS_FILE, killed
from gblm.methods.registry import method_entry


@dataclass
class RunRecord:
    """What the report needs from one run folder."""

    name: str  # the folder relative to the sweep directory
    # finished | failed | interrupted | running | killed (no process holds its run lock) |
    # unfinished (no metrics.json) | unreadable
    status: str = "unfinished"
    method: str = "?"  # the method label: ``gblm``, ``wanda+owl``, ``dsnot(wanda)``, ``gblm+admm``
    base: str = "?"  # the registered method (``method=`` of the run): ``gblm``, ``dsnot``
    model: str = "?"
    label: str = "?"
    ratio: float = float("nan")
    n: int = 0
    m: int = 0
    ppl_dense: float | None = None
    ppl_pruned: float | None = None
    zeroshot: float | None = None  # mean acc over tasks
    zeroshot_tasks: dict[str, float] = field(default_factory=dict)  # task -> acc
    achieved: float | None = None  # share of zeros over the pruned Linears
    timings: dict[str, float] = field(default_factory=dict)
    update_seconds: float | None = None  # the weight update's share of the prune stage
    peak_memory_bytes: int | None = None
    per_block: list[float] = field(default_factory=list)  # achieved share of zeros per block
    per_block_target: list[float] = field(default_factory=list)  # a schedule's targets, if any
    mask_images: dict[str, Path] = field(default_factory=dict)  # file name -> path
    mask_rows: list[dict] = field(default_factory=list)
    error: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # the run's config, flattened (a.b)
    config_hash: str | None = None  # the identity of its result-changing settings
    # the report's rows (:mod:`.axes`): in the headline tables and in an axis's table, with sort keys
    series: str = ""
    series_key: tuple = ()
    row: str = ""

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def total_time(self) -> float | None:
        if "total" in self.timings:
            return self.timings["total"]
        return sum(self.timings.values()) if self.timings else None


def is_baseline(method: str) -> bool:
    """Whether ``method`` is registered as no pruning at all (a ``_target_: null`` entry)."""
    try:
        return method_entry(method).target is None
    except KeyError:
        return False


def number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become tuples (hashable values)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    return flat


def _read_yaml(path: Path) -> Any:
    """The YAML (or JSON) file's content; None when it is missing or damaged."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _from_config(record: RunRecord, config: Any) -> None:
    """Fill method / model / sparsity from the resolved Hydra config (for runs without metrics)."""
    if not isinstance(config, dict):
        return
    record.settings = flatten(config)
    method, model, sparsity = config.get("method"), config.get("model"), config.get("sparsity")
    if isinstance(method, dict) and method.get("name"):
        record.method = record.base = str(method["name"])
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


def _floats(items: Any, key: str | None = None) -> list[float]:
    """The numbers of a list, in order; with ``key``, items may also be dicts holding one there."""
    items = items if isinstance(items, list) else []
    values = [item.get(key) if key and isinstance(item, dict) else item for item in items]
    return [float(v) for v in values if number(v) is not None]


def _from_metrics(record: RunRecord, metrics: dict) -> None:
    """Fill ``record`` from a run's ``metrics.json``."""
    record.status = str(metrics.get("status", "unknown"))
    # the label tells apart runs of one method with another plan or initial method (OWL, DSnoT)
    record.base = str(metrics.get("method", record.base))
    record.method = str(metrics.get("method_label") or record.base)
    record.config_hash = metrics.get("config_hash")
    record.model = str(metrics.get("model", record.model))
    if isinstance(metrics.get("sparsity"), dict):
        _set_sparsity(record, metrics["sparsity"])
        record.per_block_target = _floats(metrics["sparsity"].get("per_block_target"))
    ppl = metrics.get("ppl") or {}
    record.ppl_dense, record.ppl_pruned = number(ppl.get("dense")), number(ppl.get("pruned"))
    zeroshot = metrics.get("zeroshot") or {}
    record.zeroshot = number(zeroshot.get("mean_acc"))
    record.zeroshot_tasks = {
        str(task): float(row["acc"])
        for task, row in zeroshot.items()
        if isinstance(row, dict) and number(row.get("acc")) is not None
    }
    check = metrics.get("sparsity_check")
    check = check if isinstance(check, dict) else {}
    record.achieved = number(check.get("overall"))
    record.per_block = _floats(check.get("per_block"), "zero_share")  # floats or dicts
    record.timings = {
        str(k): float(v) for k, v in (metrics.get("timings") or {}).items() if number(v) is not None
    }
    record.update_seconds = number(metrics.get("reconstruct_seconds"))
    record.peak_memory_bytes = metrics.get("peak_memory_bytes")
    record.error = metrics.get("error")


def read_run(run_dir: Path, sweep_dir: Path) -> RunRecord:
    """One run folder -> :class:`RunRecord` (never raises on a damaged folder)."""
    record = RunRecord(name=run_dir.relative_to(sweep_dir).as_posix() or ".")
    config = _read_yaml(run_dir / ".hydra" / "config.yaml")
    if config is None:  # a run outside Hydra keeps its resolved config beside its metrics
        config = _read_yaml(run_dir / "config_resolved.json")  # JSON is YAML
    _from_config(record, config)
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.exists():
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
            error = None if isinstance(metrics, dict) else "not a JSON object"
        except (OSError, json.JSONDecodeError) as err:
            error = str(err)
        if error is not None:
            record.status, record.error = "unreadable", f"{METRICS_FILE}: {error}"
            return record
        _from_metrics(record, metrics)
        if reason := killed(run_dir, metrics):  # left "running", its lock free
            record.status, record.error = "killed", reason
    masks = run_dir / "masks"
    if masks.is_dir():
        record.mask_images = {p.name: p for p in sorted(masks.glob("*.png"))}
    try:
        record.mask_rows = read_mask_stats_csv(run_dir / MASK_STATS_CSV)
    except (OSError, ValueError, KeyError):  # none, or damaged
        pass
    return record


def find_runs(sweep_dir: str | Path) -> list[RunRecord]:
    """Every run folder under ``sweep_dir``, sorted by folder name."""
    sweep_dir = Path(sweep_dir).resolve()
    runs = []
    stack = [sweep_dir]
    while stack:
        folder = stack.pop()
        if (folder / METRICS_FILE).exists() or (folder / ".hydra").is_dir():
            runs.append(read_run(folder, sweep_dir))
            continue  # a run's own sub-folders (masks, model, wandb) hold no runs
        stack.extend(
            p
            for p in folder.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name != "wandb"
        )
    return sorted(runs, key=lambda r: r.name)
