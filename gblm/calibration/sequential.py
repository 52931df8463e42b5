"""The sequential layer walk (docs/methods.md).

1. Capture the inputs of decoder block 0 (hidden states and every keyword argument) for all N
   calibration windows.
2. For each block in order: run it on the N inputs with hooks on its Linears and fold the
   statistics the method declares; prune every Linear to its target (and, with a weight update,
   update its kept weights from its dense ones, one Linear at a time); then run the pruned block
   again to produce the inputs of the next block, which so sees the pruned blocks before it.
3. With ``method.true_sequential`` (SparseGPT's option) the block is pruned group by group,
   [q,k,v] -> [o] -> [gate,up] -> [down], re-running it with hooks on the next group each time.

A method that needs no calibration (magnitude, without an update that needs statistics) prunes
without data. Only the Linears inside decoder blocks are pruned, never embeddings or the LM head.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm import tqdm

from gblm.calibration.capture import BlockInputs, block_output, capture_block_inputs
from gblm.calibration.hooks import attached_hooks
from gblm.calibration.stats import LinearStats
from gblm.devices import calibration_batch
from gblm.models.layers import (
    decoder_layers,
    decoder_layers_path,
    prunable_linears,
    sequential_groups,
)
from gblm.models.memory import (
    in_file_mappings,
    map_parameters_to_file,
    private_file_mappings,
    privatize_parameters,
    release_free_heap,
)
from gblm.models.offload import execution_devices, materialized
from gblm.models.onloading import skeleton, visiting
from gblm.pruning.storage import PackedMasks
from gblm.utils import evaluating

if TYPE_CHECKING:
    from gblm.methods.base import Pruner
    from gblm.methods.plans import SparsityPlan
    from gblm.pruning.sparsity import Sparsity

logger = logging.getLogger("gblm.walk")


@contextlib.contextmanager
def _on_device(block: nn.Module, device: torch.device) -> Iterator[torch.device]:
    """Move ``block`` to ``device`` for its work and back; yields the device it computes on.

    A block accelerate places computes on its execution device instead, its offloaded weights
    read from their stores and the pruned values written back there
    (:func:`gblm.models.offload.materialized`).
    """
    placed = execution_devices(block)
    if len(placed) > 1:
        raise NotImplementedError(
            f"accelerate runs parts of a decoder block on {sorted(map(str, placed))}; "
            "give the whole block one device in the device map."
        )
    if placed:
        execution_device = placed.pop()
        with materialized(block, execution_device):
            yield execution_device
        return
    home = {p.device for p in block.parameters()}
    if home == {device}:
        yield device
        return
    if len(home) > 1:
        raise NotImplementedError(
            f"A decoder block is split over devices {sorted(map(str, home))}."
        )
    block.to(device)
    try:
        yield device
    finally:
        block.to(home.pop())


@contextlib.contextmanager
def _embeddings_on(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Everything but the decoder blocks on ``device`` (read only), the blocks where they are."""
    with skeleton(model, lambda _index, hidden, _args, _kwargs: hidden), visiting(model, device):
        yield


def _run_block(
    block: nn.Module,
    inputs: BlockInputs,
    hidden: Tensor,
    device: torch.device,
    start: int,
    end: int,
) -> Tensor:
    """Block output (b, T, hidden) for windows ``start:end`` of ``hidden``, on ``device``."""
    args, kwargs = inputs.call_args(end - start, device)
    return block_output(block(hidden[start:end].to(device), *args, **kwargs))


def gather_statistics(
    block: nn.Module,
    linears: Mapping[str, nn.Linear],
    inputs: BlockInputs,
    hidden: Tensor,
    wanted: frozenset[str],
    device: torch.device,
    *,
    share_inputs: bool = True,
) -> dict[str, LinearStats]:
    """Run the block on all N inputs with hooks on ``linears``; fold the statistics ``wanted``.

    Linears that read the very same input tensor (LLaMA's q/k/v, gate/up) get the same statistics,
    so with ``share_inputs`` they are folded once, by the first of them, and the others refer to
    the same tensors (bit for bit what folding them separately gives). Should a block feed a
    Linear a shared input in some batches only, they are gathered again without sharing.
    """
    stats = {
        name: LinearStats.empty(wanted, lin.in_features, device) for name, lin in linears.items()
    }
    if not wanted:
        return stats
    batch = 0  # windows in the current forward call, read by the hooks
    # this call's inputs, id -> (weak reference, who folded it); weak, so no activation is kept
    folded: dict[int, tuple[weakref.ref, str]] = {}
    source: dict[str, set[str | None]] = {name: set() for name in linears}  # None: its own input

    def fold(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple, _output: Tensor) -> None:
            x = args[0]
            seen = folded.get(id(x)) if share_inputs else None
            if seen is not None and seen[0]() is x:  # already folded for another Linear
                source[name].add(seen[1])
                return
            source[name].add(None)
            folded[id(x)] = (weakref.ref(x), name)
            x = x.detach().reshape(batch, -1, x.shape[-1])  # (b, T, d_in): OPT flattens tokens
            # One window at a time, so the running means take the same steps whatever the batch.
            for sample in x.split(1):  # (1, T, d_in) each
                stats[name].fold(sample)

        return hook

    with attached_hooks([(lin, fold(name)) for name, lin in linears.items()]):
        for start, end in inputs.batches():
            batch = end - start
            folded.clear()
            _run_block(block, inputs, hidden, device, start, end)
    folded.clear()
    if any(len(sources) > 1 for sources in source.values()):
        logger.debug("inputs shared in some batches only: statistics gathered per Linear")
        return gather_statistics(block, linears, inputs, hidden, wanted, device, share_inputs=False)
    for name, sources in source.items():
        owner = next(iter(sources), None)
        if owner is not None:
            stats[name] = stats[owner]  # the same tensors: read only by the methods
    return stats


