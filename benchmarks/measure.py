"""Time and memory of one piece of work: wall and CPU seconds, and the peak resident memory.

Time. ``time.perf_counter`` (wall) and ``time.process_time`` (CPU seconds of the whole process,
all threads). On a shared machine the wall time grows with whatever else runs; the CPU time of
single-threaded work does not, so ratios are taken on CPU time and wall ratios are shown beside
them. Every measurement is repeated and the minimum kept (the least disturbed run).

Memory. ``tracemalloc`` does not see torch's allocations and the CPU has no allocator statistics
like CUDA's, so the peak is read from the kernel: before the work the resident set ``VmRSS`` is
read and its high-water mark ``VmHWM`` reset (``echo 5 > /proc/self/clear_refs``); after it, the
peak is ``VmHWM - VmRSS(before)``, the most memory the work held at once beyond what was already
resident. This counts tensors only if freeing one gives its pages back and allocating one takes
new pages, which glibc does for allocations above its mmap threshold when its heap has no large
free chunk to reuse; :func:`benchmarks.suite.run_suite` arranges both (it fixes the threshold at
64 KiB and measures memory first, in a fresh heap). Where the high-water mark cannot be reset the
peak is reported as unknown rather than guessed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _libc() -> ctypes.CDLL | None:
    """The C library (for glibc's ``mallopt``), or None where it cannot be loaded."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def _status_kib(key: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """The process's resident set now, in bytes (None where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def hwm_bytes() -> int | None:
    """The resident set's high-water mark since the last reset, in bytes."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel does not allow it."""
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Measurement:
    """The best (minimum) of repeated runs: seconds of wall and CPU time, peak extra bytes."""

    wall_s: float
    cpu_s: float
    peak_bytes: int | None = None
    repeats: int = 1
    wall_all: list[float] = field(default_factory=list)
    cpu_all: list[float] = field(default_factory=list)

    @property
    def spread(self) -> float:
        """max / min of the CPU times over the repeats (1.0 = perfectly repeatable)."""
        return max(self.cpu_all) / min(self.cpu_all) if self.cpu_all and min(self.cpu_all) else 1.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["spread"] = self.spread
        return data


class PeakWatch:
    """Peak resident bytes of a stretch of work above the resident set at its start."""

    def __init__(self) -> None:
        self.start: int | None = None
        self.resettable = False

    def begin(self) -> None:
        self.start = rss_bytes()
        self.resettable = reset_peak()

    def peak(self) -> int | None:
        high = hwm_bytes()
        if not self.resettable or high is None or self.start is None:
            return None
        return max(0, high - self.start)


def measure(
    work: Callable[[], Any],
    repeats: int = 1,
    setup: Callable[[], Any] | None = None,
    memory: bool = False,
) -> tuple[Measurement, Any]:
    """Run ``work`` ``repeats`` times; keep the minimum times (and peak memory).

    Args:
        work: the timed work; called with the value of ``setup()`` when ``setup`` is given.
        repeats: how many runs.
        setup: untimed preparation before every run (e.g. a fresh copy of the model).
        memory: also read the peak resident memory of each run (``peak_bytes``).

    Returns:
        The measurement and the value the last run of ``work`` returned.
    """
    walls: list[float] = []
    cpus: list[float] = []
    peaks: list[int] = []
    result = None
    for _ in range(max(1, repeats)):
        prepared = setup() if setup is not None else None
        watch = PeakWatch()
        if memory:
            watch.begin()
        wall, cpu = time.perf_counter(), time.process_time()
        result = work(prepared) if setup is not None else work()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
        peak = watch.peak() if memory else None
        if peak is not None:
            peaks.append(peak)
        del prepared
    return (
        Measurement(
            wall_s=min(walls),
            cpu_s=min(cpus),
            peak_bytes=min(peaks) if peaks else None,
            repeats=len(walls),
            wall_all=walls,
            cpu_all=cpus,
        ),
        result,
    )


@dataclass
class _StageTotals:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_bytes: int | None = None
    entries: int = 0


class StageClock:
    """Per-stage wall, CPU and peak memory, summed over the times a stage is entered.

    It has the ``stage(name)`` context manager that ``gblm.calibration.sequential.prune_model``
    accepts as ``timer``; the walk enters its stages once per block. The peak of a stage is the
    largest high-water mark above the resident set at any of its entries (the high-water mark is
    reset at each entry). Memory is read only when ``memory`` is set.
    """

    def __init__(self, memory: bool = False) -> None:
        self.totals: dict[str, _StageTotals] = {}
        self.memory = memory

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        totals = self.totals.setdefault(name, _StageTotals())
        watch = PeakWatch()
        if self.memory:
            watch.begin()
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            totals.cpu_s += time.process_time() - cpu
            totals.wall_s += time.perf_counter() - wall
            totals.entries += 1
            peak = watch.peak() if self.memory else None
            if peak is not None:
                totals.peak_bytes = max(totals.peak_bytes or 0, peak)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(t) for name, t in self.totals.items()}


def best_stages(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per stage, the minimum wall and CPU time and peak over repeated runs of the same work."""
    merged: dict[str, dict[str, Any]] = {}
    for run in runs:
        for name, t in run.items():
            entry = merged.setdefault(
                name, {"wall_s": [], "cpu_s": [], "peak_bytes": [], "entries": t["entries"]}
            )
            entry["wall_s"].append(t["wall_s"])
            entry["cpu_s"].append(t["cpu_s"])
            if t["peak_bytes"] is not None:
                entry["peak_bytes"].append(t["peak_bytes"])
    return {
        name: {
            "wall_s": min(e["wall_s"]),
            "cpu_s": min(e["cpu_s"]),
            "peak_bytes": min(e["peak_bytes"]) if e["peak_bytes"] else None,
            "entries": e["entries"],
            "cpu_all": e["cpu_s"],
        }
        for name, e in merged.items()
    }


_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_MEMORY_PASS_MMAP_THRESHOLD = 64 * 1024
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_KEEP_TRIM_THRESHOLD = 1 << 30
_GLIBC_MMAP_MAX = 65536  # glibc's defaults
_GLIBC_TRIM_THRESHOLD = 128 * 1024


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt(param, value)``, or None where the C library has none."""
    mallopt = getattr(_LIBC, "mallopt", None) if _LIBC is not None else None
    if mallopt is not None:
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt


@contextlib.contextmanager
def mmap_every_tensor(enabled: bool = True) -> Iterator[bool]:
    """glibc: serve every allocation >= 64 KiB by its own mmap, unmapped on free (see module doc).

    Only new heap growth obeys the threshold (free heap chunks are reused first), so this is set
    before the measured work fills the heap. glibc offers no way back to its dynamic threshold;
    afterwards it is set to that threshold's ceiling (32 MiB), where a long run settles anyway.
    """
    mallopt = _mallopt()
    if mallopt is None or not enabled:
        yield False
        return
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _MEMORY_PASS_MMAP_THRESHOLD))
    try:
        yield ok
    finally:
        mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """glibc: within the block serve every allocation from the heap and hand nothing back on free.

    The timings use it. Each benchmarked run copies the model and frees it after; with glibc's
    defaults the freed pages go back to the kernel, and the next run's tensors fault them in
    again. On a virtual machine that can cost a host-side fault per page (seen here: SmolLM2's
    Wanda masking stage took 0.52 s in a run with no minor faults and 0.77 s in one with 220k),
    which a real run, copying nothing, pays once. Kept, the pages are reused, as in a long run.
    Yields False where glibc's ``mallopt`` is not there. Afterwards glibc's defaults are back.
    """
    mallopt = _mallopt()
    if mallopt is None:
        yield False
        return
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD))
    try:
        yield ok
    finally:
        mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
        mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
