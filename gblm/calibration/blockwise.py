"""GBLM-Pruner's gradient stage block by block, for models larger than the compute device.

:func:`blockwise_gradient_norms` gives bit for bit the norms of
:func:`gblm.calibration.gradients.gradient_norms`, but never needs more than one decoder block on
the compute device. For each group of S calibration windows:

1. **Skeleton pass.** The model runs on each window with its decoder blocks replaced by
   stand-ins (:class:`_StandIn`) that record what each block is called with (hidden states,
   attention mask, rotary ``position_embeddings``, ...; per block, so per-layer masks such as
   Qwen2's sliding layers are right); the last stand-in stops the pass. Embeddings, masks and
   rotary tables are the model's own code, on the compute device.
2. **Forward.** Block after block, each onloaded once, runs on the S windows in the batches the
   full-model stage uses (``batch_size``; one window at a time where it uses none); each
   block's input is kept on the host.
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
    _check_windows,
    _eval_mode,
    _finish,
    _Folder,
    _gradient_batch,
    _loss_backward,
    _only_weights_require_grad,
    _per_sample_gradient_hooks,
    _products_in_hooks,
    check_chunkable,
    folding_hooks,
)
from gblm.calibration.loss import lean_loss
from gblm.devices import input_device
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
    """The forward state of one group of windows: kept block inputs and every block's call.

    The group's S windows go through each block in batches of ``batch`` windows (the last one
    may be shorter); batch ``j`` is windows ``spans[j]`` of the group.
    """

    def __init__(self, ids: Tensor, nblocks: int, batch: int) -> None:
        self.ids = ids  # (S, T)
        self.spans = [(s, min(s + batch, len(ids))) for s in range(0, len(ids), batch)]
        self.inputs: list[list[Tensor]] = [[] for _ in range(nblocks + 1)]  # [b][j]: (bj, T, H)
        self.calls: list[list[Call]] = []  # [j][b]
        self.tuple_outputs = False

    def batch_ids(self, j: int) -> Tensor:
        """Token ids of batch ``j``: (bj, T)."""
        start, end = self.spans[j]
        return self.ids[start:end]


def _skeleton_pass(
    model: nn.Module, group: _Group, compute: torch.device, host, sources: Sources
) -> None:
    """Block 0's input and every block's call arguments, for each batch of the group."""
    nblocks = len(group.inputs) - 1

    def record(index: int, hidden: Tensor, args: tuple, kwargs: dict) -> Tensor:
        if index == 0:
            group.inputs[0].append(hidden.to(host))
        calls.append((args, dict(kwargs)))
        if index == nblocks - 1:
            raise _Stop
        return hidden

    with skeleton(model, record), visiting(model, compute, sources), torch.no_grad():
        for j in range(len(group.spans)):
            calls: list[Call] = []
            try:
                model(input_ids=group.batch_ids(j).to(compute), use_cache=False)
            except _Stop:
                group.calls.append(calls)
                continue
            raise RuntimeError("The forward pass never reached the last decoder block.")


@torch.no_grad()
def _forward_blocks(
    blocks: list[nn.Module], group: _Group, compute: torch.device, host, bar: tqdm, sources: Sources
) -> None:
    """Run the blocks in order on every batch of the group, keeping each block's input."""
    for b, block in enumerate(blocks):
        with visiting(block, compute, sources):
            for j, hidden in enumerate(group.inputs[b]):
                args, kwargs = group.calls[j][b]
                out = block(hidden.to(compute), *args, **kwargs)
                group.tuple_outputs = isinstance(out, tuple | list)
                group.inputs[b + 1].append(_first(out).to(host))
        bar.update()