def _prune_block(
    block: nn.Module,
    b: int,
    prefix: str,
    method: Pruner,
    plan: SparsityPlan | Sparsity,
    inputs: BlockInputs | None,
    hidden: Tensor | None,
    device: torch.device,
    masks: PackedMasks,
) -> None:
    """Gather statistics and prune every Linear of block ``b`` (group by group if sequential);
    with a weight update, update each Linear's kept weights right after its mask is chosen."""
    linears = prunable_linears(block)
    update = method.update
    groups = sequential_groups(list(linears)) if method.true_sequential else [list(linears)]
    for group in groups:
        group_linears = {name: linears[name] for name in group}
        if inputs is not None:
            stats = gather_statistics(
                block, group_linears, inputs, hidden, method.walk_stats, device
            )
        else:
            stats = {name: LinearStats() for name in group}
        for name in group:
            full_name, linear = f"{prefix}.{b}.{name}", linears[name]
            target = plan.target(b, name)
            dense = linear.weight.data.clone() if update is not None else None
            mask = method.prune_linear(full_name, linear, stats[name], target)
            if update is not None:
                score = functools.partial(method.column_score, full_name, stats[name])
                mask = update.apply(linear, dense, mask, stats[name], target, score)
                del dense
            masks.add(full_name, mask)
            stats[name] = LinearStats()  # free the Hessian before the next Linear


@torch.no_grad()
def prune_model(
    model: nn.Module,
    method: Pruner,
    plan: SparsityPlan | Sparsity,
    windows: Tensor | None = None,
    *,
    device: torch.device | str,
    batch_size: int | str = "auto",
    progress: bool = True,
    offload_inputs: bool = False,
    onload: bool = False,
    scratch_dir: Path | None = None,
) -> PackedMasks:
    """Prune every Linear inside the decoder blocks of ``model``, in place, block by block.

    Args:
        model: a causal LM (LLaMA, Mistral, Qwen2, OPT, ...).
        method: decides the statistics gathered (``walk_stats``) and prunes each Linear.
        plan: every Linear's target, or one :class:`Sparsity` for all of them.
        windows: (N, T) calibration token ids; unused without calibration.
        device: the compute device; each block is moved there for its work and back.
        batch_size: windows per forward call, or ``auto`` (:func:`gblm.devices.calibration_batch`).
        offload_inputs: keep the (N, T, hidden) block inputs on the CPU instead of ``device``.
        onload: the weights live off ``device``: block 0's inputs are captured with only the
            embeddings (and the rest outside the blocks) moved there, and a block whose weights
            are a memory-mapped checkpoint's pages moves, once pruned, into a file-backed mapping
            of its own in ``scratch_dir`` (None: the system's temporary folder), with the heap's
            free pages handed back after each block (docs/onload.md).

    Returns:
        The masks (True = pruned) as bits on the CPU, keyed by full module name, e.g.
        ``model.layers.0.self_attn.q_proj``.
    """
    device = torch.device(device)
    if method.walk_calibrates and windows is None:
        raise ValueError(f"{type(method).__name__} needs calibration windows; none were given.")
    blocks, prefix = decoder_layers(model), decoder_layers_path(model)
    masks = PackedMasks()
    began = time.perf_counter()
    with evaluating(model):
        inputs = hidden = outputs = None
        if method.walk_calibrates:
            storage = torch.device("cpu") if offload_inputs else device
            batch = min(calibration_batch(batch_size), windows.shape[0])
            with _embeddings_on(model, device) if onload else contextlib.nullcontext():
                inputs = capture_block_inputs(
                    model, windows, batch_size=batch, storage_device=storage
                )
            hidden = inputs.hidden  # (N, T, hidden): inputs of the current block
            outputs = torch.empty_like(hidden)  # (N, T, hidden): inputs of the next block
        for b, block in enumerate(tqdm(blocks, desc="prune blocks", disable=not progress)):
            block_began = time.perf_counter()
            # Read per block: a shard is unmapped once its last tensor is gone, and its addresses
            # may then hold a new (shared) mapping that must not be taken for it.
            mapped = private_file_mappings()  # weights still in the checkpoint's pages (mmap)
            to_file = onload and in_file_mappings(block, mapped)
            with _on_device(block, device) as block_device:
                if to_file and in_file_mappings(block, mapped):  # not moved: it computes at home
                    map_parameters_to_file(block, scratch_dir)
                    to_file = False
                else:
                    privatize_parameters(block, mapped)  # no copy-on-write faults as masks land
                _prune_block(block, b, prefix, method, plan, inputs, hidden, block_device, masks)
                if inputs is not None:
                    for start, end in inputs.batches():
                        out = _run_block(block, inputs, hidden, block_device, start, end)
                        outputs[start:end] = out.to(outputs.device)
                    hidden, outputs = outputs, hidden
            if to_file:  # it came back from the device as ordinary memory
                map_parameters_to_file(block, scratch_dir)
            if onload:
                release_free_heap()  # the block's freed scratch, else fragmented in the heap
            logger.debug("block %d pruned in %.2f s", b, time.perf_counter() - block_began)
    logger.info(
        "%s: pruned %d Linears in %d blocks in %.1f s",
        type(method).__name__, len(masks), len(blocks), time.perf_counter() - began,
    )  # fmt: skip
    return masks
