"""GBLM-Pruner's gradient stage block by block, for models larger than the compute device.

:func:`blockwise_gradient_norms` gives bit for bit the norms of
:func:`gblm.calibration.gradients.gradient_norms`, but never needs more than one decoder block on
the compute device. For each group of S calibration windows:

1. **Skeleton pass.** The model runs on each window with its decoder blocks replaced by
   stand-ins (:class:`_StandIn`) that record what each block is called with (hidden states,
   attention mask, rotary ``position_embeddings``, ...; per block, so per-layer masks such as
   Qwen2's sliding layers are right); the last stand-in stops the pass. Embeddings, masks and
   rotary tables are the model's own code, on the compute device.
2. **Forward.** Block after block, each onloaded once, runs on the S windows (batch 1 each, as
   the full model runs them); each block's input is kept on the host.
3. **Head.** The model runs again with stand-ins that return the last block's output as a leaf
   that requires grad: final norm, LM head and the model's loss are its own code; the loss's
   backward leaves the gradient of the last hidden states on the leaf.
4. **Backward.** Blocks in reverse: onload block b, recompute its forward from the kept input
   (a leaf, requiring grad for b > 0 as in the full model, where block 0's input does not),
   backpropagate the gradient that came from block b + 1, fold every weight gradient into the
   block's accumulators with the same :class:`gblm.calibration.gradients._Folder` hook as the
   full-model stage, pass the input gradient on, offload.

Each window keeps its own backward, so per-sample norms stay exact, and every accumulator adds
the samples in the same order (0, 1, ..., N - 1) as the full-model stage. The accumulators live
where the weights live between uses; those of one block are on the compute device during its
backward. Weights are never written: onloading swaps a parameter's ``.data`` for a device copy and
puts the very same host tensor back afterwards (no copy back, memory-mapped weights stay mapped).

Bytes moved per group: every block twice host -> device (forward, backward), embeddings and head
twice, each block's accumulators there and back; see ``docs/onload.md`` for the time model.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gblm.calibration.gradients import (
    GradientSettings,
    _backward_sample,
    _check_windows,
    _eval_mode,
    _finish,
    _Folder,
    _input_device,
    _only_weights_require_grad,
    check_chunkable,
    folding_hooks,
)
from gblm.calibration.loss import lean_loss
from gblm.models.layers import decoder_layers, prunable_linears
from gblm.models.memory import file_backed_zeros
from gblm.models.offload import Offloaded, execution_devices, held_hooks, placeholders

logger = logging.getLogger("gblm.gradients")

Call = tuple[tuple, dict[str, Any]]  # a block's extra positional and keyword arguments
Sources = Mapping[int, Offloaded]  # stand-ins of weights accelerate offloads (by id)


class _Stop(Exception):
    """Raised by the last stand-in to end a skeleton pass before the head."""


class _StandIn(nn.Module):
    """Takes the place of decoder block ``index``: ``on_call(index, hidden, args, kwargs)``.

    Attributes the model reads from its blocks (e.g. ``attention_type``) come from the real block.
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
def skeleton(model: nn.Module, on_call: Callable) -> Iterator[list[nn.Module]]:
    """Within the block, every decoder block of ``model`` is a :class:`_StandIn` calling ``on_call``.

    Yields:
        The real blocks, in order (put back afterwards).
    """
    layers = decoder_layers(model)
    real = list(layers)
    try:
        for i, block in enumerate(real):
            layers[i] = _StandIn(i, block, on_call)
        yield real
    finally:
        for i, block in enumerate(real):
            layers[i] = block


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


def _block_linear_names(model: nn.Module) -> list[list[str]]:
    """Per decoder block, the full names of its Linears (as ``decoder_linear_names`` gives them)."""
    full_names = {id(module): name for name, module in model.named_modules()}
    return [
        [full_names[id(linear)] for linear in prunable_linears(block).values()]
        for block in decoder_layers(model)
    ]


def _linears_by_name(blocks: list[nn.Module], names: list[list[str]]) -> dict[str, nn.Linear]:
    """Every block's Linears by full name, block after block (the full-model stage's order)."""
    return {
        name: linear
        for block, block_names in zip(blocks, names)
        for name, linear in zip(block_names, prunable_linears(block).values())
    }


def _first(out: Any) -> Tensor:
    # transformers >= 5 returns a Tensor, older versions a tuple whose first entry is the states.
    return out[0] if isinstance(out, tuple | list) else out


