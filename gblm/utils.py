"""Small shared helpers: the one atomic writer, the one content hash (and its tensor and file
forms), file locks, stage timing."""

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

log = logging.getLogger("gblm")


# ----------------------------------------------------------------------------- atomic writes


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _write_temp_file(path: Path, content: bytes | Callable[[Path], None]) -> Path:
    """A new temporary sibling of ``path`` holding the content.

    Created with mode 0666 less the umask, as a plain ``open`` would (``mkstemp``'s 0600 would
    stay on the result and hide run records from the other readers of a shared folder); the
    mode is set again after a callback, which may have replaced the file with one of its own.
    """
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0666 less the umask
        if callable(content):
            os.close(fd)
            content(tmp)
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
        os.chmod(tmp, mode)  # a callback that replaced the file (its own temp + rename) keeps it
        _fsync_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _write_temp_dir(path: Path, content: Callable[[Path], None]) -> Path:
    """A temporary sibling directory of ``path``, filled by ``content``.

    Made with ``mkdir`` (the umask's mode), not ``mkdtemp``, whose 0700 would stay on the result.
    """
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        content(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``; an existing ``path`` is moved aside first, then deleted."""
    if not path.exists():
        tmp.rename(path)
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write(
    path: str | os.PathLike, content: bytes | Callable[[Path], None], *, directory: bool = False
) -> Path:
    """Write ``path`` through a temporary sibling and a rename, so readers never see half of it.

    Args:
        path: the file (or, with ``directory=True``, the directory) to create or replace.
        content: the file's bytes, or a callback that writes the temporary path it is given (an
            existing empty file, e.g. for ``torch.save(obj, tmp)``; or an existing empty
            directory). The result has the mode a plain ``open`` or ``mkdir`` would give it.
        directory: the result is a directory; an existing one at ``path`` is replaced whole.

    On any error (in the callback too) the temporary is removed and ``path`` is left as it was.
    Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        if not callable(content):
            raise TypeError("atomic_write(directory=True) needs a callback that fills the folder.")
        tmp = _write_temp_dir(path, content)
        try:
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path
    tmp = _write_temp_file(path, content)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8 (newlines written as given)."""
    return atomic_write(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """:func:`atomic_write` of ``data`` as indented JSON (``default=str``) and a final newline."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# ----------------------------------------------------------------------------- content hashes


def canonical_json(obj: Any) -> str:
    """The JSON text that :func:`content_hash` hashes: sorted keys, ``default=str``, compact."""
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"), ensure_ascii=False)


def content_hash(obj: Any = None, *, data: Iterable[bytes] = (), length: int | None = None) -> str:
    """sha256 hex of ``obj``'s :func:`canonical_json`, then of each chunk of ``data``.

    The one hash of the project for cache keys and run identities. ``obj`` is any JSON-able
    value (a dict of settings, a list of documents; other values are hashed as ``str``); ``data``
    adds raw bytes that are too big or not meant for JSON (e.g. ``tensor.numpy().tobytes()``,
    with the shape and dtype in ``obj``). ``length`` keeps the first that many hex digits.
    """
    digest = hashlib.sha256(canonical_json(obj).encode("utf-8"))
    for chunk in data:
        digest.update(chunk)
    hexdigest = digest.hexdigest()
    return hexdigest if length is None else hexdigest[:length]


def tensors_checksum(tensors: Mapping[str, Any]) -> str:
    """:func:`content_hash` of named tensors: names, shapes, dtypes, then the raw bytes in name order.

    The checksum stored beside a cache entry of tensors and checked when it is read back; any
    flipped byte of any tensor changes it. Works for every dtype (bf16 too: bytes via uint8).
    """
    import torch

    names = sorted(tensors)
    layout = {n: [list(tensors[n].shape), str(tensors[n].dtype)] for n in names}

    def chunks() -> Iterator[memoryview]:
        for name in names:
            flat = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            yield flat.view(torch.uint8).numpy().data

    return content_hash(layout, data=chunks())


