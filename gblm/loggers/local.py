"""Local run records, and the lock that tells a live run dir from one left by a dead run.

The records are written first, atomically, so no remote logger failure can lose them. A run holds
an exclusive ``flock`` on ``.run.lock`` in its run dir from before ``metrics.json`` says
``"running"`` until after its final record is written (:func:`run_lock`). The kernel releases it
when the process ends in any way (``kill -9`` included), so "is this run alive?" is "is that lock
held?" (:func:`run_alive`): a record left ``running`` with the lock free was killed.

Over NFS, Linux emulates ``flock`` with POSIX locks that hold across clients (``local_lock``
mounts and Lustre ``localflock`` keep them per node; a lost client's lock lasts until its lease
ends). Where the filesystem has no locks at all, the run warns and runs without one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gblm.errors import ConfigError
from gblm.utils import atomic_write_json

log = logging.getLogger("gblm.loggers.local")

METRICS_FILE = "metrics.json"
LOCK_FILE = ".run.lock"
# flock's errors: the lock is held by another process; the filesystem has no locks.
_HELD = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


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
    """The run record in ``run_dir``, or None when there is none.

    Raises:
        ConfigError: the record exists but cannot be read (empty, truncated, not a JSON object:
            a full disk or a partial copy); the message names the file and what to do.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        record, reason = None, f"{type(err).__name__}: {err}"
    else:
        reason = None if isinstance(record, dict) else "not a JSON object"
    if reason is not None:
        raise ConfigError(
            f"{path} cannot be read ({reason}): the run record is damaged. Add overwrite=true to "
            "run there again (the damaged record is replaced), or move the folder away."
        )
    return record


def process_record() -> dict[str, Any]:
    """Who writes this run, ``{"host", "pid"}``: named when another process is refused its dir."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir``'s run lock while inside (the run dir is created if needed).

    Raises:
        ConfigError: another process holds it: a live run is writing ``run_dir``.
    """
    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by exec'd children
    try:
        taken = _flock(fd, fcntl.LOCK_EX)
        if taken is False:
            owner = (_read_quietly(Path(run_dir)) or {}).get("process") or {}
            raise ConfigError(
                f"{run_dir} is in use: process {owner.get('pid')} on {owner.get('host')} is "
                "running there. Wait for it or stop it, or choose another run dir."
            )
        if taken is None:
            log.warning("%s: no file locks on this filesystem; the run is not locked", run_dir)
        yield
    finally:
        os.close(fd)  # releases the lock


def run_alive(run_dir: str | Path) -> bool:
    """Whether a live process holds ``run_dir``'s run lock (see :func:`run_lock`).

    The probe is a shared, non-blocking lock on a read-only descriptor: it needs no write access
    and creates nothing, so any reader of the run dir can ask.
    """
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: no run has held this dir's lock
        return False
    try:
        return _flock(fd, fcntl.LOCK_SH) is False
    finally:
        os.close(fd)


def _flock(fd: int, operation: int) -> bool | None:
    """``flock`` without waiting: True taken, False held by another, None no locks here."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in _HELD:
            return False
        if err.errno in _NO_LOCKS:
            return None
        raise
    return True


def _read_quietly(run_dir: Path) -> dict[str, Any] | None:
    try:
        return read_metrics(run_dir)
    except (OSError, ValueError):
        return None
