"""Weights in private memory before pruning writes into them.

``from_pretrained`` maps a safetensors checkpoint into memory privately (``rw-p``): the weights
are the file's pages until something writes to them. Pruning writes zeros into every Linear, so
each page then takes a copy-on-write fault, and with several threads each fault makes the kernel
flush the other CPUs' TLBs under the page-table lock: on SmolLM2-135M that made the walk about 4x
slower than the same work on weights in ordinary memory. Copying a block's weights into memory
of their own just before the walk prunes it costs one memcpy of the block, and the peak memory
is the same as with the faults (the faults copy every written page too).

Only Linux tells where a tensor lives (``/proc/self/maps``); elsewhere nothing is copied.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

MAPS = Path("/proc/self/maps")


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
            param.data = param.data.clone()
            copied += param.numel() * param.element_size()
    return copied