def file_digest(path: str | os.PathLike, memo_dir: str | os.PathLike | None = None) -> str:
    """sha256 of a file's bytes; with ``memo_dir``, computed once per (size, mtime, inode).

    The memo (one small JSON per file under ``memo_dir``) spares hashing a model's weights on
    every run; a file rewritten in place (new mtime, size or inode) is hashed again.
    """
    path = Path(path).resolve()
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
    memo = Path(memo_dir) / f"{content_hash(str(path), length=24)}.json" if memo_dir else None
    if memo is not None and memo.exists():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            seen = json.loads(memo.read_text())
            if {k: seen[k] for k in stamp} == stamp and len(seen["sha256"]) == 64:
                return seen["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    if memo is not None:
        with contextlib.suppress(OSError):  # the memo is optional: a full disk only slows us
            atomic_write_json(memo, {**stamp, "sha256": digest.hexdigest()})
    return digest.hexdigest()


def writable_dir(path: str | os.PathLike, key: str) -> Path:
    """``path`` as a folder this process can write into (made if missing), else the refusal
    naming ``key``. Tried by writing a file, not by reading permission bits: root passes those,
    a read-only mount or a full disk does not."""
    from gblm.errors import ConfigError

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
    """The named tensors stored at ``path``, or those ``compute`` returns, stored there first.

    The one cache writer of the project. The entry is a safetensors file written atomically under
    a file lock (concurrent sweep jobs compute once: the others wait, then load), with the
    :func:`tensors_checksum` of its tensors in its metadata, verified on every load: a damaged or
    truncated entry is computed again with a warning that names the file. Loaded on the CPU.
    The cache is optional: a folder that cannot be written (full, read-only, not ours) is a
    warning, and the tensors are computed and used without being stored.
    """
    from safetensors.torch import save_file

    lock: FileLock | None = file_lock(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as err:  # read what is there, store nothing
        lock = None
        _cache_unwritable(what, path, err)
    try:
        tensors = _read_entry(path, what)
        if tensors is not None:
            return tensors
        tensors = {name: t.contiguous() for name, t in compute().items()}
        if lock is not None:
            metadata = {"checksum": tensors_checksum(tensors)}
            try:
                atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
                log.info("%s cached at %s", what, path)
            except OSError as err:
                _cache_unwritable(what, path, err)
        return tensors
    finally:
        if lock is not None:
            lock.release()


def _read_entry(path: Path, what: str) -> dict | None:
    """The entry at ``path`` if it is there and its checksum holds, else None (with a warning
    when it was there but damaged)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            expected = (handle.metadata() or {}).get("checksum")
        tensors = load_file(str(path))
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


# ----------------------------------------------------------------------------- locks and timing


def file_lock(path: Path, timeout: float = -1) -> FileLock:
    """An inter-process lock beside ``path`` (sweep jobs share caches)."""
    return FileLock(str(path) + ".lock", timeout=timeout)


class StageTimer:
    """Times named stages; ``timings`` maps stage -> seconds, in the order they ran."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        #: Called as ``listener(event, stage, seconds, done)`` at each stage's "start" (seconds
        #: None) and "end"; ``done`` counts ended stages. A failing listener is logged, never
        #: raised: listeners are live views (a dashboard), not the record.
        self.listeners: list[Callable[[str, str, float | None, int], None]] = []
        self.done = 0

    def _tell(self, event: str, name: str, seconds: float | None) -> None:
        for listener in self.listeners:
            try:
                listener(event, name, seconds, self.done)
            except Exception as error:  # a live view must never stop the run
                log.warning("stage listener failed on %s %s: %s", event, name, error)

    def note(self, event: str, name: str) -> None:
        """Tell the listeners about a stage before it runs: ``"cached"``, its result will be
        read from a cache."""
        self._tell(event, name, None)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("stage %s: start", name)
        self._tell("start", name, None)
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.timings[name] = self.timings.get(name, 0.0) + seconds
            self.done += 1
            log.info("stage %s: %.1f s", name, seconds)
            self._tell("end", name, seconds)