class _Group:
    """The forward state of one group of windows: kept block inputs and every block's call."""

    def __init__(self, ids: Tensor, nblocks: int) -> None:
        self.ids = ids  # (S, T)
        self.inputs: list[list[Tensor]] = [[] for _ in range(nblocks + 1)]  # [b][i]: (1, T, H)
        self.calls: list[list[Call]] = []  # [i][b]
        self.tuple_outputs = False


def _skeleton_pass(
    model: nn.Module, group: _Group, compute: torch.device, host, sources: Sources
) -> None:
    """Block 0's input and every block's call arguments, for each window of the group."""
    nblocks = len(group.inputs) - 1

    def record(index: int, hidden: Tensor, args: tuple, kwargs: dict) -> Tensor:
        if index == 0:
            group.inputs[0].append(hidden.to(host))
        calls.append((args, dict(kwargs)))
        if index == nblocks - 1:
            raise _Stop
        return hidden

    with skeleton(model, record), visiting(model, compute, sources), torch.no_grad():
        for i in range(group.ids.shape[0]):
            calls: list[Call] = []
            try:
                model(input_ids=group.ids[i : i + 1].to(compute), use_cache=False)
            except _Stop:
                group.calls.append(calls)
                continue
            raise RuntimeError("The forward pass never reached the last decoder block.")


@torch.no_grad()
def _forward_blocks(
    blocks: list[nn.Module], group: _Group, compute: torch.device, host, bar: tqdm, sources: Sources
) -> None:
    """Run the blocks in order on every window of the group, keeping each block's input."""
    for b, block in enumerate(blocks):
        with visiting(block, compute, sources):
            for i, hidden in enumerate(group.inputs[b]):
                args, kwargs = group.calls[i][b]
                out = block(hidden.to(compute), *args, **kwargs)
                group.tuple_outputs = isinstance(out, tuple | list)
                group.inputs[b + 1].append(_first(out).to(host))
        bar.update()


def _head_backward(
    model: nn.Module, group: _Group, compute, chunk: int, first: int, sources: Sources
) -> list:
    """Loss and its backward for each window; returns the last hidden states' gradients."""
    grads = []
    current: list[Any] = [None]  # what every stand-in returns: the current window's leaf
    # embeddings and head moved once for the group
    with skeleton(model, lambda *_: current[0]), visiting(model, compute, sources):
        for i, last in enumerate(group.inputs[-1]):
            leaf = last.to(compute).detach().requires_grad_()  # (1, T, H)
            current[0] = (leaf,) if group.tuple_outputs else leaf
            _backward_sample(model, group.ids[i : i + 1].to(compute), chunk, first + i)
            grads.append(leaf.grad)
            current[0] = None
    group.inputs[-1] = []
    return grads


def _backward_block(
    block: nn.Module,
    b: int,
    group: _Group,
    grads: list[Tensor],
    folder: _Folder,
    names: list[str],
    compute: torch.device,
    first: int,
    sources: Sources,
) -> list[Tensor | None]:
    """Recompute block ``b`` from its kept inputs and backpropagate ``grads`` (one per window)."""
    homes = {name: folder.accumulators[name] for name in names}
    for name, acc in homes.items():
        folder.accumulators[name] = acc.to(compute)
    passed: list[Tensor | None] = []
    with visiting(block, compute, sources):
        for i, hidden in enumerate(group.inputs[b]):
            # Block 0's input does not require grad in the full model either (embeddings frozen).
            x = hidden.to(compute).detach().requires_grad_(b > 0)  # (1, T, H)
            args, kwargs = group.calls[i][b]
            _first(block(x, *args, **kwargs)).backward(grads[i])
            grads[i] = None
            folder.check_sample(first + i)
            passed.append(x.grad)
    for name, acc in homes.items():
        if folder.accumulators[name] is not acc:
            acc.copy_(folder.accumulators[name])
            folder.accumulators[name] = acc
    group.inputs[b] = []
    return passed


def _compute_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device``; else accelerate's one execution device, else that of the input embeddings."""
    if device is not None:
        return torch.device(device)
    placed = execution_devices(model)
    return placed.pop() if len(placed) == 1 else _input_device(model)


