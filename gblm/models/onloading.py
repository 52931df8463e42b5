"""Onloading: a model's parts on the compute device only while they work.

:func:`skeleton` puts stand-ins in place of decoder blocks, so the model's own code (embeddings,
masks, rotary tables, norm, LM head, loss) runs without their weights; :func:`visiting` lends a
module's tensors a device copy for read-only work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gblm.models.layers import decoder_layers
from gblm.models.offload import Offloaded


class StandIn(nn.Module):
    """Takes the place of decoder block ``index``: ``on_call(index, hidden, args, kwargs)``.

    Other attributes (e.g. ``attention_type``) come from the real block, which is not registered:
    its parameters are not the model's while it stands in.
    """

    def __init__(self, index: int, block: nn.Module, on_call: Callable) -> None:
        super().__init__()
        self.index = index
        self._real = [block]  # in a list: not registered as a submodule
        self._on_call = on_call

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_real"][0], name)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        return self._on_call(self.index, hidden_states, args, kwargs)


@contextlib.contextmanager
def skeleton(
    model: nn.Module, on_call: Callable, blocks: int | None = None
) -> Iterator[list[nn.Module]]:
    """Within, the first ``blocks`` decoder blocks (default: all) are :class:`StandIn` s; yields
    the real blocks, all of them (put back afterwards, also on an exception)."""
    layers = decoder_layers(model)
    real = list(layers)
    count = len(real) if blocks is None else blocks
    try:
        for i in range(count):
            layers[i] = StandIn(i, real[i], on_call)
        yield real
    finally:
        for i in range(count):
            layers[i] = real[i]


@contextlib.contextmanager
def visiting(
    module: nn.Module, device: torch.device, sources: Mapping[int, Offloaded] | None = None
) -> Iterator[None]:
    """``module``'s parameters and buffers on ``device`` within, for read-only work.

    Each tensor elsewhere gets a device copy as its ``.data``; afterwards the very same host tensor
    is put back (nothing is copied back, so memory-mapped weights stay mapped). A stand-in for an
    offloaded weight (``sources``: :func:`gblm.models.offload.placeholders`) gets its stored value.
    """
    sources = sources or {}

    def value(tensor: Tensor) -> Tensor:
        entry = sources.get(id(tensor))
        return (entry.read() if entry is not None else tensor).to(device)

    params = [(p, p.data) for p in module.parameters() if p.device != device or id(p) in sources]
    buffers = [
        (m, key, b)
        for m in module.modules()
        for key, b in m._buffers.items()
        if b is not None and (b.device != device or id(b) in sources)
    ]
    try:
        for p, _ in params:
            p.data = value(p)
        for m, key, b in buffers:
            m._buffers[key] = value(b)
        yield
    finally:
        for p, data in params:
            p.data = data
        for m, key, b in buffers:
            m._buffers[key] = b
