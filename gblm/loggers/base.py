"""The logger interface every run-record sink follows, and a logger that does nothing.

The local files (``metrics.json`` and friends, :mod:`gblm.loggers.local`) are the record of a
run; loggers such as W&B mirror them. A logger must never raise into the run: a failed upload
costs a dashboard, not an experiment.
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

    def start(self, config: Mapping) -> None:
        """Open the run with its resolved configuration."""

    def log_metrics(self, metrics: Mapping) -> None:
        """Record scalar metrics (nested dicts allowed)."""

    def log_table(self, name: str, rows: Sequence[Mapping]) -> None:
        """Record a table given as rows of ``{column: value}``."""

    def log_images(self, name: str, paths: Iterable[str | PathLike]) -> None:
        """Record image files under one name."""

    def log_stage(self, event: str, stage: str, seconds: float | None, done: int) -> None:
        """A stage of the run ``"start"``-ed or ``"end"``-ed (with its seconds), live; ``done``
        counts the stages finished so far."""

    def log_artifact(self, name: str, kind: str, paths: Iterable[str | PathLike]) -> None:
        """Record files as one versioned artifact (``kind``: e.g. ``run-record``)."""

    def finish(self, exit_code: int = 0) -> None:
        """Close the run; ``exit_code != 0`` marks it failed."""


class NullLogger:
    """A logger that records nothing (``logger=none``, and the fallback when a logger fails)."""

    def start(self, config: Mapping) -> None:
        pass

    def log_metrics(self, metrics: Mapping) -> None:
        pass

    def log_table(self, name: str, rows: Sequence[Mapping]) -> None:
        pass

    def log_images(self, name: str, paths: Iterable[str | PathLike]) -> None:
        pass

    def log_stage(self, event: str, stage: str, seconds: float | None, done: int) -> None:
        pass

    def log_artifact(self, name: str, kind: str, paths: Iterable[str | PathLike]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class GuardedLogger:
    """A logger whose failures are warnings: remote logging is optional, the run's records are not.

    Args:
        factory: builds the logger; if that raises, a :class:`NullLogger` stands in.

    Every call goes through :meth:`call`, which logs a warning (and remembers it in
    ``warnings``) instead of raising.
    """

    def __init__(self, factory: Callable[[], Any]) -> None:
        self.warnings: list[str] = []
        self.inner: Any = self.call("logger setup", factory) or NullLogger()

    def call(self, what: str, function: Callable[[], Any]) -> Any:
        try:
            return function()
        except Exception as err:  # a logger must never break a run
            message = f"logger: {what} failed ({type(err).__name__}: {err}); the run goes on"
            log.warning(message)
            self.warnings.append(message)
            return None

    def failures(self) -> list[str]:
        """Every failure so far: this guard's and those the logger kept itself (its list
        ``failures``, where it has one)."""
        kept = getattr(self.inner, "failures", None)
        return [*self.warnings, *(kept if isinstance(kept, list) else [])]

    def location(self) -> dict[str, str]:
        """Where the remote record went (the logger's mapping ``location``: a URL, an offline
        folder), else nothing."""
        where = getattr(self.inner, "location", None)
        return dict(where) if isinstance(where, Mapping) else {}

    def start(self, config: Mapping) -> None:
        self.call("start", lambda: self.inner.start(config))

    def log_metrics(self, metrics: Mapping) -> None:
        self.call("log_metrics", lambda: self.inner.log_metrics(metrics))

    def log_table(self, name: str, rows: Sequence[Mapping]) -> None:
        self.call("log_table", lambda: self.inner.log_table(name, rows))

    def log_images(self, name: str, paths: Iterable[str | PathLike]) -> None:
        self.call("log_images", lambda: self.inner.log_images(name, paths))

    def log_stage(self, event: str, stage: str, seconds: float | None, done: int) -> None:
        self.call("log_stage", lambda: self.inner.log_stage(event, stage, seconds, done))

    def log_artifact(self, name: str, kind: str, paths: Iterable[str | PathLike]) -> None:
        self.call("log_artifact", lambda: self.inner.log_artifact(name, kind, paths))

    def finish(self, exit_code: int = 0) -> None:
        self.call("finish", lambda: self.inner.finish(exit_code=exit_code))