def blockwise_gradient_norms(
    model: nn.Module,
    windows: Tensor,
    settings: GradientSettings | None = None,
    *,
    device: str | torch.device | None = None,
    accumulate_on: str | torch.device | None = None,
    progress: bool = True,
    file_backed: bool = False,
    scratch_dir: Path | None = None,
) -> dict[str, Tensor]:
    """:func:`gblm.calibration.gradients.gradient_norms`, one decoder block on the device at a time.

    Args: as :func:`gblm.calibration.gradients.gradient_norms`; ``device`` is the compute device
        (default: accelerate's execution device, else that of the input embeddings), where each
        block, the embeddings and the head are moved for their work; ``accumulate_on`` is where
        the accumulators live between uses (default: each weight's device, the CPU for a weight
        accelerate offloads); ``settings.group_size`` windows go through the blocks together
        (their block inputs kept on the CPU); with ``file_backed``, the accumulators live in
        file-backed mappings, one file per block in ``scratch_dir`` (default: the system's
        temporary folder), so their bytes are never anonymous memory
        (:func:`gblm.models.memory.file_backed_zeros`; ``accumulate_on`` must then be the CPU or
        None). With ``norm="l2"`` the finished norms (the square roots) are ordinary memory.

    A model dispatched by accelerate (a device map, offloaded blocks included) runs with its hooks
    held (:func:`gblm.models.offload.held_hooks`: inputs go to ``device``, no weights are loaded
    or dropped by them) and its offloaded weights read from their hooks' stores one block at a
    time (:func:`gblm.models.offload.placeholders`).

    Returns:
        The same ``{full Linear name: (d_out, d_in) tensor}``, bit for bit.
    """
    settings = settings or GradientSettings()
    _check_windows(windows)
    if settings.loss_chunk_tokens:
        check_chunkable(model)
    compute = _compute_device(model, device)
    on = torch.device(accumulate_on) if accumulate_on is not None else None
    if file_backed and on not in (None, torch.device("cpu")):
        raise ValueError(f"file-backed accumulators live on the CPU, not accumulate_on={on}.")
    files = (scratch_dir,) if file_backed else None
    with placeholders(model) as sources, held_hooks(model, compute):
        return _blockwise(model, windows, settings, compute, on, progress, sources, files)


def _blockwise(
    model: nn.Module,
    windows: Tensor,
    settings: GradientSettings,
    compute: torch.device,
    accumulate_on: torch.device | None,
    progress: bool,
    sources: Sources,
    files: tuple[Path | None] | None,
) -> dict[str, Tensor]:
    """The stage itself (:func:`blockwise_gradient_norms`), its arguments checked; ``files``:
    ``(scratch_dir,)`` for file-backed accumulators."""
    nsamples, seqlen = windows.shape
    chunk, size = settings.loss_chunk_tokens, settings.group_size
    host = torch.device("cpu")
    blocks = list(decoder_layers(model))
    block_names = _block_linear_names(model)
    linears = _linears_by_name(blocks, block_names)
    acc_dtype = settings.torch_accumulator_dtype
    if files is None:
        folder = _Folder(linears, settings.norm, settings.scale, acc_dtype, accumulate_on)
    else:  # no storage until each block's file is made
        folder = _Folder(linears, settings.norm, settings.scale, acc_dtype, torch.device("meta"))
        for names in block_names:
            specs = [(folder.accumulators[n].shape, folder.accumulators[n].dtype) for n in names]
            folder.accumulators.update(zip(names, file_backed_zeros(specs, files[0])))
    versions = {name: p._version for name, p in model.named_parameters()}
    start = time.perf_counter()
    bar = tqdm(total=2 * -(-nsamples // size) * len(blocks), desc="gradients", disable=not progress)
    try:
        with (
            _eval_mode(model),
            _only_weights_require_grad(model, [lin.weight for lin in linears.values()]),
            lean_loss(model) if not chunk else contextlib.nullcontext(False),
            torch.enable_grad(),
            folding_hooks(linears, folder),
        ):
            for first in range(0, nsamples, size):
                group = _Group(windows[first : first + size], len(blocks))
                _skeleton_pass(model, group, compute, host, sources)
                _forward_blocks(blocks, group, compute, host, bar, sources)
                grads = _head_backward(model, group, compute, chunk, first, sources)
                for b in reversed(range(len(blocks))):
                    grads = _backward_block(
                        blocks[b], b, group, grads, folder, block_names[b], compute, first, sources
                    )
                    bar.update()
    finally:
        bar.close()
    norms = _finish(model, versions, folder, settings)
    logger.info(
        "block-by-block gradient norms (%s, groups of %d) of %d Linears over %d x %d: %.1f s",
        settings.norm, size, len(norms), nsamples, seqlen, time.perf_counter() - start,
    )  # fmt: skip
    return norms
