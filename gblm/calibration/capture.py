"""Block-0 input capture: step 1 of the sequential layer walk.

The model runs on the calibration windows until decoder block 0 is called; a forward pre-hook
there records the hidden states and every keyword argument the block receives (attention mask,
position ids, rotary ``(cos, sin)``, ...) and stops the pass. The walk then calls each block with
those arguments, so nothing architecture-specific is rebuilt by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import Tensor, nn

from gblm import devices
from gblm.calibration.hooks import attached_hooks
from gblm.models.layers import decoder_layers


class _BlockReached(Exception):
    """Stops the forward pass at block 0."""


def block_output(out: Any) -> Tensor:
    """A decoder block's output hidden states: transformers >= 5 returns a Tensor, older
    versions a tuple whose first entry is the states."""
    return out[0] if isinstance(out, tuple | list) else out


@dataclass
class BlockInputs:
    """The inputs of one decoder block for all N windows.

    Attributes:
        hidden: (N, T, hidden) hidden states, in the model dtype, on the storage device.
        batch_size: windows per forward call.
        calls: per batch size, the extra positional and the keyword arguments block 0 got. The
            windows are of equal length, so every batch of a size gets the same arguments; a
            smaller last batch has its own (OPT's position ids carry the batch dimension).
    """

    hidden: Tensor
    batch_size: int
    calls: dict[int, tuple[tuple, dict[str, Any]]] = field(default_factory=dict)
    _moved: dict[tuple[int, str], tuple[tuple, dict[str, Any]]] = field(
        default_factory=dict, repr=False
    )

    def batches(self) -> Iterator[tuple[int, int]]:
        """``(start, end)`` of every batch of windows."""
        nsamples = self.hidden.shape[0]
        for start in range(0, nsamples, self.batch_size):
            yield start, min(start + self.batch_size, nsamples)

    def call_args(self, batch: int, device: torch.device | str) -> tuple[tuple, dict[str, Any]]:
        """The arguments for a batch of ``batch`` windows, on ``device`` (moved once per device)."""
        key = (batch, str(device))
        if key not in self._moved:
            self._moved[key] = send_to_device(self.calls[batch], device)
        return self._moved[key]


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    windows: Tensor,
    *,
    batch_size: int = 1,
    storage_device: torch.device | str = "cpu",
) -> BlockInputs:
    """Run ``model`` up to decoder block 0 on the (N, T) token ids ``windows``, ``batch_size``
    at a time, and record the block's inputs; the hidden states are kept on ``storage_device``."""
    if windows.dim() != 2:
        raise ValueError(f"windows: expected (N, T) token ids, got shape {tuple(windows.shape)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1.")
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

    with attached_hooks([(decoder_layers(model)[0], catch)], pre=True, with_kwargs=True):
        for start in range(0, nsamples, batch_size):
            try:
                model(
                    input_ids=windows[start : start + batch_size].to(input_device), use_cache=False
                )
            except _BlockReached:
                continue
            raise RuntimeError("The forward pass never reached decoder block 0.")
    assert hidden is not None
    return BlockInputs(hidden=hidden, batch_size=batch_size, calls=calls)
