"""Weights in private memory before pruning writes into them.

``from_pretrained`` maps a safetensors checkpoint into memory privately (``rw-p``): the weights
are the file's pages until something writes to them. Pruning writes zeros into every Linear, so
each page then takes a copy-on-write fault, and with several threads each fault makes the kernel
flush the other CPUs' TLBs under the page-table lock: on SmolLM2-135M that made the walk about 4x
slower than the same work on weights in ordinary memory. Copying a block's weights into memory
of their own just before the walk prunes it costs one memcpy of the block, and the peak memory
is the same as with the faults (the faults copy every written page too).

Only Linux tells where a tensor lives (``/proc/self/maps``); elsewhere nothing is copied.

Once pruned, an onloaded block need not stay in that private memory either:
:func:`map_parameters_to_file` moves it into a shared mapping of a file of its own (unlinked at
once, so nothing is left behind), whose pages are file-backed: the kernel writes them out and may
drop them, and they never count as anonymous memory. :func:`file_backed_zeros` gives GBLM's
gradient accumulators the same home.

What is left in anonymous memory is each block's scratch (scores, selections, masks, stats),
freed after the block, but freed into glibc's heap: the pieces under its mmap threshold (which
rises to 32 MB as large pieces are freed) stay there, fragmented by the long-lived packed masks
between them, and the heap grew by about 60 MB per block of a 2048-hidden model.
:func:`release_free_heap` hands the free pages back to the kernel after each onloaded block.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

MAPS = Path("/proc/self/maps")
MADV_DONTNEED = 4  # Linux


def private_file_mappings(maps: Path = MAPS) -> list[tuple[int, int]]:
    """``(start, end)`` addresses of this process's private, writable mappings of files.

    Those are the pages a write copies first (copy-on-write). Empty when the table is unreadable
    (not Linux).
    """
    try:
        text = maps.read_text()
    except OSError:
        return []
    ranges = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) < 6 or not fields[5].startswith("/"):
            continue  # anonymous memory, heap, stack, vdso
        perms = fields[1]
        if perms[1] == "w" and perms[3] == "p":
            start, end = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _mapped(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    address = tensor.untyped_storage().data_ptr()
    return any(start <= address < end for start, end in ranges)


def in_file_mappings(module: nn.Module, ranges: list[tuple[int, int]]) -> bool:
    """Whether some CPU parameter of ``module`` lies in one of ``ranges`` (a file's pages)."""
    return any(p.device.type == "cpu" and _mapped(p, ranges) for p in module.parameters())


@torch.no_grad()
def privatize_parameters(module: nn.Module, ranges: list[tuple[int, int]] | None = None) -> int:
    """Copy each CPU parameter of ``module`` that lies in a file mapping into its own memory.

    The Parameter objects stay the same (only their ``data`` changes), so hooks, optimizers and
    the model's attributes are untouched; the values are bit-identical.

    Args:
        module: e.g. one decoder block, just before the walk prunes it.
        ranges: :func:`private_file_mappings`, read once by a caller that privatizes many
            modules; None reads it now.

    Returns:
        The number of bytes copied (0 when nothing was mapped).
    """
    ranges = private_file_mappings() if ranges is None else ranges
    if not ranges:
        return 0
    copied = 0
    for param in module.parameters():
        if param.device.type == "cpu" and _mapped(param, ranges):
            mapped, param.data = param.data, param.data.clone()
            _release_pages(mapped)
            copied += param.numel() * param.element_size()
    return copied


def _release_pages(tensor: Tensor) -> None:
    """Drop the file's pages under ``tensor`` from this process's resident set.

    ``madvise(MADV_DONTNEED)`` on the whole pages of a private file mapping that nothing wrote:
    a later read maps the same bytes from the file again, so nothing is lost, and the weights are
    never resident twice (the file's pages beside their copy).
    """
    madvise = _libc_function("madvise")
    if madvise is None:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    begin = tensor.data_ptr()
    start, end = (
        -(-begin // page) * page,
        (begin + tensor.numel() * tensor.element_size()) // page * page,
    )
    if end > start:
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


ALIGN = 64  # bytes: every tensor of a mapping starts on a cache line


def file_backed_zeros(
    specs: list[tuple[torch.Size, torch.dtype]], directory: Path | str | None = None
) -> list[Tensor]:
    """Zero CPU tensors of the given (shape, dtype) in one shared mapping of a new file.

    The file (in ``directory``, default the system's temporary folder; it must not be a tmpfs, or
    the pages are shared memory) is unlinked right after it is mapped: it lives as long as a
    tensor does, and its pages are file-backed, never anonymous. A new file reads as zeros.
    """
    offsets, total = [], 0
    for shape, dtype in specs:
        offsets.append(total)
        nbytes = shape.numel() * dtype.itemsize
        total += -(-nbytes // ALIGN) * ALIGN
    fd, path = tempfile.mkstemp(prefix=".gblm-", suffix=".bin", dir=directory)
    try:
        os.ftruncate(fd, max(total, 1))
        mapped = torch.from_file(path, shared=True, size=max(total, 1), dtype=torch.uint8)
    finally:
        os.close(fd)
        os.unlink(path)
    return [
        mapped[offset : offset + shape.numel() * dtype.itemsize].view(dtype).view(shape)
        for (shape, dtype), offset in zip(specs, offsets)
    ]


@torch.no_grad()
def map_parameters_to_file(module: nn.Module, directory: Path | str | None = None) -> int:
    """Move every CPU parameter of ``module`` into one file-backed mapping (bit for bit).

    As :func:`privatize_parameters`, only each Parameter's ``data`` changes. For an onloaded block
    the walk has pruned: its weights then leave anonymous memory (:func:`file_backed_zeros`).

    Returns:
        The number of bytes moved.
    """
    params = [p for p in module.parameters() if p.device.type == "cpu"]
    homes = file_backed_zeros([(p.shape, p.dtype) for p in params], directory)
    for param, home in zip(params, homes):
        home.copy_(param.data)
        param.data = home
    return sum(p.numel() * p.element_size() for p in params)


@functools.cache
def _libc_function(name: str):
    """The C library's function ``name`` (``malloc_trim``, ``madvise``), or None where it has
    none (musl, macOS, Windows)."""
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """Give the free pages of glibc's heap back to the kernel (``malloc_trim(0)``).

    Freed memory below glibc's mmap threshold stays in the heap, counted as the process's
    anonymous memory, and a heap fragmented by small long-lived pieces keeps growing. Trimming
    after each onloaded block keeps the anonymous peak at one block's work; what it costs is the
    page faults of touching those pages again in the next block (measured in docs/onload.md).

    Returns:
        Whether anything was given back (False where there is no ``malloc_trim``).
    """
    trim = _libc_function("malloc_trim")
    return bool(trim(0)) if trim is not None else False
