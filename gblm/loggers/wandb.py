"""Weights & Biases mirror of a run's record.

Every call is guarded: a W&B failure (no network, bad key, server error, missing package) logs
one warning and the run goes on. ``mode="auto"`` logs online when an API key is configured and
offline otherwise; an offline run lies under ``dir/wandb/offline-run-*`` for ``wandb sync``. A
failed online start is retried once offline, so that nothing is lost.
"""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from gblm.loggers.base import guarded

MODES = ("auto", "online", "offline", "disabled")
DEFAULT_HOST = "https://api.wandb.ai"
# W&B's limits: artifact names of these characters, names and groups of at most 128 characters,
# tags and job types of 1 to 64.
ARTIFACT_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
NAME_LIMIT, TAG_LIMIT = 128, 64
PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")

log = logging.getLogger(__name__)


def _host(env: Mapping[str, str] = os.environ) -> str:
    return env.get("WANDB_BASE_URL", DEFAULT_HOST)


def api_key_configured(env: Mapping[str, str] = os.environ) -> bool:
    """Whether W&B could log in without asking (no network touched): ``WANDB_API_KEY`` set, or
    an entry for the host (``WANDB_BASE_URL``) in the netrc file (``NETRC`` or ``~/.netrc``)."""
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(_host(env)).hostname or ""
    try:
        entry = netrc.netrc(env.get("NETRC") or str(Path.home() / ".netrc")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(mode: str, env: Mapping[str, str] = os.environ) -> str:
    """``auto`` -> ``WANDB_MODE`` when set, else online with a key and offline without."""
    if mode not in MODES:
        raise ValueError(f"logger.mode={mode!r}: allowed values are {', '.join(MODES)}.")
    if mode != "auto":
        return mode
    if env.get("WANDB_MODE") in MODES[1:]:
        return env["WANDB_MODE"]
    return "online" if api_key_configured(env) else "offline"


def fit(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, a cut one ending in a hash of the whole (so two long
    names that differ only at their ends stay apart)."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 9]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def artifact_name(text: str) -> str:
    """A valid W&B artifact name: each run of characters other than letters, digits, ``-_.``
    becomes one ``_`` (``method=gblm,seed=1`` -> ``method_gblm_seed_1``); at most 128 of them."""
    return fit(ARTIFACT_CHARS.sub("_", text).strip("_") or "run", NAME_LIMIT)


def server_reachable() -> bool:
    """Whether the W&B server accepts a connection within 3 seconds (``wandb.init`` waits 90 s
    for one it cannot reach); True behind a proxy, which only W&B itself can use."""
    if any(os.environ.get(k) for k in PROXIES):
        return True
    url = urlparse(_host())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=3.0).close()
    except OSError:
        return False
    return True


def flatten(metrics: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"ppl": {"dense": 1.0}}`` -> ``{"ppl/dense": 1.0}``, keeping numbers, bools and strings
    (lists and None are dropped). Non-finite floats stay: W&B keeps them (the summary shows a
    diverged run's ``ppl/pruned`` as Infinity), while a chart skips them."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
    return flat


class WandbLogger:
    """Mirror a run to W&B; every method is safe to call whatever happened before.

    ``group`` groups runs in the UI (one sweep), ``job_type`` is what the run does (the method),
    ``mode`` as :func:`resolve_mode`, ``dir`` where W&B writes its ``wandb/`` folder (the run dir),
    ``resume_id`` the W&B run to go on with (that of an unfinished earlier attempt of the run).
    Every name is cut to W&B's limits, never refused.
    """

    def __init__(
        self,
        project: str,
        entity: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        name: str | None = None,
        job_type: str | None = None,
        mode: str = "auto",
        dir: str | os.PathLike | None = None,
        resume_id: str | None = None,
    ) -> None:
        self.project, self.entity = project, entity
        self.group = fit(group, NAME_LIMIT) if group else None
        self.tags = list(dict.fromkeys(fit(str(t), TAG_LIMIT) for t in tags if str(t)))
        self.name = fit(name, NAME_LIMIT) if name else None
        self.job_type = fit(job_type, TAG_LIMIT) if job_type else None
        self.mode = resolve_mode(mode)
        self.dir = Path(dir) if dir is not None else None
        self.resume_id = resume_id
        self.run: Any = None  # the wandb Run, once started
        self.failures: list[str] = []  # one line per call that failed
        self.location: dict[str, str] = {}  # where the run went: url, or offline sync_dir

    def _guard(self, what: str, call: Callable[[], Any]) -> Any:
        return guarded(f"W&B {what}", call, self.failures)

    def _init(self, config: Mapping, mode: str) -> Any:
        import wandb

        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        return wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group,
            tags=self.tags or None,
            name=self.name,
            job_type=self.job_type,
            mode=mode,
            dir=str(self.dir) if self.dir is not None else None,
            config=dict(config),
            id=self.resume_id,
            resume="allow" if self.resume_id else None,
            reinit="finish_previous",  # a Hydra multirun keeps one process for many runs
            settings=wandb.Settings(silent=True),
        )

    def start(self, config: Mapping) -> None:
        """Open the W&B run with the resolved configuration (a plain nested dict)."""
        if self.mode == "disabled":
            return
        if self.mode == "online" and not server_reachable():
            log.warning("W&B server %s cannot be reached: the run is logged offline (upload it "
                        "later with `wandb sync`).", _host())  # fmt: skip
            self.mode = "offline"
        self.run = self._guard(f"init ({self.mode})", lambda: self._init(config, self.mode))
        if self.run is None and self.mode == "online":
            self.run = self._guard("init (offline retry)", lambda: self._init(config, "offline"))
        if self.run is not None:
            self.location = self._guard("run location", self._location) or {}

    def _location(self) -> dict[str, str]:
        """``{"id", "sync_dir"}`` for an offline run (``wandb sync`` it later), else ``{"id", "url"}``."""
        if self.run.offline:
            return {"id": self.run.id, "sync_dir": str(self.run.sync_dir)}
        return {"id": self.run.id, **({"url": str(self.run.url)} if self.run.url else {})}

    def _log(self, what: str, data: Callable[[], dict]) -> None:
        """``run.log(data())``, guarded; nothing before the start, nor when ``data()`` is empty."""
        if self.run is None:
            return

        def log() -> None:
            logged = data()
            if logged:
                self.run.log(logged)

        self._guard(what, log)

    def log_metrics(self, metrics: Mapping) -> None:
        """The metrics :func:`flatten`-ed (``ppl/pruned``); they also land in the summary."""
        self._log("log_metrics", lambda: flatten(metrics))

    def log_table(self, name: str, rows: Sequence[Mapping]) -> None:
        """Rows of ``{column: value}`` as a ``wandb.Table``; columns in first-seen order."""

        def table() -> dict:
            import wandb

            columns = list(dict.fromkeys(k for row in rows for k in row))
            data = [[row.get(c) for c in columns] for row in rows]
            return {name: wandb.Table(columns=columns, data=data)} if rows else {}

        self._log(f"log_table {name!r}", table)

    def log_images(self, name: str, paths: Iterable[str | os.PathLike]) -> None:
        """Image files under one key, each captioned with its file stem."""

        def images() -> dict:
            import wandb

            pictures = [wandb.Image(str(p), caption=Path(p).stem) for p in paths]
            return {name: pictures} if pictures else {}

        self._log(f"log_images {name!r}", images)

    def log_stage(self, event: str, stage: str, seconds: float | None, done: int) -> None:
        """Live: ``stage`` (running, or just ended), ``stages_done``, and on its end
        ``stage_s/<stage>`` (seconds), so a long run shows where it is."""
        data: dict[str, Any] = {"stage": stage, "stages_done": done}
        if event == "end" and seconds is not None:
            data[f"stage_s/{stage}"] = seconds
        self._log("log_stage", lambda: data)

    def log_artifact(self, name: str, kind: str, paths: Iterable[str | os.PathLike]) -> None:
        """The files (those that exist) as one artifact ``name`` of type ``kind``, both made
        valid (:func:`artifact_name`)."""
        files = [Path(p) for p in paths if Path(p).is_file()]
        if self.run is None or not files:
            return

        def call() -> None:
            import wandb

            artifact = wandb.Artifact(artifact_name(name), type=artifact_name(kind))
            for path in files:
                artifact.add_file(str(path), name=path.name)
            self.run.log_artifact(artifact)

        self._guard(f"log_artifact {name!r}", call)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (``exit_code != 0`` marks it failed in W&B). Safe to call twice."""
        run, self.run = self.run, None
        if run is not None:
            self._guard("finish", lambda: run.finish(exit_code=exit_code))
