"""Weights & Biases mirror of a run's record.

The local files are written first (:mod:`gblm.loggers.local`); this logger only mirrors them, so
every call is guarded: a W&B failure (no network, bad key, server error, missing package) logs one
warning and the run goes on. ``mode="auto"`` logs online when an API key is configured
(``WANDB_API_KEY`` or a netrc entry for the W&B host) and offline otherwise; an offline run lies
under ``dir/wandb/offline-run-*`` and can be uploaded later with ``wandb sync``. When an online
start fails, the logger retries once offline so that nothing is lost.
"""

from __future__ import annotations

import hashlib
import logging
import math
import netrc
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")
DEFAULT_HOST = "https://api.wandb.ai"
# What W&B accepts: artifact names of these characters, at most 128 of them; run names and
# groups of at most 128 characters; tags and job types of 1 to 64.
ARTIFACT_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
NAME_LIMIT, TAG_LIMIT = 128, 64

T = TypeVar("T")


def api_key_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether W&B could log in without asking: ``WANDB_API_KEY`` set, or a netrc entry for the host.

    The host is ``WANDB_BASE_URL`` (default :data:`DEFAULT_HOST`); the netrc file is ``NETRC`` or
    ``~/.netrc``. No network is touched.
    """
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", DEFAULT_HOST)).hostname or ""
    path = env.get("NETRC") or str(Path.home() / ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(mode: str, env: Mapping[str, str] | None = None) -> str:
    """``auto`` -> ``WANDB_MODE`` when set, else online with a key and offline without."""
    if mode not in MODES:
        raise ValueError(f"logger.mode={mode!r}: allowed values are {', '.join(MODES)}.")
    if mode != "auto":
        return mode
    env = os.environ if env is None else env
    if env.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return env["WANDB_MODE"]
    return "online" if api_key_configured(env) else "offline"


def fit(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters; a cut one ends in a hash of the whole, so two long
    names that differ only at their ends stay different."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{text[: limit - 9]}-{digest}"


def artifact_name(text: str) -> str:
    """A valid W&B artifact name made from ``text``: every run of other characters than
    letters, digits, ``-``, ``_`` and ``.`` becomes one ``_`` (``run-0_method=gblm,seed=1`` ->
    ``run-0_method_gblm_seed_1``), at most 128 characters."""
    return fit(ARTIFACT_CHARS.sub("_", text).strip("_") or "run", NAME_LIMIT)


def server_reachable(env: Mapping[str, str] | None = None, timeout: float = 3.0) -> bool:
    """Whether the W&B server (``WANDB_BASE_URL``, default :data:`DEFAULT_HOST`) accepts a
    connection within ``timeout`` seconds; True behind a proxy, which only W&B itself can use.

    ``wandb.init`` waits up to 90 s for a server it cannot reach before it gives up; this probe
    costs at most ``timeout``.
    """
    env = os.environ if env is None else env
    if any(env.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                "ALL_PROXY", "all_proxy")):  # fmt: skip
        return True
    url = urlparse(env.get("WANDB_BASE_URL", DEFAULT_HOST))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def flatten(metrics: Mapping, prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """``{"ppl": {"dense": 1.0}}`` -> ``{"ppl/dense": 1.0}``, keeping numbers, bools and strings.

    Lists and None are dropped (tables go through :meth:`WandbLogger.log_table`), and so are
    non-finite floats, which W&B charts cannot show.
    """
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name, sep))
        elif isinstance(value, float) and not math.isfinite(value):
            continue
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
    return flat


class WandbLogger:
    """Mirror a run to W&B; every method is safe to call whatever happened before.

    Args:
        project: W&B project.
        entity: team or user; None lets W&B use the account default.
        group: groups runs in the UI (e.g. one sweep).
        tags: free labels (e.g. the method and sparsity).
        name: run name; None lets W&B pick one.
        job_type: what the run does (gblm: the method), to filter and group by in the UI.
        mode: ``auto``, ``online``, ``offline`` or ``disabled`` (see :func:`resolve_mode`).
        dir: where W&B writes its ``wandb/`` folder (the run directory, normally).
        settings: extra ``wandb.Settings`` fields.
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
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.project = project
        self.entity = entity
        # Every name within W&B's limits by construction: a long one is cut, never refused.
        self.group = fit(group, NAME_LIMIT) if group else None
        self.tags = list(dict.fromkeys(fit(str(t), TAG_LIMIT) for t in tags if str(t)))
        self.name = fit(name, NAME_LIMIT) if name else None
        self.job_type = fit(job_type, TAG_LIMIT) if job_type else None
        self.mode = resolve_mode(mode)
        self.dir = Path(dir) if dir is not None else None
        self.settings = dict(settings or {})
        self.run: Any = None  # the wandb Run, once started
        self.failures: list[str] = []  # one line per call that failed, for tests and the run log
        self.location: dict[str, str] = {}  # where the run went: url, or offline sync_dir

    def _guard(self, what: str, call: Callable[[], T]) -> T | None:
        """Run ``call``; on any exception log a warning, remember it, and return None."""
        try:
            return call()
        except Exception as error:  # W&B must never break a run
            message = f"W&B {what} failed ({type(error).__name__}: {error}); the run goes on."
            log.warning(message)
            self.failures.append(message)
            return None

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
            reinit="finish_previous",  # a Hydra multirun keeps one process for many runs
            settings=wandb.Settings(**{"silent": True, **self.settings}),
        )

    def start(self, config: Mapping) -> None:
        """Open the W&B run with the resolved configuration (a plain nested dict)."""
        if self.mode == "disabled":
            return
        if self.mode == "online" and not server_reachable():
            url = os.environ.get("WANDB_BASE_URL", DEFAULT_HOST)
            log.warning("W&B server %s cannot be reached: the run is logged offline (upload it "
                        "later with `wandb sync`).", url)  # fmt: skip
            self.mode = "offline"
        self.run = self._guard(f"init ({self.mode})", lambda: self._init(config, self.mode))
        if self.run is None and self.mode == "online":
            self.run = self._guard("init (offline retry)", lambda: self._init(config, "offline"))
        if self.run is not None:
            self.location = self._guard("run location", self._location) or {}

    def _location(self) -> dict[str, str]:
        """``{"sync_dir": ...}`` for an offline run (``wandb sync`` it later), else ``{"url": ...}``."""
        if self.run.offline:
            return {"sync_dir": str(self.run.sync_dir)}
        return {"url": str(self.run.url)} if self.run.url else {}

    def log_metrics(self, metrics: Mapping) -> None:
        """Log the metrics flattened with ``/`` (``ppl/pruned``); they also land in the summary."""
        if self.run is None:
            return
        flat = flatten(metrics)
        if flat:
            self._guard("log_metrics", lambda: self.run.log(flat))

    def log_table(self, name: str, rows: Sequence[Mapping]) -> None:
        """Log rows of ``{column: value}`` as a ``wandb.Table``; columns in first-seen order."""
        if self.run is None or not rows:
            return

        def call() -> None:
            import wandb

            columns = list(dict.fromkeys(k for row in rows for k in row))
            data = [[row.get(c) for c in columns] for row in rows]
            self.run.log({name: wandb.Table(columns=columns, data=data)})

        self._guard(f"log_table {name!r}", call)

    def log_images(self, name: str, paths: Iterable[str | os.PathLike]) -> None:
        """Log image files under one key, each captioned with its file stem."""
        if self.run is None:
            return

        def call() -> None:
            import wandb

            images = [wandb.Image(str(p), caption=Path(p).stem) for p in paths]
            if images:
                self.run.log({name: images})

        self._guard(f"log_images {name!r}", call)

    def log_stage(self, event: str, stage: str, seconds: float | None, done: int) -> None:
        """Live: ``stage`` (the one running, or just ended), ``stages_done``, and on its end
        ``stage_s/<stage>`` (seconds), so a long run shows where it is while it runs."""
        if self.run is None:
            return
        data: dict[str, Any] = {"stage": stage, "stages_done": done}
        if event == "end" and seconds is not None:
            data[f"stage_s/{stage}"] = seconds
        self._guard("log_stage", lambda: self.run.log(data))

    def log_artifact(self, name: str, kind: str, paths: Iterable[str | os.PathLike]) -> None:
        """The files as one artifact ``name`` of type ``kind`` (missing files are skipped); the
        name is made valid first (:func:`artifact_name`)."""
        if self.run is None:
            return
        files = [Path(p) for p in paths if Path(p).is_file()]
        if not files:
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
