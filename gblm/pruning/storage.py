"""Mask storage: boolean masks as bits, one eighth of the bytes of a bool tensor.

The bit order is ``numpy.packbits``': flat, first entry in the top bit, the last byte zero-padded.
The saved mask file (:mod:`gblm.models.saving`) and the walk's in-memory masks use it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import Tensor


def pack_mask(mask: Tensor) -> Tensor:
    """A boolean tensor as uint8 bytes, 8 entries per byte, flat, first entry in the top bit
    (``numpy.packbits``' order), the last byte zero-padded: (ceil(numel / 8),)."""
    flat = mask.detach().to(device="cpu", dtype=torch.bool).reshape(-1).numpy()
    return torch.from_numpy(np.packbits(flat))


def unpack_mask(packed: Tensor, shape: tuple[int, ...] | list[int]) -> Tensor:
    """The boolean tensor of ``shape`` that :func:`pack_mask` packed."""
    count = math.prod(shape)
    bits = np.unpackbits(packed.detach().cpu().numpy().reshape(-1), count=count)
    return torch.from_numpy(bits.view(np.bool_)).reshape(tuple(shape))


class PackedMasks(Mapping[str, Tensor]):
    """Masks by Linear name, held as bits (an eighth of the bytes of a bool tensor).

    Reading an entry unpacks it into a fresh boolean CPU tensor. The layer walk returns its masks
    so: for LLaMA-7B that is 0.8 GB of host memory instead of 6.5 GB, and the walk does not fault
    in a page of new memory for every 4096 weights it prunes.
    """

    def __init__(self) -> None:
        self._packed: dict[str, Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}

    def add(self, name: str, mask: Tensor) -> None:
        self._packed[name] = pack_mask(mask)
        self._shapes[name] = tuple(mask.shape)

    def __getitem__(self, name: str) -> Tensor:
        return unpack_mask(self._packed[name], self._shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed bits."""
        return sum(p.numel() for p in self._packed.values())