def _head_backward(
    model: nn.Module, group: _Group, compute, chunk: int, first: int, sources: Sources
) -> list:
    """Loss and its backward for each batch; returns the last hidden states' gradients.

    As in the full-model stage (:func:`gblm.calibration.gradients._loss_backward`): the model's
    own mean loss, seeded with the batch size for a batch of several windows; one window may use
    the chunked loss.
    """
    grads = []
    current: list[Any] = [None]  # what every stand-in returns: the current batch's leaf
    # embeddings and head moved once for the group
    with skeleton(model, lambda *_: current[0]), visiting(model, compute, sources):
        for j, last in enumerate(group.inputs[-1]):
            leaf = last.to(compute).detach().requires_grad_()  # (bj, T, H)
            current[0] = (leaf,) if group.tuple_outputs else leaf
            ids, start = group.batch_ids(j).to(compute), first + group.spans[j][0]
            _loss_backward(model, ids, chunk, start)
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
    set_batch: Callable[[int], None] | None,
) -> list[Tensor | None]:
    """Recompute block ``b`` from its kept inputs and backpropagate ``grads`` (one per batch).

    ``set_batch``: None when windows go one at a time (autograd forms each weight gradient);
    else the per-sample gradient hooks' batch setter, and every block's input requires grad, as
    the embeddings' output does in the full-model stage's batches (no weight does).
    """
    homes = {name: folder.accumulators[name] for name in names}
    for name, acc in homes.items():
        folder.accumulators[name] = acc.to(compute)
    passed: list[Tensor | None] = []
    with visiting(block, compute, sources):
        for j, hidden in enumerate(group.inputs[b]):
            # Block 0's input does not require grad in the full model either (embeddings frozen).
            x = hidden.to(compute).detach().requires_grad_(b > 0 or set_batch is not None)
            args, kwargs = group.calls[j][b]
            start, end = group.spans[j]
            if set_batch is not None:
                set_batch(end - start)
            _first(block(x, *args, **kwargs)).backward(grads[j])  # x: (bj, T, H)
            grads[j] = None
            folder.check_sample(first + start, first + end - 1)
            passed.append(x.grad)
    for name, acc in homes.items():
        if folder.accumulators[name] is not acc:
            acc.copy_(folder.accumulators[name])
            folder.accumulators[name] = acc
    group.inputs[b] = []
    return passed


@contextlib.contextmanager
def _gradient_hooks(
    model: nn.Module, linears: dict[str, nn.Linear], folder: _Folder, in_hooks: bool
) -> Iterator[Callable[[int], None] | None]:
    """How weight gradients reach ``folder``: as in the full-model stage.

    ``in_hooks`` (:func:`gblm.calibration.gradients._products_in_hooks`): no weight requires
    grad, and each Linear's hooks form every window's weight gradient from its input and output
    gradient
    (:func:`gblm.calibration.gradients._per_sample_gradient_hooks`); yields their batch setter.
    Otherwise the weights require grad and autograd's gradient of each window is folded as it
    completes (:func:`gblm.calibration.gradients.folding_hooks`); yields None.
    """
    if in_hooks:
        with (
            _only_weights_require_grad(model, []),
            _per_sample_gradient_hooks(linears, folder) as set_batch,
        ):
            yield set_batch
    else:
        weights = [lin.weight for lin in linears.values()]
        with _only_weights_require_grad(model, weights), folding_hooks(linears, folder):
            yield None


def _compute_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device``; else accelerate's one execution device, else that of the input embeddings."""
    if device is not None:
        return torch.device(device)
    placed = execution_devices(model)
    return placed.pop() if len(placed) == 1 else input_device(model)


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
    batch_size: int | str = "auto",
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
        ``batch_size``: windows of a group per block call, as the full-model stage's (``auto``:
        where the batched products give each window's bits, with the model's own loss; else
        one), so each block runs on the CPU with the matmul shapes of the in-memory stage.

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
        return _blockwise(
            model, windows, settings, compute, on, progress, sources, files, batch_size
        )


def _blockwise(
    model: nn.Module,
    windows: Tensor,
    settings: GradientSettings,
    compute: torch.device,
    accumulate_on: torch.device | None,
    progress: bool,
    sources: Sources,
    files: tuple[Path | None] | None,
    batch_size: int | str,
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
            lean_loss(model) if not chunk else contextlib.nullcontext(False) as lean,
            torch.enable_grad(),
        ):
            # Batches need the model's own mean loss (lean), as in the full-model stage.
            batch, hooked = 1, False
            if lean:
                batch = _gradient_batch(model, linears, batch_size, windows[:size], compute)
                hooked = _products_in_hooks(linears, batch, seqlen, compute)
            with _gradient_hooks(model, linears, folder, hooked) as set_batch:
                for first in range(0, nsamples, size):
                    ids = windows[first : first + size]  # (S, T)
                    if batch > 1 and len(ids) < size:  # a short last group: its sizes probed
                        batch = _gradient_batch(model, linears, batch_size, ids, compute)
                    group = _Group(ids, len(blocks), batch)
                    _skeleton_pass(model, group, compute, host, sources)
                    _forward_blocks(blocks, group, compute, host, bar, sources)
                    grads = _head_backward(model, group, compute, chunk, first, sources)
                    for b in reversed(range(len(blocks))):
                        grads = _backward_block(
                            blocks[b], b, group, grads, folder, block_names[b], compute, first,
                            sources, set_batch,
                        )  # fmt: skip
                        bar.update()
    finally:
        bar.close()
    norms = _finish(model, versions, folder, settings)
    logger.info(
        "block-by-block gradient norms (%s, groups of %d) of %d Linears over %d x %d: %.1f s",
        settings.norm, size, len(norms), nsamples, seqlen, time.perf_counter() - start,
    )  # fmt: skip
    return norms
