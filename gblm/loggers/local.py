"""Local run records: written first, atomically, so no remote logger failure can lose them.

A run being written is ``"status": "running"`` in ``metrics.json`` with the ``process`` that owns
it (host, pid and the process's start time, so a reused pid is not mistaken for it), and a
``.heartbeat`` file in the run dir touched every :data:`HEARTBEAT_SECONDS`. A record left
``running`` by a process that is gone (``kill -9``, a lost node) is told apart from a live run by
:func:`owner_alive`: on the owner's host by its pid, elsewhere by the heartbeat's age.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gblm.utils import atomic_write_json

METRICS_FILE = "metrics.json"
HEARTBEAT_FILE = ".heartbeat"
HEARTBEAT_SECONDS = 30.0
# A heartbeat older than this means its run is gone (seen from another host than the run's).
STALE_SECONDS = 20 * HEARTBEAT_SECONDS


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


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def process_record() -> dict[str, Any]:
    """Who writes this run: ``{"host", "pid", "start"}`` of the current process."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def _pid_alive(pid: int, start: str | None) -> bool:
    now = _process_start(pid)
    if now is not None:
        return start is None or now == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path("/proc/self/stat").exists()  # with /proc, no stat file means no process


def owner_alive(run_dir: str | Path, metrics: dict[str, Any] | None) -> bool:
    """Whether the process that left ``metrics`` ``running`` in ``run_dir`` still runs.

    On the owner's host the pid (and its start time) decides; from another host, a heartbeat
    younger than :data:`STALE_SECONDS`. A record that is not ``running`` has no live owner.
    """
    if not metrics or metrics.get("status") != "running":
        return False
    owner = metrics.get("process") or {}
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        return _pid_alive(owner["pid"], owner.get("start"))
    try:
        age = time.time() - (Path(run_dir) / HEARTBEAT_FILE).stat().st_mtime
    except OSError:
        return False
    return age < STALE_SECONDS


@contextlib.contextmanager
def heartbeat(run_dir: str | Path, every: float = HEARTBEAT_SECONDS) -> Iterator[None]:
    """Touch ``run_dir/.heartbeat`` every ``every`` seconds (a daemon thread) while inside."""
    path = Path(run_dir) / HEARTBEAT_FILE
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(OSError):
                path.touch()
            if stop.wait(every):
                return

    thread = threading.Thread(target=beat, name="gblm-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(OSError):
            path.unlink()
