"""The interface of a remote logger (W&B), one that does nothing, and the guard around it.

The local files (:mod:`gblm.loggers.local`) are a run's record; a remote logger only mirrors
them, so it must never raise into the run: a failed upload costs a dashboard, not an experiment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from os import PathLike
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger("gblm")


@runtime_checkable
class Logger(Protocol):
    """What ``run`` calls, in this order: ``start``, any ``log_*``, then ``finish``."""

    def start(self, config: Mapping) -> None: ...
    def log_metrics(self, metrics: Mapping) -> None: ...
    def log_table(self, name: str, rows: Sequence[Mapping]) -> None: ...
    def log_images(self, name: str, paths: Iterable[str | PathLike]) -> None: ...
    def log_artifact(self, name: str, kind: str, paths: Iterable[str | PathLike]) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...  # exit_code != 0: the run failed

    def log_stage(self, event: str, stage: str, seconds: float | None, done: int) -> None:
        """A stage ``"start"``-ed or ``"end"``-ed (with its seconds), live; ``done`` counts the
        stages finished so far."""


class NullLogger(Logger):
    """Records nothing (``logger=none``, and the stand-in when a logger cannot be built)."""


def guarded(what: str, function: Callable[[], Any], failures: list[str]) -> Any:
    """``function()``, or None when it raises: the failure is logged and kept in ``failures``."""
    try:
        return function()
    except Exception as err:  # a logger must never break a run
        message = f"{what} failed ({type(err).__name__}: {err}); the run goes on"
        log.warning(message)
        failures.append(message)
        return None


class GuardedLogger:
    """A logger (built by ``factory``, a :class:`NullLogger` if that raises) whose every method
    is :func:`guarded`: its failures are warnings, kept in ``warnings``."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.warnings: list[str] = []
        self.inner: Any = self.call("logger setup", factory) or NullLogger()

    def call(self, what: str, function: Callable[[], Any]) -> Any:
        return guarded(f"logger: {what}", function, self.warnings)

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("_") or not hasattr(Logger, name):
            raise AttributeError(name)
        return lambda *args, **kw: self.call(name, lambda: getattr(self.inner, name)(*args, **kw))

    def failures(self) -> list[str]:
        """This guard's failures and those the logger kept itself (its list ``failures``)."""
        kept = getattr(self.inner, "failures", None)
        return [*self.warnings, *(kept if isinstance(kept, list) else [])]

    def location(self) -> dict[str, str]:
        """Where the remote record went (the logger's mapping ``location``), else nothing."""
        where = getattr(self.inner, "location", None)
        return dict(where) if isinstance(where, Mapping) else {}
