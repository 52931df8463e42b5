"""Host memory of a model pruned from a memory-mapped checkpoint (Linux; elsewhere no-ops).

``from_pretrained`` maps safetensors weights privately: pruning's writes would then take a
copy-on-write fault per page, each flushing the other CPUs' TLBs (4x slower walk on SmolLM2), so
:func:`privatize_parameters` copies a block into memory of its own just before it is pruned.
An onloaded block, once pruned, moves into an unlinked file's shared mapping
(:func:`map_parameters_to_file`; :func:`file_backed_zeros` for GBLM's accumulators): file-backed
pages the kernel may write out, never anonymous memory. :func:`release_free_heap` gives glibc's
fragmented free heap back after each block. Each saves 28-86% of the peak (docs/performance.md).
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
ALIGN = 64  # bytes: every tensor of a file mapping starts on a cache line


def private_file_mappings(maps: Path = MAPS) -> list[tuple[int, int]]:
    """``(start, end)`` of this process's private, writable file mappings (the pages a write
    copies first); empty when the table is unreadable (not Linux)."""
    try:
        text = maps.read_text()
    except OSError:
        return []
    ranges = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) == 6 and fields[5].startswith("/") and fields[1][1] + fields[1][3] == "wp":
            start, end = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _mapped(tensor: Tensor, ranges: list[tuple[int, int]]) -> bool:
    if tensor.device.type != "cpu":
        return False
    address = tensor.untyped_storage().data_ptr()
    return any(start <= address < end for start, end in ranges)


def in_file_mappings(module: nn.Module, ranges: list[tuple[int, int]]) -> bool:
    """Whether some CPU parameter of ``module`` lies in one of ``ranges`` (a file's pages)."""
    return any(_mapped(p, ranges) for p in module.parameters())


@torch.no_grad()
def privatize_parameters(module: nn.Module, ranges: list[tuple[int, int]] | None = None) -> int:
    """Copy each CPU parameter of ``module`` in a file mapping (``ranges``, default
    :func:`private_file_mappings` now) into memory of its own; returns the bytes copied.

    Only each Parameter's ``data`` changes (bit for bit): hooks and attributes are untouched.
    """
    ranges = private_file_mappings() if ranges is None else ranges
    copied = 0
    for param in module.parameters():
        if _mapped(param, ranges):
            mapped, param.data = param.data, param.data.clone()
            _release_pages(mapped)
            copied += param.numel() * param.element_size()
    return copied


def _release_pages(tensor: Tensor) -> None:
    """``madvise(MADV_DONTNEED)`` the whole pages under ``tensor`` (an unwritten private file
    mapping: a later read maps the file again), so no weight is resident twice."""
    madvise = _libc_function("madvise")
    if madvise is None:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    begin = tensor.data_ptr()
    start = -(-begin // page) * page
    end = (begin + tensor.numel() * tensor.element_size()) // page * page
    if end > start:
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


def file_backed_zeros(
    specs: list[tuple[torch.Size, torch.dtype]], directory: Path | str | None = None
) -> list[Tensor]:
    """Zero CPU tensors of the given (shape, dtype) in one shared mapping of a new file.

    The file (in ``directory``, default the system's temporary folder, not a tmpfs) is unlinked
    once mapped: it lives as long as a tensor does.
    """
    sizes = [shape.numel() * dtype.itemsize for shape, dtype in specs]
    offsets = [0]
    for nbytes in sizes:
        offsets.append(offsets[-1] + -(-nbytes // ALIGN) * ALIGN)
    total = max(offsets[-1], 1)
    fd, path = tempfile.mkstemp(prefix=".gblm-", suffix=".bin", dir=directory)
    try:
        os.ftruncate(fd, total)
        mapped = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
    finally:
        os.close(fd)
        os.unlink(path)
    return [
        mapped[offset : offset + nbytes].view(dtype).view(shape)
        for (shape, dtype), offset, nbytes in zip(specs, offsets, sizes)
    ]


@torch.no_grad()
def map_parameters_to_file(module: nn.Module, directory: Path | str | None = None) -> int:
    """Move every CPU parameter of ``module`` into one :func:`file_backed_zeros` mapping (only
    each Parameter's ``data`` changes, bit for bit); returns the bytes moved."""
    params = [p for p in module.parameters() if p.device.type == "cpu"]
    homes = file_backed_zeros([(p.shape, p.dtype) for p in params], directory)
    for param, home in zip(params, homes):
        home.copy_(param.data)
        param.data = home
    return sum(p.numel() * p.element_size() for p in params)


@functools.cache
def _libc_function(name: str):
    """The C library's function ``name``, or None where it has none (musl, macOS, Windows)."""
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None


def release_free_heap() -> bool:
    """``malloc_trim(0)``: give glibc's free heap pages back to the kernel (a block's freed
    scratch otherwise stays as anonymous memory); whether anything was given back."""
    trim = _libc_function("malloc_trim")
    return bool(trim(0)) if trim is not None else False
