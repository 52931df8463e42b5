"""Block-0 input capture: step 1 of the sequential layer walk.

The model runs on the calibration windows, batch by batch, until the first decoder block is
called; a forward pre-hook on that block records its hidden states and every keyword argument it
receives (attention mask, position ids, rotary ``position_embeddings`` (cos, sin), cache flags,
...) and stops the forward pass with a private exception. The walk then calls each block directly
with those arguments, so nothing architecture-specific is rebuilt by hand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gblm import devices
from gblm.calibration.hooks import attached_hooks
from gblm.models.layers import decoder_layers


class _BlockReached(Exception):
    """Raised by the catcher hook to stop the forward pass at block 0 (never escapes capture)."""


def to_device(value: Any, device: torch.device | str) -> Any:
    """Move tensors, also inside tuples, lists and dicts, to ``device``; leave the rest as is."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


@dataclass
class BlockInputs:
    """The inputs of one decoder block for all N windows.

    Attributes:
        hidden: (N, T, hidden) hidden states, in the model dtype, on the storage device.
        batch_size: windows per forward call.
        calls: per batch size, the extra positional arguments and the keyword arguments block 0
            was called with. Windows are unpadded and of equal length, so every batch of a given
            size gets the same arguments; a smaller last batch gets its own entry (tensors such as
            OPT's position ids or an eager attention mask carry the batch dimension).
    """

    hidden: Tensor
    batch_size: int
    calls: dict[int, tuple[tuple, dict[str, Any]]] = field(default_factory=dict)
    _moved: dict[tuple[int, str], tuple[tuple, dict[str, Any]]] = field(
        default_factory=dict, repr=False
    )

    @property
    def nsamples(self) -> int:
        return self.hidden.shape[0]

    def batches(self) -> Iterator[tuple[int, int]]:
        """``(start, end)`` of every batch of windows."""
        for start in range(0, self.nsamples, self.batch_size):
            yield start, min(start + self.batch_size, self.nsamples)

    def call_args(self, batch: int, device: torch.device | str) -> tuple[tuple, dict[str, Any]]:
        """Positional extras and keyword arguments for a batch of ``batch`` windows, on ``device``."""
        key = (batch, str(device))
        if key not in self._moved:  # moved once per device, not once per forward call
            args, kwargs = self.calls[batch]
            self._moved[key] = (to_device(args, device), to_device(kwargs, device))
        return self._moved[key]


@torch.no_grad()
@contextlib.contextmanager
def _cache_off(model: nn.Module) -> Iterator[None]:
    """``model.config.use_cache = False`` for the block, restored after."""
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if config is not None:
            config.use_cache = use_cache


def capture_block_inputs(
    model: nn.Module,
    windows: Tensor,
    *,
    batch_size: int = 1,
    storage_device: torch.device | str = "cpu",
) -> BlockInputs:
    """Run the model up to decoder block 0 on every window and record the block's inputs.

    Args:
        model: a causal LM (``decoder_layers`` must find its blocks).
        windows: (N, T) token ids.
        batch_size: windows per forward call.
        storage_device: where the (N, T, hidden) hidden states are kept ("cpu" to offload).

    Returns:
        The captured :class:`BlockInputs`.
    """
    if windows.dim() != 2:
        raise ValueError(f"windows: expected (N, T) token ids, got shape {tuple(windows.shape)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1.")
    block = decoder_layers(model)[0]
    input_device = devices.input_device(model)
    nsamples = windows.shape[0]
    hidden: Tensor | None = None
    calls: dict[int, tuple[tuple, dict[str, Any]]] = {}
    start = 0

    def catch(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        nonlocal hidden
        if args:
            states, extra = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            states, extra = kwargs.pop("hidden_states"), ()
        if hidden is None:
            hidden = torch.empty(
                (nsamples, *states.shape[1:]), dtype=states.dtype, device=storage_device
            )  # (N, T, hidden)
        hidden[start : start + states.shape[0]] = states.to(storage_device)
        calls.setdefault(states.shape[0], (extra, dict(kwargs)))
        raise _BlockReached

    with _cache_off(model), attached_hooks([(block, catch)], pre=True, with_kwargs=True):
        for start in range(0, nsamples, batch_size):
            ids = windows[start : start + batch_size].to(input_device)  # (b, T)
            try:
                model(input_ids=ids, use_cache=False)
            except _BlockReached:
                continue
            raise RuntimeError("The forward pass never reached decoder block 0.")
    assert hidden is not None
    return BlockInputs(hidden=hidden, batch_size=batch_size, calls=calls)
