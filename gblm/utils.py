"""Small shared helpers: the one atomic writer, the one content hash (and its tensor and file
forms), file locks, stage timing and the overall estimate."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from gblm.errors import ConfigError

log = logging.getLogger("gblm")


def atomic_write(
    path: str | os.PathLike, content: bytes | Callable[[Path], None], *, directory: bool = False
) -> Path:
    """Write ``path`` through a temporary sibling and a rename, so readers never see half of it.

    ``content`` is the file's bytes, or a callback that fills the temporary path it is given (an
    existing empty file, e.g. for ``torch.save(obj, tmp)``; with ``directory=True`` an existing
    empty folder, and a folder at ``path`` is replaced whole). The result has the mode a plain
    ``open`` or ``mkdir`` would give it (not ``mkstemp``'s 0600: run records are read by others).
    On any error the temporary is removed and ``path`` is left as it was. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        if directory:
            tmp.mkdir()
            content(tmp)
            if path.exists():  # moved aside first, deleted once the new one is in place
                old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(path)
            return path
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0666 less the umask
        if callable(content):
            os.close(fd)
            content(tmp)
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
        os.chmod(tmp, mode)  # a callback that replaced the file (its own temp + rename) keeps it
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if directory:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_leftovers(path: str | os.PathLike) -> list[Path]:
    """The temporaries (``.<name>.*``) that :func:`atomic_write` calls for ``path`` left behind
    when their process was killed."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*"))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8 (newlines written as given)."""
    return atomic_write(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """:func:`atomic_write` of ``data`` as indented JSON (``default=str``) and a final newline."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return None


def content_hash(obj: Any = None, *, data: Iterable[bytes] = (), length: int | None = None) -> str:
    """The project's one hash (cache keys, run identities): sha256 hex of ``obj`` as canonical
    JSON (sorted keys, ``default=str``), then of the raw bytes of each chunk of ``data`` (e.g. a
    tensor's, with its shape and dtype in ``obj``); ``length`` keeps that many hex digits."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(text.encode("utf-8"))
    for chunk in data:
        digest.update(chunk)
    return digest.hexdigest()[:length]


def tensors_checksum(tensors: Mapping[str, Any]) -> str:
    """:func:`content_hash` of named tensors: names, shapes, dtypes, then the raw bytes in name
    order (every dtype, bf16 too: bytes via uint8). Stored with a cache entry, checked on reads."""
    import torch

    names = sorted(tensors)
    layout = {n: [list(tensors[n].shape), str(tensors[n].dtype)] for n in names}

    def chunks() -> Iterator[memoryview]:
        for name in names:
            flat = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            yield flat.view(torch.uint8).numpy().data

    return content_hash(layout, data=chunks())


def file_digest(path: str | os.PathLike, memo_dir: str | os.PathLike) -> str:
    """sha256 of a file's bytes, computed once per (path, size, mtime, inode) and remembered in
    one small JSON per file in ``memo_dir``, which spares hashing a model's weights on every run."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
    memo = Path(memo_dir) / f"{content_hash(str(path), length=24)}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # no memo, or a bad one
        seen = json.loads(memo.read_text())
        if {k: seen[k] for k in stamp} == stamp and len(seen["sha256"]) == 64:
            return seen["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    with contextlib.suppress(OSError):  # the memo is optional: a full disk only slows us
        atomic_write_json(memo, {**stamp, "sha256": digest.hexdigest()})
    return digest.hexdigest()


@contextlib.contextmanager
def evaluating(model) -> Iterator[None]:
    """Within, ``model`` is in eval mode (no dropout); its own mode is put back after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def writable_dir(path: str | os.PathLike, key: str) -> Path:
    """``path`` as a folder this process can write into (made if missing), else the refusal
    naming ``key``. Tried by writing a file: root passes permission bits, a full disk does not."""
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".gblm-write-check.") as handle:
            handle.write(b"gblm")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise ConfigError(
            f"{key}={str(path)!r}: the folder cannot be written ({err.strerror or err}); "
            "choose a writable folder."
        ) from None
    return folder


def cached_tensors(path: Path, compute: Callable[[], Mapping[str, Any]], what: str) -> dict:
    """The named tensors stored at ``path`` (on the CPU), or those ``compute`` returns, stored
    there first: the project's one cache writer.

    A safetensors file written atomically under a file lock (concurrent sweep jobs compute once),
    with its :func:`tensors_checksum` in its metadata, verified on every load: a damaged entry is
    computed again, with a warning. A cache folder that cannot be written is a warning too: the
    tensors are computed and used without being stored.
    """
    from safetensors.torch import save_file

    with contextlib.ExitStack() as held:
        writable = True
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(file_lock(path))
        except OSError as err:  # read what is there, store nothing
            writable = False
            _cache_unwritable(what, path, err)
        tensors = _read_entry(path, what)
        if tensors is not None:
            return tensors
        tensors = {name: t.contiguous() for name, t in compute().items()}
        if writable:
            metadata = {"checksum": tensors_checksum(tensors)}
            try:
                atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
                log.info("%s cached at %s", what, path)
            except OSError as err:
                _cache_unwritable(what, path, err)
        return tensors


def _read_entry(path: Path, what: str) -> dict | None:
    """The entry at ``path`` if it is there and its checksum holds, else None."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            expected = (handle.metadata() or {}).get("checksum")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        problem = None if expected == tensors_checksum(tensors) else "checksum mismatch"
    except Exception as err:  # truncated or garbled: any reader error means recompute
        problem = str(err)
    if problem is None:
        log.info("%s loaded from %s", what, path)
        return tensors
    log.warning("damaged %s cache %s (%s): computing it again", what, path, problem)
    return None


def _cache_unwritable(what: str, path: Path, err: OSError) -> None:
    log.warning("the %s cache %s cannot be written (%s): the run goes on without storing it",
                what, path, err.strerror or err)  # fmt: skip


def file_lock(path: Path) -> FileLock:
    """An inter-process lock beside ``path`` (sweep jobs share caches)."""
    return FileLock(str(path) + ".lock")


class StageTimer:
    """Times named stages; ``timings`` maps stage -> seconds, in the order they ran."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        #: Called as ``listener(event, stage, seconds, done)`` at each stage's "start" (seconds
        #: None) and "end"; ``done`` counts ended stages. A failing listener is logged, never
        #: raised: listeners are live views (a dashboard), not the record.
        self.listeners: list[Callable[[str, str, float | None, int], None]] = []
        self.done = 0

    def note(self, event: str, name: str, seconds: float | None = None) -> None:
        """Tell the listeners about a stage (``"cached"`` before it runs: read from a cache)."""
        for listener in self.listeners:
            try:
                listener(event, name, seconds, self.done)
            except Exception as error:  # a live view must never stop the run
                log.warning("stage listener failed on %s %s: %s", event, name, error)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("stage %s: start", name)
        self.note("start", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.timings[name] = self.timings.get(name, 0.0) + seconds
            self.done += 1
            log.info("stage %s: %.1f s", name, seconds)
            self.note("end", name, seconds)


class OverallEstimate:
    """A :class:`StageTimer` listener that logs, after each stage, how much of the run's work
    (:func:`gblm.pipeline.planned_stages`; a cached stage weighs nothing) is done and about how
    long is left: the rate measured so far prices the stages left."""

    def __init__(self, work: dict[str, float]) -> None:
        self.work = dict(work)
        self.total = sum(self.work.values())
        self.done_work = 0.0
        self.work_seconds = 0.0  # time spent in the weighed stages
        self.began = time.perf_counter()
        self.lines: list[str] = []

    def __call__(self, event: str, stage: str, seconds: float | None, done: int) -> None:
        if event == "cached" and stage in self.work:  # read from a cache: no work to weigh
            self.total -= self.work.pop(stage)
        if event != "end" or seconds is None:
            return
        if stage in self.work:
            self.done_work += self.work.pop(stage)
            self.work_seconds += seconds
        line = f"overall: {_duration(time.perf_counter() - self.began)} so far"
        if self.total and self.done_work:
            share = self.done_work / self.total
            left = (self.total - self.done_work) * self.work_seconds / self.done_work
            line += f", {100 * share:.0f}% of the work done, about {_duration(left)} left"
            if self.work:
                line += f" ({', '.join(self.work)})"
        self.lines.append(line)
        logging.getLogger("gblm.progress").info(line)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
