"""Local run records, and the lock that tells a live run dir from one left by a dead run.

A run holds an exclusive ``flock`` on ``.run.lock`` in its run dir from before ``metrics.json``
says ``"running"`` until after its final record is written (:func:`run_lock`). The kernel releases
it when the process ends in any way (``kill -9`` included), so "is this run alive?" is "is that
lock held?" (:func:`run_alive`): a record left ``running`` with the lock free was killed. Over NFS,
Linux emulates ``flock`` with POSIX locks that hold across clients; where the filesystem has no
locks at all, the run warns and runs without one.
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
from gblm.utils import atomic_write_json, read_json

log = logging.getLogger("gblm.loggers.local")

METRICS_FILE = "metrics.json"
LOCK_FILE = ".run.lock"
_HELD = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)  # flock: another process holds it
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)  # flock: no locks on this filesystem


def write_metrics(run_dir: str | Path, metrics: dict[str, Any]) -> None:
    """``metrics.json`` in ``run_dir``, written atomically (the folder made if missing)."""
    atomic_write_json(Path(run_dir) / METRICS_FILE, metrics)


def read_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """The run record in ``run_dir``, or None when there is none.

    Raises:
        ConfigError: the record exists but is no JSON object (a full disk, a partial copy).
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        reason = None if isinstance(record, dict) else "not a JSON object"
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = f"{type(err).__name__}: {err}"
    if reason is not None:
        raise ConfigError(
            f"{path} cannot be read ({reason}): the run record is damaged. Add overwrite=true to "
            "run there again (the damaged record is replaced), or move the folder away."
        )
    return record


def process_record() -> dict[str, Any]:
    """Who writes this run, ``{"host", "pid"}``: named when another process is refused its dir."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def in_use(run_dir: str | Path, record: Any) -> str:
    """The refusal of a run dir that a live process writes, named by the ``process``
    (:func:`process_record`) of its ``record`` (``metrics.json``, damaged or not)."""
    owner = (record.get("process") if isinstance(record, dict) else None) or {}
    return (
        f"{run_dir} is in use: process {owner.get('pid')} on {owner.get('host')} is running "
        "there. Wait for it or stop it, or choose another run dir."
    )


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
            raise ConfigError(in_use(run_dir, read_json(path.parent / METRICS_FILE)))
        if taken is None:
            log.warning("%s: no file locks on this filesystem; the run is not locked", run_dir)
        yield
    finally:
        os.close(fd)  # releases the lock


def run_alive(run_dir: str | Path) -> bool:
    """Whether a live process holds ``run_dir``'s run lock: probed with a shared lock on a
    read-only descriptor, which needs no write access and creates nothing."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: no run has held this dir's lock
        return False
    try:
        return _flock(fd, fcntl.LOCK_SH) is False
    finally:
        os.close(fd)


def killed(run_dir: str | Path, metrics: dict) -> str | None:
    """Why a record left ``running`` has no run behind it (no process holds its run lock):
    ``killed: process <pid> on <host> is gone``; None for any other record, or a live run."""
    if metrics.get("status") != "running" or run_alive(run_dir):
        return None
    owner = metrics.get("process") or {}
    return f"killed: process {owner.get('pid')} on {owner.get('host')} is gone"


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
