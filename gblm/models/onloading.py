"""Onloading: a model's parts on the compute device only while they work.

Two helpers, used by the layer walk and by GBLM's gradient stage:

- :func:`skeleton` puts stand-ins in place of decoder blocks, so the model's own code (embeddings,
  attention masks, rotary tables, final norm, LM head, loss) runs without those blocks' weights;
  each stand-in hands its call to a function of the caller.
- :func:`visiting` gives a module's parameters and buffers a device copy as their ``.data`` for
  read-only work and puts the very same host tensors back afterwards (nothing is copied back, so
  memory-mapped weights stay mapped).
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

    Attributes the model reads from its blocks (e.g. ``attention_type``) come from the real block,
    which is not registered as a submodule: its parameters are not the model's while it stands in.
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
    """Within, the first ``blocks`` decoder blocks (default: all) are :class:`StandIn` s.

    Yields:
        The real blocks, all of them, in order (put back afterwards, also on an exception).
    """
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
    """``module``'s parameters and buffers on ``device`` within the block, for read-only work.

    Each tensor elsewhere gets a device copy as its ``.data``; afterwards the very same original
    tensor is put back (nothing is copied back: the work must not write the weights). A no-op for
    tensors already on ``device``. A stand-in for a weight accelerate offloads (``sources``, from
    :func:`gblm.models.offload.placeholders`, by ``id``) gets the value its hook stores.
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
