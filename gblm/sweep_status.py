"""A sweep's state, ``sweep_summary.json``: each job's status from what its dir holds, its
``job_status.json`` (:mod:`gblm.sweep` writes it when the job ends), its ``metrics.json`` and its
run lock. The summary is rewritten after every job, so it is current even if the sweep is killed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from gblm.loggers.local import METRICS_FILE, killed, run_alive
from gblm.utils import atomic_write_json, file_lock, read_json

PLAN_FILE = "sweep_plan.json"
SUMMARY_FILE = "sweep_summary.json"
JOB_STATUS_FILE = "job_status.json"
# finished: ran to the end (in this launch, or an earlier one not relaunched since); skipped: found
# finished with the same config; failed: raised; running: its process holds the run lock;
# incomplete: its run ended without a result (interrupted, killed) or never began; pending: no dir.
STATUSES = ("finished", "skipped", "failed", "running", "incomplete", "pending")


def job_entry(
    num: int | None, overrides: Sequence[str], job_dir: Path, sweep_dir: Path, launch_id: str | None
) -> dict[str, Any]:
    """One job of the summary: its overrides, dir, status and error (and its run name and ppl).

    The status is ``job_status.json``'s when the launch ``launch_id`` wrote it; else ``running``
    while a process holds the run lock, ``finished`` or ``failed`` as ``metrics.json`` says, else
    ``incomplete``; ``pending`` with no job dir.
    """
    entry = {"num": num, "overrides": list(overrides), "dir": None, "status": "pending",
             "this_launch": False, "error": None}  # fmt: skip
    if not ((job_dir / ".hydra").is_dir() or (job_dir / METRICS_FILE).exists()):
        return entry
    record = read_json(job_dir / JOB_STATUS_FILE) or {}
    metrics = read_json(job_dir / METRICS_FILE) or {}
    this_launch = launch_id is not None and record.get("launch_id") == launch_id
    status, error = metrics.get("status"), None
    if this_launch:
        status, error = record["status"], record.get("error")
    elif reason := killed(job_dir, metrics):  # the record of a run whose process is gone
        status, error = "incomplete", reason
    elif run_alive(job_dir):
        status = "running"
    elif status not in ("finished", "failed"):
        status, error = "incomplete", metrics.get("error") or status
    if status == "failed":
        error = error or metrics.get("error") or record.get("error")
    entry.update(dir=os.path.relpath(job_dir, sweep_dir), status=status, error=error)
    entry.update(this_launch=this_launch, **{k: metrics[k] for k in ("run_name", "ppl") if k in metrics})  # fmt: skip
    return entry


def summarize(sweep_dir: str | Path) -> dict[str, Any]:
    """The state of every job of the last launch's ``sweep_plan.json`` in ``sweep_dir``; without
    a plan (another sweeper), of every job dir found (one with ``.hydra/overrides.yaml``)."""
    sweep_dir = Path(sweep_dir).absolute()
    plan = read_json(sweep_dir / PLAN_FILE)
    launch_id = plan.get("launch_id") if plan else None
    if plan:
        planned = [(job["num"], job["overrides"], sweep_dir / job["dir"]) for job in plan["jobs"]]
    else:
        found = sorted(p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml"))
        planned = [(None, OmegaConf.load(d / ".hydra/overrides.yaml"), d) for d in found]
    jobs = [job_entry(n, [str(o) for o in ov], d, sweep_dir, launch_id) for n, ov, d in planned]
    return {
        "sweep_dir": str(sweep_dir),
        "launch_id": launch_id,
        "updated": now(),
        "total": len(jobs),
        "counts": {status: sum(job["status"] == status for job in jobs) for status in STATUSES},
        **{s: [job["dir"] for job in jobs if job["status"] == s] for s in STATUSES[:-1]},
        "jobs": jobs,
    }


def write_summary(sweep_dir: str | Path) -> dict[str, Any]:
    """Summarize the sweep and write ``sweep_summary.json`` atomically (jobs may end at once)."""
    sweep_dir = Path(sweep_dir).absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(sweep_dir / ".sweep_summary"):  # hidden: <sweep dir>/.sweep_summary.lock
        summary = summarize(sweep_dir)
        atomic_write_json(sweep_dir / SUMMARY_FILE, summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the console: counts, then every failed job with its error and log."""
    counts = summary["counts"]
    parts = [f"{counts[s]} {s}" for s in STATUSES if counts[s] or s in ("finished", "failed")]
    lines = [f"sweep {summary['sweep_dir']}: {summary['total']} job(s): " + ", ".join(parts)]
    for job in summary["jobs"]:
        if job["status"] in ("failed", "incomplete"):
            log_file = Path(summary["sweep_dir"]) / job["dir"] / "run.log"
            label = " ".join(o for o in job["overrides"] if not o.startswith("experiment="))
            error = job["error"] or "-"
            lines.append(f"  {job['status']} #{job['num']} {label}: {error} ({log_file})")
    lines.append(f"summary: {Path(summary['sweep_dir']) / SUMMARY_FILE}")
    lines.append(f"report: python -m gblm.report {summary['sweep_dir']}")
    return "\n".join(lines)


def format_comparison(summary: dict[str, Any]) -> str:
    """The finished jobs by their dir, dense and pruned perplexity, the best pruned first; empty
    when no job has a perplexity."""
    rows = []
    for job in summary["jobs"]:
        ppl = job.get("ppl") or {}
        if job["status"] in ("finished", "skipped") and ("pruned" in ppl or "dense" in ppl):
            name = job["dir"] or job.get("run_name") or "-"
            rows.append((ppl.get("pruned", ppl.get("dense")), name, ppl.get("dense"), ppl.get("pruned")))  # fmt: skip
    if not rows:
        return ""
    # no perplexity or a NaN one (a diverged job) last: NaN compares false, unsorting the rest
    rows.sort(key=lambda r: (r[0] is None or math.isnan(r[0]), r[0] if r[0] is not None else 0.0))
    width = max(len("job"), *(len(r[1]) for r in rows))

    def fmt(v: float | None) -> str:
        return "-" if v is None else (f"{v:.2f}" if abs(v) < 1e4 else f"{v:.3g}")

    lines = [f"  {'job':<{width}}  {'dense ppl':>10}  {'pruned ppl':>10}"]
    lines += [f"  {r[1]:<{width}}  {fmt(r[2]):>10}  {fmt(r[3]):>10}" for r in rows]
    return "\n".join(lines)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
