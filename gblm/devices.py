"""Device and dtype resolution: the one module that touches ``torch.cuda``."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip
DTYPE_NAMES = ("auto", *_DTYPES)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    cuda = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not cuda:
        raise ValueError(
            f"device={name!r} was asked for but CUDA is not available; use device=cpu or auto."
        )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA (the published protocol) and float32 on the CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype={name!r}: allowed values are {', '.join(DTYPE_NAMES)}.")
    return _DTYPES[name]


def resolved(device: str, dtype: str) -> str:
    """What a run's ``device`` and ``dtype`` settings compute in here, ``auto`` resolved: ``"cpu
    float32"``, ``"cuda float16"`` (part of a run's identity: a CPU's float32 numbers are not a
    GPU's float16 ones). A device named is taken as named (a machine without it refuses it later).
    """
    where = resolve_device(device) if device == "auto" else torch.device(device)
    return f"{where.type} {dtype_name(resolve_dtype(dtype, where))}"


def calibration_batch(batch_size: int | str) -> int:
    """Windows per forward call of the layer walk: ``auto`` is one window, as published; an
    integer is taken as given (a batch may change the last bits of some products)."""
    if batch_size == "auto":
        return 1
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: allowed values are auto or an integer >= 1.")
    return batch_size


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def input_device(model: torch.nn.Module, device: torch.device | str | None = None) -> torch.device:
    """Where a model's token ids go: ``device`` when the model sits there whole; else the input
    embeddings' device (a device map, or ``model.onload`` keeping them on the CPU); the CPU for
    embeddings that accelerate offloads (meta), whose hooks send the ids on."""
    embeddings = model.get_input_embeddings().weight.device
    if embeddings.type == "meta":
        return torch.device("cpu")
    if device is None or getattr(model, "hf_device_map", None):
        return embeddings
    device = torch.device(device)
    return device if embeddings.type == device.type else embeddings


def device_name(device: torch.device) -> str:
    """What computes: the GPU's name, or the CPU's model name (``/proc/cpuinfo``) and cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} cores)"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (for honest timings of GPU work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on a CUDA device, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Full fp32 matmuls (SparseGPT's solve must not run in TF32)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def idle_cpus(interval: float = 0.2) -> float | None:
    """How many CPUs sat idle over the next ``interval`` seconds (``/proc/stat``), or None."""

    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            counts = [int(x) for x in stat.readline().split()[1:9]]
        return counts[3] + counts[4], sum(counts)  # idle + iowait, all

    try:
        idle, total = ticks()
        time.sleep(interval)
        idle_after, total_after = ticks()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (idle_after - idle) / max(total_after - total, 1)


def default_threads() -> int:
    """Set torch's CPU threads to the CPUs idle now (at least one, at most torch's default),
    unless ``OMP_NUM_THREADS`` is set; returns the thread count.

    OpenMP threads spin before they sleep: beside another CPU-bound process, more threads than
    idle cores ran the walk 3-4 times slower (``docs/performance.md``).
    """
    if "OMP_NUM_THREADS" not in os.environ:
        idle = idle_cpus()
        own = torch_default_threads()
        threads = min(own, max(1, round(idle))) if idle is not None else own
        if threads != torch.get_num_threads():  # setting the count it has again slows torch down
            torch.set_num_threads(threads)
    return torch.get_num_threads()


@functools.cache
def torch_default_threads() -> int:
    """torch's own thread count, as it was before :func:`default_threads` first changed it."""
    return torch.get_num_threads()
